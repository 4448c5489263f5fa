"""Training methods as objects: MICON and its baselines declare what their examples need, build their
model and compute their own loss. The trainer, the data stream and the benchmarks ask a method; they
never compare its name (dinov2's SSLMetaArch, open_clip's TrainingTask).

    method = get_method("micon")
    needs = method.data_needs(model_cfg)             # what the stream must deliver for this model
    model = method.build_model(model_cfg, in_chans=5, **method.feature_dims(model_cfg, fingerprint_bits))
    parts = method.loss(model, method.to_device(batch, device, dtype), loss_cfg)   # {"loss": ..., ...}

Pure: no process group set-up, no I/O.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from micon import losses
from micon.config import NonNegativeFloat, PositiveFloat
from micon.data.needs import DataNeeds
from micon.models.factory import MOLECULE_INPUTS, ModelConfig, build_image_encoder, build_molecule_encoder

CounterfactualMode = Literal["union", "cross"]


@dataclass
class LossConfig:
    temperature: PositiveFloat = 0.1     # softmax temperature of the contrastive losses
    counterfactual_weight: NonNegativeFloat = 1.0  # lambda in PaCLR + lambda * counterfactual
    counterfactual_mode: CounterfactualMode = "union"   # union (official) | cross
    dmso_positives: bool = False         # False: the paper (DMSO only negatives); True: the official code


# the keys a method that reads molecules reads (data.graphs: the store they come from)
MOLECULE_OPTIONS = ("model.molecule", "model.molecule_dim", "model.molecule_depth", "model.molecule_table", "data.graphs")


class Method:
    """One training method. Subclasses set `name`, `needs`, `description`, `options` and implement the hooks."""

    name: str = ""
    description: str = ""
    needs: DataNeeds = DataNeeds()
    # the method-specific configuration keys it reads; another method's keys are unused with this one
    options: frozenset[str] = frozenset()

    @property
    def images_per_example(self) -> int:
        """Images read per example: two views (replicates or augmentations) plus one control per view."""
        return 2 * (2 if self.needs.controls else 1)

    def data_needs(self, cfg: ModelConfig | None = None) -> DataNeeds:
        """What the stream delivers for this method with model `cfg`: its declared needs, with the compound
        in the form the configured molecule encoder reads (graph or fingerprint)."""
        if not self.needs.molecules:
            return self.needs
        return dataclasses.replace(self.needs, molecule_input=MOLECULE_INPUTS[(cfg or ModelConfig()).molecule])

    def feature_dims(self, cfg: ModelConfig | None = None, fingerprint_bits: int = 0, table_dim: int = 0) -> dict:
        """Input sizes of the molecule encoder for model `cfg` (all 0 for a method that reads no molecules):
        the featuriser's atom and bond feature sizes for graphs, `fingerprint_bits` (the graph store's
        n_bits) for fingerprints, `table_dim` (the vector table's width) for a table. These go into the
        checkpoint's record."""
        needs = self.data_needs(cfg)
        dims = {"atom_dim": 0, "bond_dim": 0, "fingerprint_bits": 0, "table_dim": 0}
        if needs.graphs:
            from micon.chem.featurizer import ATOM_DIM, BOND_DIM
            dims.update(atom_dim=ATOM_DIM, bond_dim=BOND_DIM)
        if needs.fingerprints:
            if fingerprint_bits <= 0:
                raise ValueError("model.molecule=fingerprint: pass the graph store's fingerprint size (its n_bits)")
            dims.update(fingerprint_bits=fingerprint_bits)
        if needs.vectors:
            if table_dim <= 0:
                raise ValueError("model.molecule=table: pass the vector table's width")
            dims.update(table_dim=table_dim)
        return dims

    def build_model(self, cfg: ModelConfig, in_chans: int, atom_dim: int = 0, bond_dim: int = 0,
                    fingerprint_bits: int = 0, table_dim: int = 0, load_weights: bool = True) -> nn.Module:
        raise NotImplementedError

    def chance_loss(self, examples: int, cfg: LossConfig) -> float:
        """The loss of an encoder that tells nothing apart (uniform softmax), for `examples` in the gathered
        batch: the level a learning run must fall well below."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict, cfg: LossConfig) -> dict[str, Tensor]:
        """{"loss": scalar to backpropagate, other scalars to log}; `batch` already on the device."""
        raise NotImplementedError

    def to_device(self, batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
        """The stream's CPU batch -> tensors on `device`; images and molecule features in `dtype`. The
        compounds (a graph batch or fingerprint bits, whichever the stream delivered) become "molecules"."""
        # every copy is queued, none waits for the device: the loader pins the tensors it delivers (non_blocking
        # copies of those return at once) and the graphs are pinned here (a copy from pageable memory would wait
        # for the device's queue to drain first)
        out = {"views": batch["views"].to(device, dtype, non_blocking=True),
               "labels": batch["labels"].to(device, non_blocking=True)}
        if "controls" in batch:
            out["controls"] = batch["controls"].to(device, dtype, non_blocking=True)
        if "graphs" in batch:
            from micon.models.molecule import graphs_to_torch
            graphs = graphs_to_torch(batch["graphs"])
            graphs = graphs.pin().to(device, non_blocking=True) if device.type == "cuda" else graphs
            graphs.atom_features = graphs.atom_features.to(dtype)
            graphs.bond_features = graphs.bond_features.to(dtype)
            out["molecules"] = graphs
        if "fingerprints" in batch:
            out["molecules"] = batch["fingerprints"].to(device, dtype, non_blocking=True)
        if "vectors" in batch:
            out["molecules"] = batch["vectors"].to(device, dtype, non_blocking=True)
        return out

    # zero-shot prediction (evaluate/predict.py): a method that maps a molecule to a profile says how
    predicts: bool = False

    def predict_profiles(self, model: nn.Module, molecules, controls: Tensor | None) -> Tensor:
        """Compounds -> predicted profiles [B, D] in the space `match_images` maps image embeddings into;
        `controls` [N, d]: image-encoder embeddings of DMSO sites (for a method whose needs.controls)."""
        raise NotImplementedError(f"method {self.name} does not predict profiles from molecules")

    def match_images(self, model: nn.Module, embeddings: Tensor) -> Tensor:
        """Image-encoder embeddings [N, d] (what embed writes) -> the space of predict_profiles."""
        raise NotImplementedError(f"method {self.name} does not predict profiles from molecules")

    def __repr__(self) -> str:
        return f"<method {self.name}: {self.description}>"


class MiconMethod(Method):
    name = "micon"
    description = "PaCLR + counterfactual PaCLR (control embedding + compound -> treated embedding)"
    needs = DataNeeds(pairs=True, controls=True, molecules=True, negcon_sites=False)
    options = frozenset({"loss.temperature", "loss.counterfactual_weight", "loss.counterfactual_mode",
                         "loss.dmso_positives", "model.detach_control", "model.detach_target", *MOLECULE_OPTIONS})

    def build_model(self, cfg, in_chans, atom_dim=0, bond_dim=0, fingerprint_bits=0, table_dim=0, load_weights=True):
        from micon.models.micon import MICON
        return MICON(build_image_encoder(cfg, in_chans, load_weights),
                     build_molecule_encoder(cfg, atom_dim, bond_dim, fingerprint_bits, table_dim),
                     projection_dim=cfg.projection_dim, detach_control=cfg.detach_control,
                     detach_target=cfg.detach_target)

    def chance_loss(self, examples, cfg):
        rows = 4 * examples        # two treated views and two controls per example
        cf = math.log(rows - 1) if cfg.counterfactual_mode == "union" else math.log(2 * examples)
        return math.log(rows - 1) + cfg.counterfactual_weight * cf

    def loss(self, model, batch, cfg):
        out = model(batch["views"], batch["controls"], batch["molecules"], batch["labels"])
        parts = losses.micon_loss(out, temperature=cfg.temperature, counterfactual_weight=cfg.counterfactual_weight,
                                  dmso_positives=cfg.dmso_positives, counterfactual_mode=cfg.counterfactual_mode,
                                  labels_are_global=True)
        return {k: v for k, v in parts.items() if isinstance(v, Tensor)}

    predicts = True

    def predict_profiles(self, model, molecules, controls):
        # the counterfactual generator from each DMSO control and the compound, averaged over the controls:
        # a treated image embedding (R^d, the space of normalised image embeddings)
        compound = model.embed_molecules(molecules)
        ctrl = self.match_images(model, controls)
        b, n, d = compound.shape[0], ctrl.shape[0], ctrl.shape[1]
        return model.generate(ctrl[None].expand(b, n, d), compound[:, None].expand(b, n, d)).mean(dim=1)

    def match_images(self, model, embeddings):
        return torch.nn.functional.normalize(embeddings, dim=-1) if model.normalize_embeddings else embeddings


class PaCLRMethod(Method):
    name = "paclr"
    description = "perturbation-aware contrastive on images only (replicates positive, same-plate DMSO negative)"
    needs = DataNeeds(pairs=True, controls=True, molecules=False, negcon_sites=False)
    options = frozenset({"loss.temperature", "loss.dmso_positives"})

    def build_model(self, cfg, in_chans, atom_dim=0, bond_dim=0, fingerprint_bits=0, table_dim=0, load_weights=True):
        from micon.models.micon import PaCLR
        return PaCLR(build_image_encoder(cfg, in_chans, load_weights), projection_dim=cfg.projection_dim)

    def chance_loss(self, examples, cfg):
        return math.log(4 * examples - 1)

    def loss(self, model, batch, cfg):
        out = model(batch["views"], batch["controls"])
        return {"loss": losses.paclr_loss(out["treated"], out["control"], batch["labels"], cfg.temperature,
                                          dmso_positives=cfg.dmso_positives, labels_are_global=True)}


class CLIPMethod(Method):
    name = "clip"
    description = "direct image-compound alignment (CLOOME-like), replicate views averaged"
    needs = DataNeeds(pairs=True, controls=False, molecules=True, negcon_sites=False)
    options = frozenset(MOLECULE_OPTIONS)   # its temperature is learned (logit scale), not loss.temperature

    def build_model(self, cfg, in_chans, atom_dim=0, bond_dim=0, fingerprint_bits=0, table_dim=0, load_weights=True):
        from micon.models.micon import CLIP
        return CLIP(build_image_encoder(cfg, in_chans, load_weights),
                    build_molecule_encoder(cfg, atom_dim, bond_dim, fingerprint_bits, table_dim),
                    projection_dim=cfg.projection_dim)

    def chance_loss(self, examples, cfg):
        return math.log(examples)

    def loss(self, model, batch, cfg):
        out = model(batch["views"], batch["molecules"])
        return {"loss": losses.clip_loss(out["image"], out["molecule"], out["logit_scale"])}

    predicts = True

    def predict_profiles(self, model, molecules, controls):
        # the molecule tower: the shared image-molecule space of the projection heads
        return model.molecule_projector(model.molecule_encoder(molecules))

    def match_images(self, model, embeddings):
        h = torch.nn.functional.normalize(embeddings, dim=-1) if model.normalize_embeddings else embeddings
        return model.image_projector(h)


class SimCLRMethod(Method):
    name = "simclr"
    description = "image-only contrastive (two augmentations of one site, every role)"
    needs = DataNeeds(pairs=False, controls=False, molecules=False, negcon_sites=True)
    options = frozenset({"loss.temperature"})

    def build_model(self, cfg, in_chans, atom_dim=0, bond_dim=0, fingerprint_bits=0, table_dim=0, load_weights=True):
        from micon.models.micon import SimCLR
        return SimCLR(build_image_encoder(cfg, in_chans, load_weights), projection_dim=cfg.projection_dim)

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
