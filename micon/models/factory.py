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
from micon.models.image import ImageMode, InputNorm, Trainable

MoleculeEncoder = Literal["dmpnn", "fingerprint", "table"]
MOLECULE_ENCODERS: tuple[str, ...] = typing.get_args(MoleculeEncoder)
# what each molecule encoder reads: the stream delivers the compound in this form
MOLECULE_INPUTS: dict[str, MoleculeInput] = {"dmpnn": "graph", "fingerprint": "fingerprint", "table": "table"}


@dataclass
class ModelConfig:
    preset: str = "tiny"             # image encoder preset: tiny, resnet18, resnet50, vit_small_patch16_224...
    mode: ImageMode = "multichannel"  # multichannel | per_channel (official MICON)
    per_channel_dim: NonNegativeInt = 0  # per_channel only: project each channel's features to this size (0 = no)
    pretrained: str = "false"        # backbone weights: false | timm (timm's default tag, from the local Hugging
                                     # Face cache; timm:TAG for another) | a weights file or URL (.safetensors, or
                                     # a .pth/.pt state dict with timm or torchvision names; local or s3://)
    trainable: Trainable = "all"     # all | last_stage (ResNet layer4 / a ViT's last blocks + the heads: the
                                     # official recipe) | head (the backbone frozen)
    input_norm: InputNorm = "auto"   # auto (imagenet for pretrained weights in per_channel mode, else none) |
                                     # imagenet (ImageNet mean/std on each channel repeated to RGB) | none
    init: str = ""                   # start the image encoder from another run's (its directory, a step or a
                                     # model.pt); its architecture, channels and sizes must be this run's
    img_size: NonNegativeInt = 0     # ViT presets: the training crop size (0 = the preset's default)
    molecule: MoleculeEncoder = "dmpnn"   # dmpnn (molecular graph) | fingerprint (Morgan bits, MLP) | table
                                          # (frozen per-compound vectors from model.molecule_table, MLP)
    molecule_table: str = ""         # molecule=table: parquet of Metadata_JCP2022 + N numeric columns (e.g. Uni-Mol
                                     # cls_repr computed elsewhere), local or s3://
    molecule_dim: PositiveInt = 256  # molecule encoder width
    molecule_depth: PositiveInt = 3  # dmpnn only: message-passing steps
    projection_dim: PositiveInt = 128  # size of the contrastive embedding
    detach_control: bool = True      # official: True
    detach_target: bool = True       # official: True; both False = gradients reach the image encoder


def build_image_encoder(cfg: ModelConfig, in_chans: int, load_weights: bool = True) -> nn.Module:
    """The image encoder `cfg` describes; `load_weights=False` builds it without reading model.pretrained (a
    checkpoint's own weights follow), with the same input normalisation and trainable parts."""
    from micon.models.image import ImageEncoder, resolve_input_norm
    from micon.models.pretrained import is_pretrained

    kwargs = {}
    if cfg.per_channel_dim:
        kwargs["per_channel_dim"] = cfg.per_channel_dim
    if cfg.img_size:
        kwargs["img_size"] = cfg.img_size
    pretrained = is_pretrained(cfg.pretrained)
    return ImageEncoder(cfg.preset, in_chans=in_chans, mode=cfg.mode,
                        weights=str(cfg.pretrained) if pretrained and load_weights else "",
                        input_norm=resolve_input_norm(cfg.input_norm, cfg.mode, pretrained),
                        trainable=cfg.trainable, **kwargs)


def build_molecule_encoder(cfg: ModelConfig, atom_dim: int, bond_dim: int, fingerprint_bits: int = 0,
                           table_dim: int = 0) -> nn.Module:
    """The molecule encoder `cfg.molecule` names; its input sizes come from the graph store (the featuriser's
    atom and bond layout, the store's fingerprint size) or the vector table's width, never from a constant here."""
    from micon.models.molecule import DMPNNEncoder, FingerprintMLP

    if cfg.molecule == "dmpnn":
        return DMPNNEncoder(atom_dim, bond_dim, hidden_dim=cfg.molecule_dim, depth=cfg.molecule_depth)
    if cfg.molecule == "fingerprint":
        if fingerprint_bits <= 0:
            raise ValueError("model.molecule=fingerprint needs the fingerprint size of the graph store it reads "
                             "(its n_bits); got none")
        return FingerprintMLP(n_bits=fingerprint_bits, hidden_dim=cfg.molecule_dim * 2, out_dim=cfg.molecule_dim)
    if cfg.molecule == "table":
        if table_dim <= 0:
            raise ValueError("model.molecule=table needs the width of the vector table it reads; got none")
        # the vectors are frozen inputs (the stream reads them from the table); this MLP is what trains
        return FingerprintMLP(n_bits=table_dim, hidden_dim=cfg.molecule_dim * 2, out_dim=cfg.molecule_dim)
    raise ValueError(f"unknown molecule encoder {cfg.molecule!r}; choose one of {', '.join(MOLECULE_ENCODERS)}")
