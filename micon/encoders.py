"""Where site embeddings come from, as one interface (`open_encoder`): a training checkpoint, that run's
network as initialised (untrained:RUN), a pretrained backbone frozen (pretrained:PRESET[:WEIGHTS]), a named
featuriser (cellprofiler, ...) or a synthetic screen's ground truth (truth:SCREEN). Each takes a
preprocessed batch of sites and returns their embeddings; the embed job (evaluate/embed.py) runs them
over the shards, in process or as Ray actors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from micon.checkpoint import CheckpointError, load_checkpoint
from micon.config import load_config
from micon.data.preprocess import SitePreprocessor
from micon.data.shards import Manifest, read_tar_encoded
from micon.embeddings import META_COLUMNS, identity_key, sha256_file
from micon.eval.featurisers import FEATURISERS, get_featuriser


class CheckpointEncoder:
    """A trained checkpoint's image encoder: sites preprocessed exactly as in training (micon.data.preprocess,
    settings from the checkpoint's record), the embedding before any projection head. The checkpoint's record
    is read (and its channels checked) on construction; the network is built by `load`, in the actor."""

    input_dtype = np.float32
    uses_gpu = True
    reads_images = True

    def __init__(self, ckpt: str, manifest: Manifest):
        self.checkpoint = load_checkpoint(ckpt)
        check_channels(self.checkpoint.record.channels, manifest)
        self.manifest, self.name = manifest, self.checkpoint.record.method
        self.prep = SitePreprocessor(self.manifest, self.checkpoint.preprocessing())

    def describe(self) -> str:
        rec = self.checkpoint.record
        return f"{rec.method} image encoder ({rec.model['preset']}, step {rec.step}) from {self.checkpoint.path}"

    def notes(self) -> list[str]:
        return [f"plate {plate} has no DMSO sites; its sites are normalised with the screen-wide DMSO average, "
                f"as in training" for plate in self.manifest.plates_without_dmso()]

    def identity(self) -> dict:
        rec = self.checkpoint.record
        return {"method": rec.method, "path": str(self.checkpoint.path), "step": rec.step,
                "sha256": sha256_file(self.checkpoint.path), "preprocessing": rec.preprocessing}

    def embed_info(self) -> dict:
        return {}

    def load(self, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(max(threads, 1))
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = self.checkpoint.build_model().to(self.device)
        self._pinned: list = []      # a ring of pinned host buffers, each with the event of its last copy
        self._slot = -1
        self._stats: dict = {}       # plate -> (mean, std) [C] tensors on the device

    def prepare(self, images: np.ndarray, plates: list[str]) -> np.ndarray:
        return self.prep.batch(images, plates)

    def prepare_into(self, site: np.ndarray, plate: str, out: np.ndarray) -> None:
        self.prep.into(site, plate, out)

    def embed(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            # the image encoder's embedding, before any projection head: what profiles are built from
            return self.model.image_encoder(torch.from_numpy(x).to(self.device)).float().cpu().numpy()

    def device_inputs(self, sites: np.ndarray, plates: list[str]):
        """uint8 sites [n, C, H, W] -> the model input on the GPU: copied through pinned memory without
        waiting (non_blocking), then (float32(x) - mean) / std per plate, as SitePreprocessor does on the CPU.
        Tensor / tensor division (never by a scalar, which CUDA turns into a multiplication by its
        reciprocal) is IEEE division on both, so the inputs are the same bits."""
        import torch

        self._slot = slot = (self._slot + 1) % 2
        if slot == len(self._pinned) or self._pinned[slot][0].shape != sites.shape:
            if slot < len(self._pinned):
                self._pinned[slot][1].synchronize()
            fresh = (torch.empty(sites.shape, dtype=torch.uint8).pin_memory(), torch.cuda.Event())
            self._pinned[slot:slot + 1] = [fresh]
        host, done = self._pinned[slot]
        done.synchronize()            # the copy that last read this buffer has finished
        host.numpy()[...] = sites
        x = host.to(self.device, non_blocking=True)
        done.record()
        offset, scale = zip(*(self._plate_stats(p) for p in plates))
        offset, scale = torch.stack(offset)[:, :, None, None], torch.stack(scale)[:, :, None, None]
        return (x.to(torch.float32) - offset) / scale

    def _plate_stats(self, plate: str):
        import torch

        if plate not in self._stats:
            if self.prep.preprocessing.normalize == "plate":
                mean, std = self.prep.stats(plate)
            else:
                mean, std = np.zeros(len(self.manifest.channels), np.float32), np.full(
                    len(self.manifest.channels), 255.0, np.float32)
            self._stats[plate] = (torch.from_numpy(mean).to(self.device), torch.from_numpy(std).to(self.device))
        return self._stats[plate]

    def embed_sites(self, sites: np.ndarray, plates: list[str]):
        """uint8 sites as decoded -> embeddings, left on the device (a torch tensor) until the shard is done."""
        import torch

        with torch.no_grad():
            if self.device.type == "cuda":
                return self.model.image_encoder(self.device_inputs(sites, plates)).float()
            return self.model.image_encoder(torch.from_numpy(self.prep.batch(sites, plates))).float()


class UntrainedEncoder(CheckpointEncoder):
    """`untrained:CKPT`: the network of run CKPT as it was initialised (same architecture, channels,
    preprocessing and seed: micon.checkpoint.Checkpoint.untrained), never updated."""

    def __init__(self, ckpt: str, manifest: Manifest):
        super().__init__(ckpt, manifest)
        self.checkpoint = self.checkpoint.untrained()
        self.name = "untrained"

    def describe(self) -> str:
        return f"untrained {super().describe()} (initial weights, seed {self.checkpoint.config.get('seed', 0)})"

    def identity(self) -> dict:
        return {**super().identity(), "method": "untrained", "initialised_as": self.checkpoint.record.method}


class PretrainedEncoder(CheckpointEncoder):
    """`pretrained:PRESET[:WEIGHTS]`: a pretrained backbone as a frozen featuriser (the field's reference rows:
    ImageNet ResNet-101, DINOv2). Each channel is repeated to RGB and standardised with ImageNet's statistics
    (sites scaled to 0..1 first, as the weights expect), features concatenated in channel order. WEIGHTS is a
    weights file or URL (micon.models.pretrained), or `timm` (the default: timm's tag from the local cache)."""

    def __init__(self, spec: str, manifest: Manifest):
        from micon.data.preprocess import Preprocessing
        from micon.models.image import IMAGE_PRESETS

        preset, _, weights = spec.partition(":")
        if preset not in IMAGE_PRESETS:
            raise CheckpointError(f"pretrained:{spec}: unknown preset {preset!r}; choose one of "
                                  f"{', '.join(IMAGE_PRESETS)} (pretrained:PRESET[:WEIGHTS])")
        self.preset, self.weights = preset, weights or "timm"
        from micon import storage
        from micon.models.pretrained import WeightsError, timm_cached_file

        try:   # found here, naming it, not in an actor: timm's file in the local cache, or the file itself
            if self.weights == "timm" or self.weights.startswith("timm:"):
                self.weights = timm_cached_file(IMAGE_PRESETS[preset]["timm_name"], self.weights.partition(":")[2])
            elif not storage.path(self.weights).is_file():
                raise WeightsError(f"pretrained:{spec}: no weights file at {self.weights}")
        except WeightsError as e:
            raise CheckpointError(str(e)) from None
        self.manifest, self.name, self.checkpoint = manifest, f"pretrained_{preset}", None
        self.prep = SitePreprocessor(manifest, Preprocessing(normalize="none"))
        self.weights_report = ""

    def describe(self) -> str:
        return (f"pretrained {self.preset} (frozen, per channel, ImageNet normalisation) from {self.weights}"
                + (f": {self.weights_report}" if self.weights_report else ""))

    def notes(self) -> list[str]:
        return []

    def identity(self) -> dict:
        from micon import storage

        local = not storage.is_url(self.weights) and Path(self.weights).is_file()
        return {"method": self.name, "featuriser": self.name, "preset": self.preset, "weights": self.weights,
                "sha256": sha256_file(Path(self.weights)) if local else "", "preprocessing": {"normalize": "none",
                                                                                             "input_norm": "imagenet"}}

    def load(self, threads: int = 1) -> None:
        import torch

        from micon.models.image import ImageEncoder
        from micon.models.pretrained import WeightsError

        torch.set_num_threads(max(threads, 1))
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        try:
            encoder = ImageEncoder(self.preset, in_chans=len(self.manifest.channels), mode="per_channel",
                                   weights=self.weights, input_norm="imagenet", trainable="head")
        except WeightsError as e:
            raise CheckpointError(str(e)) from None
        self.weights_report = encoder.weights_report
        self.model = torch.nn.Module()
        self.model.image_encoder = encoder.eval().to(self.device)
        self._pinned, self._slot, self._stats = [], -1, {}


class FeaturiserEncoder:
    """A named featuriser (micon.eval.featurisers: CellProfiler-grade features, image statistics) on the
    uint8 sites as stored; embed.json lists its feature names."""

    input_dtype = np.uint8
    uses_gpu = False
    reads_images = True

    def __init__(self, name: str, manifest: Manifest):
        self.featuriser = get_featuriser(name)
        self.manifest, self.name = manifest, self.featuriser.name
        self.names = self.featuriser.feature_names(manifest.channels)   # fails here on a missing channel

    def describe(self) -> str:
        return f"{self.name} features ({len(self.names)}: {self.featuriser.description})"

    def notes(self) -> list[str]:
        return []

    def identity(self) -> dict:
        return {"featuriser": self.name, "method": self.name,
                "features": identity_key({"names": self.names, "settings": self.featuriser.settings()})}

    def embed_info(self) -> dict:
        return {"feature_names": self.names}

    def load(self, threads: int = 1) -> None:
        pass

    def prepare(self, images: np.ndarray, plates: list[str]) -> np.ndarray:
        return images

    def prepare_into(self, site: np.ndarray, plate: str, out: np.ndarray) -> None:
        out[...] = site

    def embed(self, x: np.ndarray) -> np.ndarray:
        return self.featuriser.embed(x, self.manifest.channels)

    def embed_sites(self, sites: np.ndarray, plates: list[str]) -> np.ndarray:
        return self.featuriser.embed(sites, self.manifest.channels)


class TruthSource:
    """`truth:SCREEN`: every site gets its well's oracle profile (micon.eval.oracle) from the synthetic
    screen's ground_truth/ (compounds.csv, config.yaml). No image is read: the rows come from the shard
    set's site index, so the profiles go through evaluation exactly as any method's embeddings do."""

    uses_gpu = False
    reads_images = False

    def __init__(self, screen: str, manifest: Manifest):
        from micon.eval.oracle import FEATURE_NAMES
        from micon.synth import SynthConfig

        truth = Path(screen) / "ground_truth"
        if not (truth / "compounds.csv").is_file() or not (truth / "config.yaml").is_file():
            raise FileNotFoundError(f"truth:{screen}: no ground_truth/compounds.csv and config.yaml there; pass "
                                    f"the directory ./launch.sh synth wrote")
        self.truth, self.manifest, self.name, self.names = truth, manifest, "oracle", list(FEATURE_NAMES)
        self.config = load_config(SynthConfig, truth / "config.yaml")

    def describe(self) -> str:
        return f"oracle: each well's true phenotype (log morphology factors) from {self.truth}"

    def notes(self) -> list[str]:
        return []

    def identity(self) -> dict:
        return {"method": "oracle", "featuriser": "oracle", "truth": str(self.truth),
                "sha256": sha256_file(self.truth / "compounds.csv"),
                "config": sha256_file(self.truth / "config.yaml")}

    def embed_info(self) -> dict:
        return {"feature_names": self.names}

    def site_table(self) -> tuple[pd.DataFrame, np.ndarray]:
        from micon.eval.oracle import oracle_well_profiles

        sites = site_rows(self.manifest)
        return sites, oracle_well_profiles(sites, pd.read_csv(self.truth / "compounds.csv"),
                                           self.config).astype(np.float32)


# CKPT of the form KIND:ARG: reference sources beside the checkpoints and featurisers
SOURCES = {"untrained": UntrainedEncoder, "truth": TruthSource, "pretrained": PretrainedEncoder}


def check_channels(trained: list[str], manifest: Manifest) -> None:
    if list(trained) != list(manifest.channels):
        raise CheckpointError(f"the checkpoint was trained on channels {trained} but the shards in {manifest.root} "
                              f"hold {manifest.channels}: re-ingest them in the training order")


def open_encoder(ckpt: str, manifest: Manifest):
    """CKPT is a featuriser's registered name, KIND:ARG of SOURCES, or a checkpoint path; fails here,
    naming it, not in an actor."""
    kind, _, arg = ckpt.partition(":")
    if arg and kind in SOURCES:
        return SOURCES[kind](arg, manifest)
    return FeaturiserEncoder(ckpt, manifest) if ckpt in FEATURISERS else CheckpointEncoder(ckpt, manifest)


def site_rows(manifest: Manifest) -> pd.DataFrame:
    """Every site's Metadata_* row in manifest order (the order of the embeddings): from the shard set's
    site index when prep wrote one, else from the shards' JSON members."""
    index = manifest.root / "site_index.parquet"
    if index.is_file():
        table = pd.read_parquet(index)
        order = {s["name"]: i for i, s in enumerate(manifest.data["shards"])}
        table = table.assign(_o=table["shard"].map(order)).sort_values(["_o", "offset"], kind="stable")
        return table[META_COLUMNS].astype(str).reset_index(drop=True)
    rows = [{c: str(meta.get(c, "")) for c in META_COLUMNS} for s in manifest.shard_paths()
            for _, _, _, meta in read_tar_encoded(s, manifest.shard_checksums().get(Path(s).name))]
    return pd.DataFrame(rows, columns=META_COLUMNS)
