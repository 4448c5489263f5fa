"""The training job's configuration tree (YAML + key=value overrides), printed and saved with the run."""
from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from micon.config import (ConfigError, Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                          PositiveInt, Range)
from micon.data.pipeline import Augment
from micon.data.preprocess import NORMALIZATIONS
from micon.data.replicate_sets import PAIR_LEVELS
from micon.eval.recipes import RECIPES
from micon.methods import METHODS, LossConfig, get_method
from micon.models.factory import ModelConfig
from micon.models.image import IMAGE_PRESETS

# enumerated choices are Literal types: parsing rejects anything else, and option_choices() lists them
MethodName = Literal[tuple(METHODS)]
StreamMode = Literal["auto", "replicate_sets", "plates"]
PairLevel = Literal[PAIR_LEVELS]
Normalization = Literal[NORMALIZATIONS]
Precision = Literal["auto", "bf16", "fp32"]
OptimizerKernel = Literal["auto", "fused", "foreach", "for_loop"]
Switch = Literal["auto", "on", "off"]
OnNonfinite = Literal["stop", "skip"]


@dataclass
class DataConfig:
    shards: str = ""                 # prep output directory (manifest.json)
    graphs: str = ""                 # featurize output directory (micon, clip)
    num_workers: NonNegativeInt = 0  # DataLoader workers per rank
    stream: StreamMode = "auto"           # auto (replicate sets when the method pairs replicates) | replicate_sets | plates
    shuffle_buffer: PositiveInt = 128  # raw samples shuffled before decoding
    pair_buffer: PositiveInt = 4096  # treated sites waiting for a replicate partner (plate stream)
    pair_prefer: PairLevel = "source"     # source | batch | plate | well
    pair_within_source: bool = False  # replicate sets: pair a well with another batch of its own source first
                                      # (a source-specific phenotype is shared there), then another source
    resample: bool = False           # draw shards with replacement instead of epoch by epoch
    normalize: Normalization = "plate"       # plate | none
    include_poscon: bool = False     # positive controls as compounds too
    augment: Augment = field(default_factory=lambda: Augment(crop=0, flip=True, rot90=True, intensity_jitter=0.1))


@dataclass
class OptimConfig:
    lr: NonNegativeFloat = 1e-3  # AdamW peak learning rate
    weight_decay: NonNegativeFloat = 0.05  # AdamW weight decay
    warmup_steps: NonNegativeInt = 10  # linear warm-up steps, then cosine decay
    min_lr_ratio: Fraction = 0.1  # the cosine ends at lr * min_lr_ratio
    grad_clip: NonNegativeFloat = 1.0  # gradient norm clip (0 = none)
    kernel: OptimizerKernel = "auto"  # AdamW's implementation: auto (fused on GPUs, foreach on CPU) | fused |
                                     # foreach | for_loop (torch's per-tensor loop, the slowest)


@dataclass
class EngineConfig:
    zero_stage: Annotated[int, Range(0, 2)] = 1  # DeepSpeed ZeRO stage: 0, 1 or 2
    precision: Precision = "auto"        # auto (bf16 where the GPU has it, else fp32) | bf16 | fp32
    grad_accum: PositiveInt = 1      # micro-steps per optimizer step
    dist_timeout_s: PositiveFloat = 120.0  # a dead rank fails the others after this long
    channels_last: Switch = "auto"   # image encoder inputs in NHWC: auto = on GPUs (cuDNN's fast layout); on
                                     # CPU 1.5x faster at 1 thread, mixed at 2 (docs/BENCHMARKS.md): set on
                                     # or off to choose there
    compile: bool = False            # torch.compile the image encoder (pays on GPUs for long runs; minutes to
                                     # compile, and no gain measured on CPU)


@dataclass
class WandbConfig:
    enabled: bool = True             # log to wandb (offline unless mode/WANDB_MODE says online)
    project: str = "micon"           # wandb project
    entity: str = ""                 # wandb team or user ("" = your default)
    mode: str = ""                   # "" = $WANDB_MODE or offline; online needs WANDB_API_KEY
    name: str = ""                   # run name ("" = the out= directory's name: runs/exp1/train -> train)
    group: str = ""                  # the experiment's group, which embed and evaluate join by default ("" = the
                                     # out= directory's parent folder's name: runs/exp1/train -> exp1)
    tags: str = ""                   # comma-separated tags (the method is always one)
    log_checkpoints: bool = False    # log each checkpoint's model.pt as a wandb artifact (type model, aliases
                                     # latest, step-N, best) by reference: nothing uploaded (micon.wandb_runs)
    log_every: PositiveInt = 1       # log metrics (wandb and metrics.jsonl, means over the steps since the last
                                     # log) every this many steps: the only steps that wait for the device


ValMetric = Literal["", "nsb_top1", "nsb_top10", "nss_top1", "nss_top10", "map_activity"]
Recipe = Literal[tuple(RECIPES)]


@dataclass
class ValConfig:
    every: NonNegativeInt = 0        # score held-out wells every this many steps (0 = off): embedded in-process
                                     # with the live network, profiled and scored as evaluate does
                                     # (micon.eval.validation), logged as val/<metric>
    split: str = "heldout_compounds"  # heldout_batches | heldout_compounds | heldout_source (the shard set's
                                      # splits) | plates:PLATE,PLATE
    max_wells: PositiveInt = 512     # at most this many wells, their plates' DMSO wells included (compounds in a
                                     # seeded order, whole, until the next would pass it); their sites are read
                                     # once and kept in memory
    recipe: Recipe = "micon"         # evaluate's profile recipe: micon | jump | morphohelm
    keep_best: ValMetric = ""        # keep the checkpoint with the best val/<metric> outside the rotation, as
                                     # checkpoints/best (nsb_top1 | nsb_top10 | nss_top1 | nss_top10 |
                                     # map_activity; "" = none)
    patience: NonNegativeInt = 0     # stop after this many validations without a better val.keep_best metric
                                     # (nsb_top10 when keep_best is unset); 0 = never


@dataclass
class TrainConfig:
    method: MethodName = "micon"          # micon | paclr | clip | simclr (micon.methods)
    out: str = "runs/train"          # run directory: checkpoints, config, wandb, final.json
    steps: PositiveInt = 100         # optimizer steps
    micro_batch: Annotated[int, Range(2, why="contrastive losses need negatives")] = 8  # examples per rank per micro-step
    seed: NonNegativeInt = 0         # model initialisation and data shuffle seed
    ckpt_every: PositiveInt = 50     # save a checkpoint every this many steps (and at the end)
    keep_ckpts: NonNegativeInt = 2   # newest checkpoints kept on disk (0 = all)
    export: str = ""                 # also copy the finished run's model.pt and final.json here (a directory or
                                     # s3://bucket/prefix; final.json last); "" = none
    resume: str = "latest"           # latest | none | force (latest, even with other data, method or model:
                                     # the change is logged in OUT/run.json) | a step directory name
    on_nonfinite: OnNonfinite = "stop"     # stop | skip (drop the batch on every rank; not counted as a step)
    max_skips_in_a_row: PositiveInt = 10  # on_nonfinite=skip: stop after this many non-finite batches in a row
    progress: bool = True            # progress bar on rank 0
    deterministic: bool = False      # one seed reproduces bit for bit (torch's deterministic algorithms, cuDNN
                                     # without autotuning); on CPU at the same thread count
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    val: ValConfig = field(default_factory=ValConfig)

    def get(self, key: str) -> Any:
        """The value of a dotted key (`model.molecule`)."""
        return functools.reduce(getattr, key.split("."), self)

    def validate(self) -> None:
        for key, choices in option_choices().items():   # also for a tree built in code rather than parsed
            if self.get(key) not in choices:
                raise ConfigError(f"{key}={self.get(key)!r}: choose one of {', '.join(map(str, choices))}")
        if not self.data.shards:
            raise ConfigError("data.shards is required: the directory written by ./launch.sh prep")
        if self.export:
            from micon import storage
            try:
                storage.check_url(self.export, "export")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        needs = get_method(self.method).data_needs(self.model)
        if needs.vectors and not self.model.molecule_table:
            raise ConfigError("model.molecule=table needs model.molecule_table: a parquet of Metadata_JCP2022 and "
                              "numeric columns (e.g. Uni-Mol cls_repr), local or s3://")
        if needs.molecules and not needs.vectors and not self.data.graphs:
            raise ConfigError(f"method={self.method} needs data.graphs: the directory written by ./launch.sh featurize")
        if self.model.preset not in IMAGE_PRESETS:
            raise ConfigError(f"model.preset={self.model.preset!r}: choose one of {', '.join(IMAGE_PRESETS)}")
        if self.val.every:
            from micon.eval.validation import ValidationError, check_split
            try:
                check_split(self.val.split)
            except ValidationError as e:
                raise ConfigError(str(e)) from None
        problems = self.impossible()
        if problems:
            raise ConfigError(problems[0])

    def impossible(self) -> list[str]:
        """Combinations that cannot run, one line each naming both keys (start-up refuses them)."""
        method, model, out = get_method(self.method), self.model, []
        if self.data.stream == "replicate_sets" and not method.needs.pairs:
            out.append(f"method={self.method} with data.stream=replicate_sets: the method reads single sites and "
                       f"replicate sets hold paired wells; use data.stream=plates or auto")
        if model.per_channel_dim and model.mode != "per_channel":
            out.append(f"model.per_channel_dim={model.per_channel_dim} with model.mode={model.mode}: the size of "
                       f"each channel's features applies to per_channel mode only; set model.mode=per_channel "
                       f"or model.per_channel_dim=0")
        if model.img_size and not IMAGE_PRESETS.get(model.preset, {}).get("img_size"):
            out.append(f"model.img_size={model.img_size} with model.preset={model.preset}: a convolutional preset "
                       f"takes any image size (img_size is for ViT presets); drop model.img_size")
        return out

    def unused(self) -> list[str]:
        """Settings that differ from their default but that this run never reads, one line each naming the key
        that makes them unused (logged once at start-up, not refused)."""
        method, default, out = get_method(self.method), TrainConfig(), []
        others = set().union(*(m.options for m in METHODS.values())) - method.options
        for key in sorted(others):
            if self.get(key) != default.get(key):
                out.append(f"{key}={self.get(key)} is unused: method={self.method} does not read it")
        if self.data.stream == "replicate_sets" or not method.needs.pairs:
            why = "data.stream=replicate_sets" if method.needs.pairs else f"method={self.method} (no pairs)"
            for key in ("data.pair_buffer", "data.pair_prefer"):
                if self.get(key) != default.get(key):
                    out.append(f"{key}={self.get(key)} is unused with {why}: it sizes the pairing buffer of "
                               f"the plate-shard stream")
        if self.data.pair_within_source and (self.data.stream == "plates" or not method.needs.pairs):
            why = "data.stream=plates" if method.needs.pairs else f"method={self.method} (no pairs)"
            out.append(f"data.pair_within_source=true is unused with {why}: it orders the pairs of the "
                       f"replicate-set stream")
        if not self.val.every:
            for key in ("val.keep_best", "val.patience", "val.recipe", "val.split", "val.max_wells"):
                if self.get(key) != default.get(key):
                    out.append(f"{key}={self.get(key)} is unused with val.every=0: set val.every=N (steps between "
                               f"validations) to validate during training")
        return out


def option_choices(cls: type = None, prefix: str = "") -> dict[str, tuple]:
    """Every key of the training configuration whose choices are enumerated (a Literal type or a bool), with
    those choices: what validation accepts and what the option-matrix test trains."""
    cls = cls or TrainConfig
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out |= option_choices(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is Literal:
            out[prefix + f.name] = typing.get_args(tp)
        elif tp is bool:
            out[prefix + f.name] = (False, True)
    return out
