"""The checkpoint contract for inference: a `model.pt` describes itself, and one loader reads it.

A training step directory holds DeepSpeed's per-rank files (for resuming) and `model.pt`, a plain
file of tensors and plain data, loaded with `weights_only=True` (it can never run code):

    {"model": state dict (float32, CPU),
     "record": {"format": "micon-checkpoint", "version": 1, "method", "model" (ModelConfig fields),
                "channels" (names, in order), "atom_dim", "bond_dim", "fingerprint_bits",
                "preprocessing", "step"},
     "config": the full training configuration, "state": the trainer state at that step}

Training writes it (train/), embedding reads it (evaluate/): neither imports the other. A checkpoint may be
read from object storage (s3://bucket/models/run/model.pt, as train's export= writes it).
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from micon import atomic, storage

FORMAT, VERSION = "micon-checkpoint", 1


class CheckpointError(RuntimeError):
    pass


class NoRecordError(CheckpointError):
    """A checkpoint written before checkpoints described themselves (no inference record)."""


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def find_latest(root: Path) -> str | None:
    """The newest complete tag under a checkpoints/ directory: the `latest` pointer, else the newest
    step directory holding model.pt."""
    root = storage.path(root)
    pointer = root / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / "model.pt").is_file():
            return tag
    done = sorted(p.name for p in root.glob("step*") if (p / "model.pt").is_file())
    return done[-1] if done else None


@dataclass
class InferenceRecord:
    """What it takes to rebuild the image encoder and feed it exactly as in training."""

    method: str
    model: dict                          # micon.models.factory.ModelConfig fields
    channels: list[str]                  # channel names in the order of the input tensor
    atom_dim: int = 0                    # molecule encoder inputs: graph feature sizes (D-MPNN) ...
    bond_dim: int = 0
    fingerprint_bits: int = 0            # ... or the graph store's fingerprint size (fingerprint MLP)
    table_dim: int = 0                   # ... or the width of the frozen vector table (model.molecule=table)
    preprocessing: dict = field(default_factory=dict)   # micon.data.preprocess.Preprocessing fields
    step: int = 0
    format: str = FORMAT
    version: int = VERSION

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Checkpoint:
    path: Path
    record: InferenceRecord
    weights: dict
    config: dict
    state: dict

    def build_model(self) -> torch.nn.Module:
        """The method's whole model with these weights (CPU, eval mode): the image encoder and, for a method
        that reads molecules, the molecule encoder with the input sizes recorded in training."""
        from micon.methods import get_method

        r = self.record
        # the pretrained file is not read again: these weights replace it (same normalisation, same parts)
        model = get_method(r.method).build_model(model_config(r.model), len(r.channels), r.atom_dim, r.bond_dim,
                                                 r.fingerprint_bits, r.table_dim, load_weights=False)
        model.load_state_dict(self.weights)
        return model.eval()

    def untrained(self) -> "Checkpoint":
        """The same network as training initialised it, never updated: the method's model built from this
        record after torch.manual_seed(the run's seed), as the trainer does before its first step (a run that
        started from another run's encoder, model.init, started elsewhere: this is the random start)."""
        import dataclasses

        from micon.methods import get_method

        r = self.record
        torch.manual_seed(int(self.config.get("seed", 0)))
        # a run from pretrained weights started from them: they are read again (from model.pretrained)
        model = get_method(r.method).build_model(model_config(r.model), len(r.channels), r.atom_dim, r.bond_dim,
                                                 r.fingerprint_bits, r.table_dim)
        return dataclasses.replace(self, weights={k: v.detach().float() for k, v in model.state_dict().items()},
                                   record=dataclasses.replace(r, step=0), state={})

    def preprocessing(self):
        from micon.data.preprocess import Preprocessing
        return Preprocessing.from_dict(self.record.preprocessing)


def model_config(fields: dict):
    """A record's model settings as a ModelConfig (keys of another version dropped; old records' boolean
    `pretrained` read as its string)."""
    from micon.models.factory import ModelConfig

    known = ModelConfig.__dataclass_fields__
    cfg = {k: v for k, v in fields.items() if k in known}
    if isinstance(cfg.get("pretrained"), bool):   # before weights files: no input normalisation was applied
        cfg["pretrained"] = "timm" if cfg["pretrained"] else "false"
        cfg.setdefault("input_norm", "none")
    return ModelConfig(**cfg)


def save_model_file(path: Path, weights: dict, record: InferenceRecord, config: dict, state: dict) -> None:
    """Write model.pt atomically (temporary name, then rename)."""
    with atomic.atomic_path(path) as tmp:
        torch.save({"model": {k: v.detach().float().cpu() for k, v in weights.items()}, "record": record.to_dict(),
                    "config": config, "state": state}, tmp)


def resolve_model_file(path: str | Path) -> Path:
    """A training output directory, its checkpoints/ directory, one step directory, RUN/best, or a model.pt."""
    p = storage.path(path)
    if p.name == "best" and not p.is_dir():      # RUN/best or RUN/checkpoints/best: val.keep_best's checkpoint
        root = p.parent / "checkpoints" if (p.parent / "checkpoints").is_dir() else p.parent
        if not (root / "best").is_file():
            raise CheckpointError(f"no best checkpoint at {path}: the run kept none (train with val.every=N "
                                  f"val.keep_best=METRIC)")
        p = root / (root / "best").read_text().strip()
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.is_dir() and not (p / "model.pt").is_file():
        latest = find_latest(p)
        p = p / latest if latest else p
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise CheckpointError(f"no model.pt at {path}: pass a training output directory, its checkpoints/ "
                              f"directory, one of its step directories, or a model.pt")
    return p


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a model.pt safely; errors say which file and what is wrong with it."""
    p = resolve_model_file(path)
    try:
        ck = torch.load(p if isinstance(p, Path) else io.BytesIO(storage.read_bytes(p)), map_location="cpu",
                        weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{p} is not a readable checkpoint of plain tensors and data "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); it may be corrupt, "
                              f"or not written by this project (only weights_only files are loaded)") from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise CheckpointError(f"{p} holds no model weights")
    rec = ck.get("record")
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise NoRecordError(f"{p} was written before checkpoints described themselves (no inference record: "
                              f"method, channels, feature sizes, preprocessing). Retrain, or resume the run once "
                              f"with this version (./launch.sh train ... resume=latest steps=N+1) to rewrite it")
    if rec.get("version", 0) > VERSION:
        raise CheckpointError(f"{p}: checkpoint record version {rec['version']} is newer than this code "
                              f"reads ({VERSION}); update the project")
    known = InferenceRecord.__dataclass_fields__
    record = InferenceRecord(**{k: v for k, v in rec.items() if k in known})
    return Checkpoint(p, record, ck["model"], ck.get("config") or {}, ck.get("state") or {})
