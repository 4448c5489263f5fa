"""Multi-channel Cell Painting image encoders built from timm backbones.

Two ways to read C channels: "multichannel" (one backbone with in_chans=C) and MICON's "per_channel"
(every channel repeated to 3 and passed through one shared RGB backbone, features concatenated).
Random initialisation by default; `weights=` names pretrained weights (micon.models.pretrained: timm's tag from
the local cache, or a file), `input_norm="imagenet"` standardises each grey channel as an ImageNet RGB image on
the device, and `set_trainable` freezes all but the last stage or the whole backbone (the official recipe).
`use_channels_last()` feeds the backbone NHWC inputs (the same numbers in cuDNN's fast layout).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

# Named presets: timm model name + create_model kwargs. `img_size` marks backbones (ViTs) whose
# position embeddings depend on the input size; dynamic_img_size lets them run at other sizes too.
IMAGE_PRESETS: dict[str, dict[str, Any]] = {
    # the official MICON encoder (torchvision's ImageNet ResNet-101; timm's keys are torchvision's)
    "resnet101": {"timm_name": "resnet101", "kwargs": {}},
    "resnet50": {"timm_name": "resnet50", "kwargs": {}},
    # DINOv2 ViTs (timm's LVD-142M weights; 518 px native, any multiple of 14 with dynamic_img_size)
    "dinov2_vits14": {"timm_name": "vit_small_patch14_dinov2", "kwargs": {"dynamic_img_size": True},
                      "img_size": True},
    "dinov2_vitb14": {"timm_name": "vit_base_patch14_dinov2", "kwargs": {"dynamic_img_size": True},
                      "img_size": True},
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
InputNorm = Literal["auto", "imagenet", "none"]
Trainable = Literal["all", "last_stage", "head"]
TRAINABLE: tuple[str, ...] = ("all", "last_stage", "head")


def resolve_input_norm(input_norm: str, mode: str, pretrained: bool) -> str:
    """auto: ImageNet mean and std when RGB-pretrained weights read grey channels repeated to 3 (per_channel
    mode), else none (a multichannel network's first convolution is refitted to other channels; imagenet there
    standardises channel c with RGB channel c % 3's statistics, the filters adapt_input_conv gave it)."""
    if input_norm != "auto":
        return input_norm
    return "imagenet" if pretrained and mode == "per_channel" else "none"


def create_backbone(preset: str, in_chans: int, *, img_size: int | None = None, **timm_kwargs: Any) -> nn.Module:
    """A randomly initialised timm feature extractor (num_classes=0: pooled features [N, num_features]) from a
    preset name; timm never downloads here (weights come through micon.models.pretrained)."""
    import timm  # heavy import, deferred so `import micon.models` stays cheap

    if preset not in IMAGE_PRESETS:
        raise ValueError(f"unknown image encoder preset {preset!r}; choose one of {', '.join(IMAGE_PRESETS)}")
    spec = IMAGE_PRESETS[preset]
    kwargs = {**spec["kwargs"], **timm_kwargs}
    if img_size is not None:
        if not spec.get("img_size"):
            raise ValueError(f"preset {preset!r} is convolutional and takes any image size; drop img_size")
        kwargs["img_size"] = img_size
    return timm.create_model(spec["timm_name"], pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)


def last_stage_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """The parameter-name prefixes of a backbone's last stage: a ResNet's `layer4` (timm's last feature stage),
    a ViT's last quarter of blocks (3 of 12) and its final norm."""
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks):
        n = len(blocks)
        return tuple(f"blocks.{i}." for i in range(n - max(1, n // 4), n)) + ("norm.", "fc_norm.", "head_drop.")
    info = getattr(backbone, "feature_info", None)
    if info:
        last = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
        return (f"{last}.",)
    raise ValueError(f"{type(backbone).__name__}: no last stage known (no feature_info or blocks)")


class ImageEncoder(nn.Module):
    """Image [B, C, H, W] -> embedding [B, out_dim].

    mode="multichannel": one backbone with in_chans=C, out_dim = num_features.
    mode="per_channel" (official MICON): each channel repeated to 3, one shared 3-channel backbone,
    optionally a shared linear map to `per_channel_dim` (official: 200), features concatenated in
    channel order: out_dim = C * (per_channel_dim or num_features). Costs C backbone passes per image.
    """

    def __init__(self, preset: str = "resnet50", in_chans: int = 5, mode: ImageMode = "per_channel", *,
                 weights: str = "", input_norm: str = "auto", trainable: str = "all", img_size: int | None = None,
                 per_channel_dim: int | None = None, **timm_kwargs: Any) -> None:
        super().__init__()
        if mode not in ("per_channel", "multichannel"):
            raise ValueError(f"image encoder mode must be 'per_channel' or 'multichannel', got {mode!r}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if per_channel_dim is not None and mode != "per_channel":
            raise ValueError("per_channel_dim only applies to mode='per_channel'")
        self.mode, self.in_chans, self.preset = mode, in_chans, preset
        from micon.models.pretrained import is_pretrained, load_backbone_weights, resolve_weights

        self.backbone = create_backbone(preset, 3 if mode == "per_channel" else in_chans, img_size=img_size,
                                        **timm_kwargs)
        self.weights_report = ""   # what the pretrained weights gave the backbone (for the log)
        if is_pretrained(weights):
            state, source = resolve_weights(weights, IMAGE_PRESETS[preset]["timm_name"])
            self.weights_report = str(load_backbone_weights(self.backbone, state, source))
        self.input_norm = resolve_input_norm(input_norm, mode, is_pretrained(weights))
        if self.input_norm not in ("imagenet", "none"):
            raise ValueError(f"input_norm must be auto, imagenet or none, got {input_norm!r}")
        from micon.models.pretrained import IMAGENET_MEAN, IMAGENET_STD
        # per_channel: the RGB statistics on each grey channel's three copies; multichannel: channel c takes RGB
        # channel c % 3's, as timm's adapt_input_conv gives it that channel's filters. Not in the state dict
        # (persistent=False): a constant of the recipe, rebuilt from the record
        n = 3 if mode == "per_channel" else in_chans
        self.register_buffer("rgb_mean", torch.tensor([IMAGENET_MEAN[c % 3] for c in range(n)]).view(1, n, 1, 1),
                             persistent=False)
        self.register_buffer("rgb_std", torch.tensor([IMAGENET_STD[c % 3] for c in range(n)]).view(1, n, 1, 1),
                             persistent=False)
        feat = int(self.backbone.num_features)
        self.channel_proj = nn.Linear(feat, per_channel_dim) if per_channel_dim else nn.Identity()
        per_channel = per_channel_dim or feat
        self.out_dim = in_chans * per_channel if mode == "per_channel" else feat
        self.channels_last = False
        self.trainable = "all"
        self.set_trainable(trainable)

    def set_trainable(self, trainable: str) -> "ImageEncoder":
        """all: every parameter trains. last_stage (the official recipe, `finetune: true`): only the backbone's
        last stage (ResNet layer4, a ViT's last blocks) and what follows it (the per-channel projection; the
        method's heads are outside the encoder and always train). head: the backbone is frozen entirely. Frozen
        parameters get requires_grad=False (the trainer leaves them out of the optimiser) and frozen batch norm
        stays in eval mode (its running statistics are part of the pretrained weights)."""
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
        keep = () if trainable == "head" else last_stage_prefixes(self.backbone) if trainable == "last_stage" else None
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(keep is None or name.startswith(keep))
        self.trainable = trainable
        return self.train(self.training)

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()
        return self

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
            if self.input_norm == "imagenet":
                images = (images - self.rgb_mean.to(images.dtype)) / self.rgb_std.to(images.dtype)
            return self.backbone(self._layout(images))
        b, c, h, w = images.shape
        rgb = images.reshape(b * c, 1, h, w).expand(b * c, 3, h, w)
        if self.input_norm == "imagenet":
            rgb = (rgb - self.rgb_mean.to(rgb.dtype)) / self.rgb_std.to(rgb.dtype)
        return self.channel_proj(self.backbone(self._layout(rgb))).reshape(b, -1)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
