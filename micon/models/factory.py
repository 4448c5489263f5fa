"""Build a method's model from its configuration (shared by training and embedding)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

METHODS = ("micon", "paclr", "clip", "simclr")


@dataclass
class ModelConfig:
    preset: str = "tiny"             # image encoder preset: tiny, resnet18, resnet50, vit_small_patch16_224...
    mode: str = "multichannel"       # multichannel | per_channel (official MICON)
    per_channel_dim: int = 0         # per_channel only: project each channel's features to this size (0 = no)
    pretrained: bool = False         # timm weights (needs internet; never in tests)
    img_size: int = 0                # ViT presets: the training crop size (0 = the preset's default)
    molecule: str = "dmpnn"          # dmpnn | fingerprint
    molecule_dim: int = 256
    molecule_depth: int = 3
    projection_dim: int = 128
    detach_control: bool = True      # official: True
    detach_target: bool = True       # official: True; both False = gradients reach the image encoder


def build_model(method: str, cfg: ModelConfig, in_chans: int, atom_dim: int = 0, bond_dim: int = 0,
                n_bits: int = 2048) -> nn.Module:
    from micon.models.image import ImageEncoder
    from micon.models.micon import CLIP, MICON, SimCLR
    from micon.models.molecule import DMPNNEncoder, FingerprintMLP

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    kwargs = {}
    if cfg.per_channel_dim:
        kwargs["per_channel_dim"] = cfg.per_channel_dim
    if cfg.img_size:
        kwargs["img_size"] = cfg.img_size
    image = ImageEncoder(cfg.preset, in_chans=in_chans, mode=cfg.mode, pretrained=cfg.pretrained, **kwargs)
    if method in ("simclr", "paclr"):
        return SimCLR(image, projection_dim=cfg.projection_dim)
    if cfg.molecule == "dmpnn":
        molecule = DMPNNEncoder(atom_dim, bond_dim, hidden_dim=cfg.molecule_dim, depth=cfg.molecule_depth)
    elif cfg.molecule == "fingerprint":
        molecule = FingerprintMLP(n_bits=n_bits, hidden_dim=cfg.molecule_dim * 2, out_dim=cfg.molecule_dim)
    else:
        raise ValueError(f"unknown molecule encoder {cfg.molecule!r}; choose dmpnn or fingerprint")
    if method == "clip":
        return CLIP(image, molecule, projection_dim=cfg.projection_dim)
    return MICON(image, molecule, projection_dim=cfg.projection_dim, detach_control=cfg.detach_control,
                 detach_target=cfg.detach_target)
