"""MICON (image encoder + molecule encoder + projection heads + counterfactual generator) and the
PaCLR, SimCLR and CLIP baselines built from the same parts.

Forwards return dicts of the tensors the losses in micon.losses need; no loss is computed here.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from micon.models.heads import CounterfactualGenerator, ProjectionHead
from micon.models.image import ImageEncoder

Views = Tensor | Sequence[Tensor]


def stack_views(views: Views, name: str = "images") -> Tensor:
    """[B, V, C, H, W] tensor, or a sequence of V tensors [B, C, H, W] -> [B, V, C, H, W]."""
    if not isinstance(views, Tensor):
        views = torch.stack(list(views), dim=1)
    if views.dim() != 5:
        raise ValueError(f"{name} must be [B, V, C, H, W] or a list of V tensors [B, C, H, W], "
                         f"got shape {tuple(views.shape)}")
    return views


class _ImageEmbedder(nn.Module):
    def __init__(self, image_encoder: ImageEncoder, normalize_embeddings: bool) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.normalize_embeddings = normalize_embeddings

    def embed_images(self, images: Tensor) -> Tensor:
        """images [N, C, H, W] -> image embeddings [N, d] (L2-normalised if normalize_embeddings)."""
        h = self.image_encoder(images)
        return F.normalize(h, dim=-1) if self.normalize_embeddings else h

    def _embed_views(self, *groups: Tensor) -> list[Tensor]:
        """Encode several [B, V, C, H, W] groups in one encoder call; returns [B, V, d] each."""
        flat = torch.cat([g.flatten(0, 1) for g in groups])
        h = self.embed_images(flat)
        out, start = [], 0
        for g in groups:
            n = g.shape[0] * g.shape[1]
            out.append(h[start:start + n].reshape(g.shape[0], g.shape[1], -1))
            start += n
        return out


class MICON(_ImageEmbedder):
    """Molecule-image contrastive learning with a counterfactual generator.

    Dimensions: image embedding d = image_encoder.out_dim, projection p = projection_dim. The molecule
    embedding is projected to d (official `pre_mol_projector`) and G([control; compound]) predicts a
    treated image embedding in R^d. Treated, control, generated and target embeddings share one image
    projection head (official), so both contrastive losses are computed in R^p.

    Gradient switches (official: both True): detach_control feeds G a detached control embedding;
    detach_target detaches the real treated embedding used as counterfactual target. With both True the
    counterfactual loss trains G, the molecule encoder and the projection head but never reaches the
    image encoder; with both False it also trains the image encoder.

    Sizing: G's hidden layer defaults to 2d, so with per_channel ResNet-50 (d = 5 x 2048) set
    `per_channel_dim` on the encoder (official: 200, d = 1000) or `generator_hidden`.
    """

    def __init__(self, image_encoder: ImageEncoder, molecule_encoder: nn.Module, *, projection_dim: int = 512,
                 projection_hidden: int | None = None, molecule_hidden: int | None = None,
                 generator_hidden: int | None = None, dropout: float = 0.0, detach_control: bool = True,
                 detach_target: bool = True, normalize_embeddings: bool = True) -> None:
        super().__init__(image_encoder, normalize_embeddings)
        d = image_encoder.out_dim
        self.molecule_encoder = molecule_encoder
        self.image_projector = ProjectionHead(d, projection_dim, projection_hidden, dropout)
        self.molecule_projector = ProjectionHead(molecule_encoder.out_dim, d, molecule_hidden, dropout)
        self.generator = CounterfactualGenerator(d, d, generator_hidden, dropout)
        self.detach_control, self.detach_target = detach_control, detach_target
        self.embed_dim, self.projection_dim = d, projection_dim

    def embed_molecules(self, molecules: Any) -> Tensor:
        """Molecule batch (TorchGraph for D-MPNN, [B, n_bits] for fingerprints) -> compound embedding [B, d]."""
        return self.molecule_projector(self.molecule_encoder(molecules))

    def generate(self, control_embedding: Tensor, compound_embedding: Tensor) -> Tensor:
        """G: control embedding [..., d] + compound embedding [..., d] -> predicted treated embedding [..., d]."""
        return self.generator(control_embedding, compound_embedding)

    def forward(self, treated: Views, controls: Views, molecules: Any, labels: Tensor | None = None) -> dict[str, Tensor]:
        """treated, controls: [B, V, C, H, W] (or V tensors [B, C, H, W]); controls[:, v] is the same-plate
        DMSO control paired with treated[:, v]. molecules: the B compounds' batch for the molecule
        encoder. labels [B] compound labels (default arange(B), i.e. each example its own compound).

        Returns treated, control, generated, target: projected [B, V, p]; labels [B]; and, for
        logging/evaluation, treated_embedding, control_embedding [B, V, d] and compound_embedding [B, d].
        """
        treated, controls = stack_views(treated, "treated"), stack_views(controls, "controls")
        if controls.shape[:2] != treated.shape[:2]:
            raise ValueError(f"need one control per treated view: treated {tuple(treated.shape[:2])} vs "
                             f"controls {tuple(controls.shape[:2])} ([B, V])")
        b, v = treated.shape[:2]
        h_treated, h_control = self._embed_views(treated, controls)
        compound = self.embed_molecules(molecules)
        if compound.shape[0] != b:
            raise ValueError(f"molecule batch has {compound.shape[0]} compounds but there are {b} examples")
        if labels is None:
            labels = torch.arange(b, device=treated.device)
        elif labels.shape != (b,):
            raise ValueError(f"labels must be [B]={b}, got shape {tuple(labels.shape)}")

        control_in = h_control.detach() if self.detach_control else h_control
        target = h_treated.detach() if self.detach_target else h_treated
        generated = self.generate(control_in, compound[:, None].expand(b, v, compound.shape[1]))
        # two projector calls, not one: a loss that uses only one pair then leaves no (zero) gradient
        # path into the image encoder through the other
        z_treated, z_control = self.image_projector(torch.cat([h_treated, h_control], dim=1)).split(v, dim=1)
        z_generated, z_target = self.image_projector(torch.cat([generated, target], dim=1)).split(v, dim=1)
        return {"treated": z_treated, "control": z_control, "generated": z_generated, "target": z_target,
                "labels": labels, "treated_embedding": h_treated, "control_embedding": h_control,
                "compound_embedding": compound}


class SimCLR(_ImageEmbedder):
    """Image-only contrastive baseline: image encoder + projection head (d -> p).

    forward(views [B, 2, C, H, W] or (x1, x2)) -> {"view1": [B, p], "view2": [B, p]} for `simclr_loss`.
    """

    def __init__(self, image_encoder: ImageEncoder, *, projection_dim: int = 128, projection_hidden: int | None = None,
                 dropout: float = 0.0, normalize_embeddings: bool = True) -> None:
        super().__init__(image_encoder, normalize_embeddings)
        self.projector = ProjectionHead(image_encoder.out_dim, projection_dim, projection_hidden, dropout)

    def forward(self, views: Views) -> dict[str, Tensor]:
        views = stack_views(views, "views")
        if views.shape[1] != 2:
            raise ValueError(f"SimCLR needs exactly 2 views per image, got {views.shape[1]}")
        (h,) = self._embed_views(views)
        z = self.projector(h)
        return {"view1": z[:, 0], "view2": z[:, 1]}


class PaCLR(_ImageEmbedder):
    """MICON's image side alone (perturbation-aware contrastive, no molecule): image encoder + projection
    head (d -> p) applied to treated views and their same-plate DMSO controls.

    forward(treated, controls: [B, V, C, H, W]) -> {"treated": [B, V, p], "control": [B, V, p]} for `paclr_loss`.
    """

    def __init__(self, image_encoder: ImageEncoder, *, projection_dim: int = 128, projection_hidden: int | None = None,
                 dropout: float = 0.0, normalize_embeddings: bool = True) -> None:
        super().__init__(image_encoder, normalize_embeddings)
        self.projector = ProjectionHead(image_encoder.out_dim, projection_dim, projection_hidden, dropout)

    def forward(self, treated: Views, controls: Views) -> dict[str, Tensor]:
        treated, controls = stack_views(treated, "treated"), stack_views(controls, "controls")
        h_treated, h_control = self._embed_views(treated, controls)
        return {"treated": self.projector(h_treated), "control": self.projector(h_control)}


class CLIP(_ImageEmbedder):
    """Direct image-compound alignment baseline (CLOOME-like): both sides projected to p, and a learnable
    log logit scale initialised to log(1/init_temperature), used as exp(.) clamped at max_logit_scale.

    forward(images [B, C, H, W] or [B, V, C, H, W], molecules) ->
    {"image": [B, p] or [B, V, p], "molecule": [B, p], "logit_scale": scalar} for `clip_loss`.
    """

    def __init__(self, image_encoder: ImageEncoder, molecule_encoder: nn.Module, *, projection_dim: int = 512,
                 projection_hidden: int | None = None, molecule_hidden: int | None = None, dropout: float = 0.0,
                 init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 normalize_embeddings: bool = True) -> None:
        super().__init__(image_encoder, normalize_embeddings)
        self.molecule_encoder = molecule_encoder
        self.image_projector = ProjectionHead(image_encoder.out_dim, projection_dim, projection_hidden, dropout)
        self.molecule_projector = ProjectionHead(molecule_encoder.out_dim, projection_dim, molecule_hidden, dropout)
        # shape [1], not a 0-d scalar: DeepSpeed's parameter broadcast cannot view a 0-d tensor as bytes
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.max_logit_scale = max_logit_scale

    def forward(self, images: Tensor, molecules: Any) -> dict[str, Tensor]:
        if images.dim() == 4:
            z_image = self.image_projector(self.embed_images(images))
        else:
            (h,) = self._embed_views(stack_views(images))
            z_image = self.image_projector(h)
        z_molecule = self.molecule_projector(self.molecule_encoder(molecules))
        if z_molecule.shape[0] != z_image.shape[0]:
            raise ValueError(f"{z_molecule.shape[0]} compounds for {z_image.shape[0]} images")
        return {"image": z_image, "molecule": z_molecule,
                "logit_scale": self.logit_scale.exp().clamp(max=self.max_logit_scale)[0]}
