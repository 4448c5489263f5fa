"""Multi-channel Cell Painting image encoders built from timm backbones.

Two ways to read C channels: "multichannel" (one backbone with in_chans=C) and MICON's "per_channel"
(every channel repeated to 3 and passed through one shared RGB backbone, features concatenated).
Random initialisation by default; `pretrained=True` downloads timm weights, so tests never set it.
`use_channels_last()` feeds the backbone NHWC inputs (the same numbers in cuDNN's fast layout).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

# Named presets: timm model name + create_model kwargs. `img_size` marks backbones (ViTs) whose
# position embeddings depend on the input size; dynamic_img_size lets them run at other sizes too.
IMAGE_PRESETS: dict[str, dict[str, Any]] = {
    "resnet50": {"timm_name": "resnet50", "kwargs": {}},
    "vit_small_patch16_224": {"timm_name": "vit_small_patch16_224", "kwargs": {"dynamic_img_size": True},
                              "img_size": True},
    # small ones for CPU demos and tests
    "resnet18": {"timm_name": "resnet18", "kwargs": {}},
    "resnet10t": {"timm_name": "resnet10t", "kwargs": {}},
    "vit_tiny_patch16_224": {"timm_name": "vit_tiny_patch16_224", "kwargs": {"dynamic_img_size": True},
                             "img_size": True},
    "tiny": {"timm_name": "resnet10t", "kwargs": {}},
}

ImageMode = Literal["per_channel", "multichannel"]


def create_backbone(preset: str, in_chans: int, *, pretrained: bool = False, img_size: int | None = None,
                    **timm_kwargs: Any) -> nn.Module:
    """A timm feature extractor (num_classes=0: pooled features [N, num_features]) from a preset name."""
    import timm  # heavy import, deferred so `import micon.models` stays cheap

    if preset not in IMAGE_PRESETS:
        raise ValueError(f"unknown image encoder preset {preset!r}; choose one of {', '.join(IMAGE_PRESETS)}")
    spec = IMAGE_PRESETS[preset]
    kwargs = {**spec["kwargs"], **timm_kwargs}
    if img_size is not None:
        if not spec.get("img_size"):
            raise ValueError(f"preset {preset!r} is convolutional and takes any image size; drop img_size")
        kwargs["img_size"] = img_size
    return timm.create_model(spec["timm_name"], pretrained=pretrained, num_classes=0, in_chans=in_chans, **kwargs)


class ImageEncoder(nn.Module):
    """Image [B, C, H, W] -> embedding [B, out_dim].

    mode="multichannel": one backbone with in_chans=C, out_dim = num_features.
    mode="per_channel" (official MICON): each channel repeated to 3, one shared 3-channel backbone,
    optionally a shared linear map to `per_channel_dim` (official: 200), features concatenated in
    channel order: out_dim = C * (per_channel_dim or num_features). Costs C backbone passes per image.
    """

    def __init__(self, preset: str = "resnet50", in_chans: int = 5, mode: ImageMode = "per_channel", *,
                 pretrained: bool = False, img_size: int | None = None, per_channel_dim: int | None = None,
                 **timm_kwargs: Any) -> None:
        super().__init__()
        if mode not in ("per_channel", "multichannel"):
            raise ValueError(f"image encoder mode must be 'per_channel' or 'multichannel', got {mode!r}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if per_channel_dim is not None and mode != "per_channel":
            raise ValueError("per_channel_dim only applies to mode='per_channel'")
        self.mode, self.in_chans, self.preset = mode, in_chans, preset
        self.backbone = create_backbone(preset, 3 if mode == "per_channel" else in_chans,
                                        pretrained=pretrained, img_size=img_size, **timm_kwargs)
        feat = int(self.backbone.num_features)
        self.channel_proj = nn.Linear(feat, per_channel_dim) if per_channel_dim else nn.Identity()
        per_channel = per_channel_dim or feat
        self.out_dim = in_chans * per_channel if mode == "per_channel" else feat
        self.channels_last = False

    def use_channels_last(self) -> "ImageEncoder":
        """Every input in channels_last (NHWC) memory: convolutions then run in the layout cuDNN's tensor cores
        are fastest in and hand NHWC activations on through the network. The weights keep their layout
        (convolutions take them in either; DeepSpeed's ZeRO holds parameters as views of one flat buffer, which
        a layout change would cut off from the optimizer), so values and state dicts are unchanged."""
        self.channels_last = True
        return self

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"expected images [B, {self.in_chans}, H, W], got shape {tuple(images.shape)}")
        if self.mode == "multichannel":
            return self.backbone(self._layout(images))
        b, c, h, w = images.shape
        rgb = images.reshape(b * c, 1, h, w).expand(b * c, 3, h, w)
        return self.channel_proj(self.backbone(self._layout(rgb))).reshape(b, -1)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
