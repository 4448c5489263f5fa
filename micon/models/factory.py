"""Model configuration and the encoders every method builds from (shared by training and embedding).

Which encoders a method combines, and how, is the method's business (micon.methods); this module
only turns a `ModelConfig` into an image encoder and a molecule encoder. It imports no method.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from torch import nn

from micon.config import NonNegativeInt, PositiveInt
from micon.data.needs import MoleculeInput
from micon.models.image import ImageMode

MoleculeEncoder = Literal["dmpnn", "fingerprint"]
MOLECULE_ENCODERS: tuple[str, ...] = typing.get_args(MoleculeEncoder)
# what each molecule encoder reads: the stream delivers the compound in this form
MOLECULE_INPUTS: dict[str, MoleculeInput] = {"dmpnn": "graph", "fingerprint": "fingerprint"}


@dataclass
class ModelConfig:
    preset: str = "tiny"             # image encoder preset: tiny, resnet18, resnet50, vit_small_patch16_224...
    mode: ImageMode = "multichannel"  # multichannel | per_channel (official MICON)
    per_channel_dim: NonNegativeInt = 0  # per_channel only: project each channel's features to this size (0 = no)
    pretrained: bool = False         # timm's ImageNet weights for the backbone (downloads them, or reads timm's
                                     # cache: for clusters that have them; never in tests)
    init: str = ""                   # start the image encoder from another run's (its directory, a step or a
                                     # model.pt); its architecture, channels and sizes must be this run's
    img_size: NonNegativeInt = 0     # ViT presets: the training crop size (0 = the preset's default)
    molecule: MoleculeEncoder = "dmpnn"   # dmpnn (molecular graph) | fingerprint (Morgan bits, MLP)
    molecule_dim: PositiveInt = 256  # molecule encoder width
    molecule_depth: PositiveInt = 3  # dmpnn only: message-passing steps
    projection_dim: PositiveInt = 128  # size of the contrastive embedding
    detach_control: bool = True      # official: True
    detach_target: bool = True       # official: True; both False = gradients reach the image encoder


def build_image_encoder(cfg: ModelConfig, in_chans: int) -> nn.Module:
    from micon.models.image import ImageEncoder

    kwargs = {}
    if cfg.per_channel_dim:
        kwargs["per_channel_dim"] = cfg.per_channel_dim
    if cfg.img_size:
        kwargs["img_size"] = cfg.img_size
    return ImageEncoder(cfg.preset, in_chans=in_chans, mode=cfg.mode, pretrained=cfg.pretrained, **kwargs)


def build_molecule_encoder(cfg: ModelConfig, atom_dim: int, bond_dim: int, fingerprint_bits: int = 0) -> nn.Module:
    """The molecule encoder `cfg.molecule` names; its input sizes come from the graph store (the featuriser's
    atom and bond layout, the store's fingerprint size), never from a constant here."""
    from micon.models.molecule import DMPNNEncoder, FingerprintMLP

    if cfg.molecule == "dmpnn":
        return DMPNNEncoder(atom_dim, bond_dim, hidden_dim=cfg.molecule_dim, depth=cfg.molecule_depth)
    if cfg.molecule == "fingerprint":
        if fingerprint_bits <= 0:
            raise ValueError("model.molecule=fingerprint needs the fingerprint size of the graph store it reads "
                             "(its n_bits); got none")
        return FingerprintMLP(n_bits=fingerprint_bits, hidden_dim=cfg.molecule_dim * 2, out_dim=cfg.molecule_dim)
    raise ValueError(f"unknown molecule encoder {cfg.molecule!r}; choose one of {', '.join(MOLECULE_ENCODERS)}")
