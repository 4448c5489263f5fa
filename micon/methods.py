"""Training methods as objects: MICON and its baselines declare what their examples need, build their
model and compute their own loss. The trainer, the data stream and the benchmarks ask a method; they
never compare its name (dinov2's SSLMetaArch, open_clip's TrainingTask).

    method = get_method("micon")
    model = method.build_model(model_cfg, in_chans=5, **method.feature_dims())
    parts = method.loss(model, method.to_device(batch, device, dtype), loss_cfg)   # {"loss": ..., ...}

Pure: no process group set-up, no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from micon import losses
from micon.data.needs import DataNeeds
from micon.models.factory import ModelConfig, build_image_encoder, build_molecule_encoder


@dataclass
class LossConfig:
    temperature: float = 0.1             # softmax temperature of the contrastive losses
    counterfactual_weight: float = 1.0   # lambda in PaCLR + lambda * counterfactual
    counterfactual_mode: str = "union"   # union (official) | cross
    dmso_positives: bool = False         # False: the paper (DMSO only negatives); True: the official code


class Method:
    """One training method. Subclasses set `name`, `needs`, `description` and implement the two hooks."""

    name: str = ""
    description: str = ""
    needs: DataNeeds = DataNeeds()

    @property
    def images_per_example(self) -> int:
        """Images read per example: two views (replicates or augmentations) plus one control per view."""
        return 2 * (2 if self.needs.controls else 1)

    def feature_dims(self) -> dict:
        """Atom and bond feature sizes of the molecular graphs this method reads (0 without graphs)."""
        if not self.needs.graphs:
            return {"atom_dim": 0, "bond_dim": 0}
        from micon.chem.featurizer import ATOM_DIM, BOND_DIM
        return {"atom_dim": ATOM_DIM, "bond_dim": BOND_DIM}

    def build_model(self, cfg: ModelConfig, in_chans: int, atom_dim: int = 0, bond_dim: int = 0) -> nn.Module:
        raise NotImplementedError

    def chance_loss(self, examples: int, cfg: LossConfig) -> float:
        """The loss of an encoder that tells nothing apart (uniform softmax), for `examples` in the gathered
        batch: the level a learning run must fall well below."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict, cfg: LossConfig) -> dict[str, Tensor]:
        """{"loss": scalar to backpropagate, other scalars to log}; `batch` already on the device."""
        raise NotImplementedError

    def to_device(self, batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
        """The stream's CPU batch -> tensors on `device`; images and graph features in `dtype`."""
        out = {"views": batch["views"].to(device, dtype, non_blocking=True), "labels": batch["labels"].to(device)}
        if "controls" in batch:
            out["controls"] = batch["controls"].to(device, dtype, non_blocking=True)
        if "graphs" in batch:
            from micon.models.molecule import graphs_to_torch
            graphs = graphs_to_torch(batch["graphs"], device)
            graphs.atom_features = graphs.atom_features.to(dtype)
            graphs.bond_features = graphs.bond_features.to(dtype)
            out["graphs"] = graphs
        return out

    def __repr__(self) -> str:
        return f"<method {self.name}: {self.description}>"


class MiconMethod(Method):
    name = "micon"
    description = "PaCLR + counterfactual PaCLR (control embedding + compound -> treated embedding)"
    needs = DataNeeds(pairs=True, controls=True, graphs=True, negcon_sites=False)

    def build_model(self, cfg, in_chans, atom_dim=0, bond_dim=0):
        from micon.models.micon import MICON
        return MICON(build_image_encoder(cfg, in_chans), build_molecule_encoder(cfg, atom_dim, bond_dim),
                     projection_dim=cfg.projection_dim, detach_control=cfg.detach_control,
                     detach_target=cfg.detach_target)

    def chance_loss(self, examples, cfg):
        rows = 4 * examples        # two treated views and two controls per example
        cf = math.log(rows - 1) if cfg.counterfactual_mode == "union" else math.log(2 * examples)
        return math.log(rows - 1) + cfg.counterfactual_weight * cf

    def loss(self, model, batch, cfg):
        out = model(batch["views"], batch["controls"], batch["graphs"], batch["labels"])
        parts = losses.micon_loss(out, temperature=cfg.temperature, counterfactual_weight=cfg.counterfactual_weight,
                                  dmso_positives=cfg.dmso_positives, counterfactual_mode=cfg.counterfactual_mode,
                                  labels_are_global=True)
        return {k: v for k, v in parts.items() if isinstance(v, Tensor)}


class PaCLRMethod(Method):
    name = "paclr"
    description = "perturbation-aware contrastive on images only (replicates positive, same-plate DMSO negative)"
    needs = DataNeeds(pairs=True, controls=True, graphs=False, negcon_sites=False)

    def build_model(self, cfg, in_chans, atom_dim=0, bond_dim=0):
        from micon.models.micon import PaCLR
        return PaCLR(build_image_encoder(cfg, in_chans), projection_dim=cfg.projection_dim)

    def chance_loss(self, examples, cfg):
        return math.log(4 * examples - 1)

    def loss(self, model, batch, cfg):
        out = model(batch["views"], batch["controls"])
        return {"loss": losses.paclr_loss(out["treated"], out["control"], batch["labels"], cfg.temperature,
                                          dmso_positives=cfg.dmso_positives, labels_are_global=True)}


class CLIPMethod(Method):
    name = "clip"
    description = "direct image-compound alignment (CLOOME-like), replicate views averaged"
    needs = DataNeeds(pairs=True, controls=False, graphs=True, negcon_sites=False)

    def build_model(self, cfg, in_chans, atom_dim=0, bond_dim=0):
        from micon.models.micon import CLIP
        return CLIP(build_image_encoder(cfg, in_chans), build_molecule_encoder(cfg, atom_dim, bond_dim),
                    projection_dim=cfg.projection_dim)

    def chance_loss(self, examples, cfg):
        return math.log(examples)

    def loss(self, model, batch, cfg):
        out = model(batch["views"], batch["graphs"])
        return {"loss": losses.clip_loss(out["image"], out["molecule"], out["logit_scale"])}


class SimCLRMethod(Method):
    name = "simclr"
    description = "image-only contrastive (two augmentations of one site, every role)"
    needs = DataNeeds(pairs=False, controls=False, graphs=False, negcon_sites=True)

    def build_model(self, cfg, in_chans, atom_dim=0, bond_dim=0):
        from micon.models.micon import SimCLR
        return SimCLR(build_image_encoder(cfg, in_chans), projection_dim=cfg.projection_dim)

    def chance_loss(self, examples, cfg):
        return math.log(2 * examples - 1)

    def loss(self, model, batch, cfg):
        out = model(batch["views"])
        return {"loss": losses.simclr_loss(out["view1"], out["view2"], cfg.temperature)}


METHODS: dict[str, Method] = {m.name: m for m in (MiconMethod(), PaCLRMethod(), CLIPMethod(), SimCLRMethod())}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None
