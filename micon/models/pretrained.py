"""Pretrained backbone weights from where a cluster keeps them: timm's tag in the local Hugging Face / timm cache,
or a weights file (safetensors, or a torch state dict with timm or torchvision key names), local or in object
storage. Loading reports missing and unexpected keys and refuses a shape mismatch, naming the first tensor.

Never downloads in tests: a file is read as given, and `timm` reads the local cache first (under HF_HUB_OFFLINE
it reads nothing else). Turns weights into a backbone's tensors; knows nothing of methods or training.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import torch
from torch import nn

# prefixes a saved state dict may carry around the backbone's own names: DDP/DataParallel, Lightning and
# wrappers, our own checkpoints' image encoder
STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "image_encoder.backbone.", "image_encoder.")
# the classifier of an ImageNet model: our backbones have none (num_classes=0), so these keys are dropped
CLASSIFIER_KEYS = ("fc.", "head.", "classifier.", "head_dist.")
# ImageNet's input statistics (timm's IMAGENET_DEFAULT_MEAN / STD; torchvision's are the same)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESTAGE_HELP = ("pre-stage them on a machine with internet: `hf download {repo} model.safetensors` (then copy "
                 "the hub cache, {cache}, to the same place on the cluster, or point HF_HOME at a copy), or pass "
                 "model.pretrained=/path/or/s3/url/to/weights.safetensors")


class WeightsError(ValueError):
    """Pretrained weights that cannot be found or do not fit; the message is one line for a person."""


@dataclass
class LoadReport:
    """What a weights file gave a backbone."""

    source: str
    loaded: int = 0
    values: int = 0
    missing: list[str] = field(default_factory=list)      # backbone tensors the file lacks (left as initialised)
    unexpected: list[str] = field(default_factory=list)   # file tensors the backbone has no place for
    dropped: list[str] = field(default_factory=list)      # the file's ImageNet classifier (num_classes=0 here)
    adapted: str = ""                                      # how the first convolution was fitted to the channels

    def __str__(self) -> str:
        def few(keys: list[str]) -> str:
            return f"{len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"

        parts = [f"{self.loaded} tensors ({self.values:,} values) from {self.source}",
                 f"missing {few(self.missing)}" if self.missing else "missing 0",
                 f"unexpected {few(self.unexpected)}" if self.unexpected else "unexpected 0"]
        if self.dropped:
            parts.append(f"classifier dropped ({len(self.dropped)} tensors)")
        if self.adapted:
            parts.append(self.adapted)
        return "; ".join(parts)


def is_pretrained(spec: str) -> bool:
    """model.pretrained names weights (timm's tag, a file or URL), not `false`."""
    return str(spec).strip().lower() not in ("", "false", "none", "0", "no")


def read_state_dict(source: str) -> dict[str, torch.Tensor]:
    """A weights file (local path or fsspec URL) -> {name: tensor}: `.safetensors`, or a torch file holding a
    state dict (possibly under "state_dict" or "model"), loaded with weights_only=True (it can never run code)."""
    from micon import storage

    try:
        data = storage.read_bytes(storage.path(source)) if storage.is_url(source) else open(source, "rb").read()
    except FileNotFoundError:
        raise WeightsError(f"model.pretrained={source}: no such weights file") from None
    except OSError as e:
        raise WeightsError(f"model.pretrained={source}: cannot read it ({e})") from None
    name = PurePosixPath(str(source).split("?")[0]).name
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors
            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:   # any parse error: one line for a person
        raise WeightsError(f"model.pretrained={source}: not a readable weights file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}); give a .safetensors file or a "
                           f".pth/.pt state dict") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and not isinstance(state.get(key), torch.Tensor):
            state = state[key]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"model.pretrained={source}: holds no tensors (expected a state dict)")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def timm_cached_file(timm_name: str, tag: str = "") -> str:
    """The weights file of timm's pretrained tag (its default when `tag` is empty): from the local Hugging Face
    cache; downloaded only when it is missing and HF_HUB_OFFLINE is not set. Refuses with one line naming the
    model, the cache searched and how to pre-stage the file."""
    import huggingface_hub
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    full = f"{timm_name}.{tag}" if tag else timm_name
    cfg = get_pretrained_cfg(full)
    if cfg is None or not cfg.hf_hub_id:
        raise WeightsError(f"model.pretrained=timm{':' + tag if tag else ''}: timm has no Hugging Face weights for "
                           f"{full}; pass model.pretrained=/path/to/weights.safetensors")
    repo = cfg.hf_hub_id
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = huggingface_hub.try_to_load_from_cache(repo, filename, cache_dir=cache)
        if isinstance(hit, str):
            return hit
    offline = str(os.environ.get("HF_HUB_OFFLINE", "")).lower() in ("1", "true", "yes", "on") or constants.HF_HUB_OFFLINE
    if offline:
        raise WeightsError(f"model.pretrained=timm: no weights for {full} ({repo}) in the Hugging Face cache "
                           f"{cache} and HF_HUB_OFFLINE is set; " + PRESTAGE_HELP.format(repo=repo, cache=cache))
    try:
        return huggingface_hub.hf_hub_download(repo, "model.safetensors", cache_dir=cache)
    except Exception as e:
        raise WeightsError(f"model.pretrained=timm: {full} ({repo}) is not in {cache} and could not be downloaded "
                           f"({type(e).__name__}); " + PRESTAGE_HELP.format(repo=repo, cache=cache)) from None


def _strip(state: dict[str, torch.Tensor], here: set[str]) -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix that the backbone's own names lack (the longest that makes keys match)."""
    for prefix in STRIP_PREFIXES:
        if any(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in here):
            stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if len(set(stripped) & here) > len(set(state) & here):
                state = stripped
    return state


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> LoadReport:
    """Copy a state dict into a timm backbone. timm's own checkpoint filter for the architecture runs first
    (it converts, e.g., original DINOv2 names and resamples ViT position embeddings to the model's size). The
    first convolution is fitted to the backbone's input channels as timm does for `in_chans` (`adapt_input_conv`:
    for C > 3 the RGB filters are repeated over the channels and scaled by 3/C, for 1 channel summed), so a
    multichannel model starts from ImageNet filters. Refuses a shape mismatch naming the first tensor."""
    import sys

    from timm.models import adapt_input_conv

    here = backbone.state_dict()
    state = _strip(dict(state), set(here))
    report = LoadReport(source)
    report.dropped = sorted(k for k in state if k.startswith(CLASSIFIER_KEYS) and k not in here)
    state = {k: v for k, v in state.items() if k not in report.dropped}
    filter_fn = getattr(sys.modules.get(type(backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, backbone)
        except Exception:   # a filter for another layout: compare the names as they are
            pass
    first_conv = (getattr(backbone, "pretrained_cfg", None) or {}).get("first_conv")
    key = f"{first_conv}.weight" if first_conv else None
    if key and key in state and key in here and state[key].shape[1] != here[key].shape[1] \
            and state[key].shape[0] == here[key].shape[0] and state[key].shape[2:] == here[key].shape[2:]:
        got = state[key].shape[1]
        state[key] = adapt_input_conv(here[key].shape[1], state[key].float())
        report.adapted = (f"first convolution {key} fitted from {got} to {here[key].shape[1]} input channels "
                          f"(timm's adapt_input_conv)")
    for k, v in state.items():
        if k in here and tuple(v.shape) != tuple(here[k].shape):
            raise WeightsError(f"model.pretrained={source}: tensor {k} has shape {list(v.shape)} in the file but "
                               f"{list(here[k].shape)} in {type(backbone).__name__}; these weights are for another "
                               f"architecture or size (check model.preset)")
    report.missing = sorted(k for k in here if k not in state)
    report.unexpected = sorted(k for k in state if k not in here)
    common = [k for k in here if k in state]
    if not common:
        raise WeightsError(f"model.pretrained={source}: none of its {len(state)} tensors is a tensor of "
                           f"{type(backbone).__name__} (first in the file: {next(iter(state), 'none')}, first here: "
                           f"{next(iter(here), 'none')}); these weights are for another architecture")
    backbone.load_state_dict({k: state[k].to(here[k].dtype) for k in common}, strict=False)
    report.loaded, report.values = len(common), sum(state[k].numel() for k in common)
    return report


def resolve_weights(spec: str, timm_name: str) -> tuple[dict[str, torch.Tensor], str]:
    """model.pretrained -> (state dict, where it came from): `timm` or `timm:TAG` (timm's pretrained tag from the
    local cache), else a file path or URL."""
    spec = str(spec).strip()
    if spec.lower() in ("true", "yes", "1"):   # the old boolean switch: timm's default tag
        spec = "timm"
    if spec == "timm" or spec.startswith("timm:"):
        path = timm_cached_file(timm_name, spec.partition(":")[2])
        return read_state_dict(path), path
    return read_state_dict(spec), spec
