"""What a run reads besides its shards, checked before the first step: the compound graph store or the
frozen molecule table against the shards' compounds, and an image encoder from another run (model.init)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from micon import schema
from train.state import TrainingStopped

log = logging.getLogger("micon.train")


def load_image_encoder(model: torch.nn.Module, path: str, channels: list[str], model_cfg) -> str:
    """model.init: copy another run's image encoder (read through micon.checkpoint: a run directory, a step
    directory or a model.pt) into `model`; refuses one of another architecture, channel list or size with one
    line naming both. Returns what was loaded, for the log."""
    from micon.checkpoint import CheckpointError, load_checkpoint

    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:
        raise TrainingStopped(f"model.init={path}: {e}") from None
    prefix = "image_encoder."
    there = {k[len(prefix):]: v for k, v in ck.weights.items() if k.startswith(prefix)}
    here = model.image_encoder.state_dict()
    arch = ("preset", "mode", "per_channel_dim", "img_size")
    mine = {k: getattr(model_cfg, k) for k in arch}
    theirs = {k: ck.record.model.get(k, mine[k]) for k in arch}
    same_arch = {**theirs, "preset": _timm_name(theirs["preset"])} == {**mine, "preset": _timm_name(mine["preset"])}

    def describe(cfg: dict, chans: list) -> str:
        return " ".join([cfg["preset"], cfg["mode"]] + [f"{k}={cfg[k]}" for k in arch[2:] if cfg[k]]
                        + [f"channels {','.join(chans)}"])

    differ = sorted(set(there) ^ set(here)) or [k for k in here if there[k].shape != here[k].shape]
    if not same_arch or list(ck.record.channels) != list(channels) or differ:
        first = ""
        if differ:
            k = differ[0]
            first = (f"; first difference {k}: {list(there[k].shape) if k in there else 'absent'} there, "
                     f"{list(here[k].shape) if k in here else 'absent'} here")
        raise TrainingStopped(f"model.init={path}: its image encoder ({describe(theirs, ck.record.channels)}) is not "
                              f"this run's ({describe(mine, channels)}){first}; start from a run with the same "
                              f"model.preset, model.mode, sizes and channels, or drop model.init")
    model.image_encoder.load_state_dict({k: v.to(here[k].dtype) for k, v in there.items()})
    return (f"image encoder from {ck.path} ({ck.record.method}, step {ck.record.step}, {len(there)} tensors, "
            f"{sum(v.numel() for v in there.values()):,} values)")


def _timm_name(preset: str) -> str:
    from micon.models.image import IMAGE_PRESETS

    return IMAGE_PRESETS.get(preset, {}).get("timm_name", preset)


def compound_labels(manifest) -> dict[str, int]:
    ids = sorted(c[schema.JCP] for c in manifest.data["compounds"])
    return {c: i for i, c in enumerate(ids)}


def check_graphs(manifest, store_dir: str) -> int:
    """Refuse to start when a training compound has no graph, naming them and the reason; returns the store's
    fingerprint size (what a fingerprint encoder reads)."""
    from micon.chem.store import GraphStore, StoreError

    try:
        store = GraphStore(store_dir)
    except StoreError as e:
        raise TrainingStopped(str(e)) from None
    missing = []
    for c in manifest.data["compounds"]:
        if c["Metadata_Role"] in (schema.TREATED, schema.POSCON) and c[schema.JCP] not in manifest.data["splits"][
                "heldout_compounds"] and c[schema.JCP] not in store:
            reason = "not featurised"
            if c[schema.JCP] in set(store.index[schema.JCP]):
                reason = store.index.set_index(schema.JCP).loc[c[schema.JCP], "reason"]
            missing.append(f"{c[schema.JCP]} ({reason})")
    if missing:
        raise TrainingStopped(f"{len(missing)} training compound(s) have no graph in {store_dir}: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Fix their structures "
                              f"and rerun ./launch.sh featurize, or drop them from the screen.")
    return store.n_bits


def check_molecule_table(manifest, table_path: str, out: Path) -> int:
    """Refuse to start when a training compound has no row in the vector table: one message with the count, the
    first few and a file listing all of them (OUT/missing_from_molecule_table.txt); returns the table's width."""
    from micon.chem.table import MoleculeTable, TableError, write_missing

    try:
        table = MoleculeTable(table_path)
    except TableError as e:
        raise TrainingStopped(str(e)) from None
    wanted = [c[schema.JCP] for c in manifest.data["compounds"]
              if c["Metadata_Role"] in (schema.TREATED, schema.POSCON)
              and c[schema.JCP] not in manifest.data["splits"]["heldout_compounds"]]
    if missing := sorted(table.missing(wanted)):
        listing = write_missing(out, missing)
        raise TrainingStopped(f"{len(missing)} of {len(wanted)} training compound(s) have no row in "
                              f"model.molecule_table={table_path}: {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''} (all of them: {listing}). Compute their vectors "
                              f"and add them to the table, or drop them from the screen.")
    log.info("molecule table: %d compounds x %d frozen values from %s", len(table), table.dim, table_path)
    return table.dim
