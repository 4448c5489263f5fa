"""Models: multi-channel image encoders (timm), molecule encoders (D-MPNN, fingerprint MLP), heads,
and the MICON, SimCLR and CLIP modules that tie them together. Forwards only; losses live in micon.losses.
"""
from micon.models.heads import CounterfactualGenerator, ProjectionHead
from micon.models.image import IMAGE_PRESETS, ImageEncoder, create_backbone
from micon.models.micon import CLIP, MICON, PaCLR, SimCLR, stack_views
from micon.models.molecule import DMPNNEncoder, FingerprintMLP, TorchGraph, graphs_to_torch

__all__ = [
    "CLIP", "IMAGE_PRESETS", "MICON", "CounterfactualGenerator", "DMPNNEncoder", "FingerprintMLP",
    "ImageEncoder", "PaCLR", "ProjectionHead", "SimCLR", "TorchGraph", "create_backbone", "graphs_to_torch",
    "stack_views",
]
