"""The Trainer's validation component: held-out retrieval while the run trains (val.every, val.split,
val.max_wells), the best checkpoint kept (val.keep_best) and an early stop (val.patience).

The validation wells are chosen once from the shard set's splits (micon.eval.validation.select_wells) and
written to OUT/val/wells.csv; their sites are read and decoded once and kept in memory. Each rank keeps and
embeds its own contiguous share of the sites with the live image encoder in eval mode (no gradients), and one
all-gather brings the embeddings to every rank: the embedding, the costly part, divides over the ranks, and
every rank joins the same forward passes and collectives, as a sharded engine needs. Rank 0 builds the
profiles and scores them with evaluate's library code (micon.eval.validation.score_sites) and broadcasts the
scores, so every rank takes the same keep-best and stop decisions. Its state (the best step and value, the
validations since) travels in TrainState, so a resumed run continues it.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from micon import atomic, distributed, schema
from micon.checkpoint import tag_of
from micon.config import ConfigError
from micon.eval.validation import ValidationError, read_sites, score_sites, select_wells, site_table, val_sites
from train.state import TrainingStopped

log = logging.getLogger("micon.train")
BEST = "best"          # checkpoints/best: the tag of the best checkpoint, beside `latest`


class Validator:
    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg = trainer.cfg.val
        self.metric = self.cfg.keep_best or "nsb_top10"      # what keep_best and patience watch
        self.rows = None         # every validation site's metadata (manifest order)
        self.share = None        # this rank's sites: uint8 [n, C, H, W], kept between validations
        self.plates: list[str] = []
        self.per = 0             # sites per rank (the last rank may hold fewer)

    @property
    def state(self) -> dict:
        return self.trainer.state.validation

    def due(self, step: int) -> bool:
        return bool(self.cfg.every) and step % self.cfg.every == 0

    def prepare(self) -> None:
        """Choose the wells and read this rank's share of their sites (once)."""
        from micon.data.preprocess import Preprocessing, SitePreprocessor

        t = self.trainer
        t0 = time.perf_counter()
        table = site_table(t.manifest)
        try:
            wells = select_wells(table, t.manifest.data["splits"], self.cfg.split, self.cfg.max_wells)
        except ValidationError as e:     # every rank reads the same manifest: all stop here alike
            raise ConfigError(str(e)) from None
        self.rows = val_sites(table, wells)
        n = len(self.rows)
        if n < t.world:
            raise TrainingStopped(f"val.split={self.cfg.split}: {n} validation sites for {t.world} ranks; raise "
                                  f"val.max_wells or choose another split")
        self.per = math.ceil(n / t.world)
        mine = self.rows.iloc[t.rank * self.per:min(n, (t.rank + 1) * self.per)]
        self.share = read_sites(t.manifest, mine.reset_index(drop=True))
        self.plates = list(mine[schema.PLATE])
        self.prep = SitePreprocessor(t.manifest, Preprocessing(normalize=t.cfg.data.normalize))
        if t.rank == 0:
            (t.out / "val").mkdir(parents=True, exist_ok=True)
            wells.to_csv(t.out / "val" / "wells.csv", index=False)
            role = wells[schema.ROLE]
            log.info("validation (val.split=%s): %d wells (%d compounds, %d DMSO) on %d plates, %d sites, %.1f MB "
                     "of sites kept per rank; read in %.1f s; scored every %d steps (val/%s)", self.cfg.split,
                     len(wells), wells.loc[role == schema.TREATED, schema.JCP].nunique(),
                     int((role == schema.NEGCON).sum()), wells[schema.PLATE].nunique(), n,
                     self.share.nbytes / 1e6, time.perf_counter() - t0, self.cfg.every, self.metric)

    def embed(self) -> np.ndarray:
        """Every validation site's embedding (on every rank), this rank having embedded its share."""
        t = self.trainer
        encoder = t.engine.module.image_encoder
        was_training = encoder.training
        encoder.eval()
        batch = max(t.cfg.micro_batch * 4, 16)
        parts = []
        with torch.no_grad():
            for i in range(0, len(self.share), batch):
                x = torch.from_numpy(self.prep.batch(self.share[i:i + batch], self.plates[i:i + batch]))
                parts.append(encoder(x.to(t.device, t.dtype)).float())
        encoder.train(was_training)
        local = torch.cat(parts)
        padded = torch.zeros((self.per, local.shape[1]), dtype=local.dtype, device=local.device)
        padded[:len(local)] = local
        everyone = distributed.gather_no_grad(padded).cpu().numpy()      # rank r's rows at [r*per, (r+1)*per)
        return everyone.reshape(t.world * self.per, -1)[:len(self.rows)]

    def run(self, step: int) -> dict[str, float]:
        """Validate at `step`: {val/<metric>: value, val/seconds}, the same on every rank."""
        t = self.trainer
        t0 = time.perf_counter()
        if self.share is None:
            self.prepare()
        emb = self.embed()
        scores = score_sites(self.rows, emb, self.cfg.recipe) if t.rank == 0 else None
        scores = distributed.broadcast_object(scores)
        out = {f"val/{k}": v for k, v in scores.items() if k != "n_wells"}
        out["val/seconds"] = time.perf_counter() - t0
        if t.rank == 0:
            log.info("validation at step %d (%d wells): %s; %.1f s", step, scores["n_wells"],
                     ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "n_wells"), out["val/seconds"])
        return out

    def improved(self, step: int, scores: dict[str, float]) -> bool:
        """Note this validation; True when it is the best so far by the watched metric."""
        value = scores.get(f"val/{self.metric}", float("nan"))
        best = self.state.get("value")
        if math.isfinite(value) and (best is None or value > best):
            self.state.update(step=step, value=value, metric=self.metric, since=0)
            return True
        self.state["since"] = self.state.get("since", 0) + 1
        return False

    def mark_best(self, step: int) -> None:
        """checkpoints/best names this step's checkpoint (kept outside the rotation by train.checkpoint.save)."""
        import shutil

        t = self.trainer
        if t.rank == 0:
            pointer = t.ckpt_root / BEST
            before = pointer.read_text().strip() if pointer.is_file() else None
            atomic.write_text(pointer, tag_of(step))
            newest = sorted(p.name for p in t.ckpt_root.glob("step*") if p.is_dir())[-t.cfg.keep_ckpts:]
            if before and before != tag_of(step) and t.cfg.keep_ckpts and before not in newest:
                shutil.rmtree(t.ckpt_root / before, ignore_errors=True)    # the best before, out of the rotation
            log.info("val.keep_best: best val/%s so far %.4f at step %d: %s", self.metric, self.state["value"],
                     step, t.ckpt_root / tag_of(step))

    def out_of_patience(self) -> bool:
        return bool(self.cfg.patience) and self.state.get("since", 0) >= self.cfg.patience

    def summary(self) -> dict:
        """final.json's record of the best validation (empty when there was none)."""
        if not self.state.get("metric"):
            return {}
        s = self.state
        return {"best": {"step": s["step"], "metric": f"val/{s['metric']}", "value": s["value"],
                         "checkpoint": str(self.trainer.ckpt_root / tag_of(s["step"])) if self.cfg.keep_best else None}}
