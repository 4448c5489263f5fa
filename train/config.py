"""The training job's configuration tree (YAML + key=value overrides), printed and saved with the run."""
from __future__ import annotations

from dataclasses import dataclass, field

from micon.config import ConfigError
from micon.data.pipeline import Augment
from micon.data.preprocess import NORMALIZATIONS
from micon.methods import METHODS, LossConfig, get_method
from micon.models.factory import ModelConfig

@dataclass
class DataConfig:
    shards: str = ""                 # prep output directory (manifest.json)
    graphs: str = ""                 # featurize output directory (micon, clip)
    num_workers: int = 0             # DataLoader workers per rank
    stream: str = "auto"             # auto (replicate sets when the method pairs replicates) | replicate_sets | plates
    shuffle_buffer: int = 128        # raw samples shuffled before decoding
    pair_buffer: int = 4096          # treated sites waiting for a replicate partner (plate stream)
    pair_prefer: str = "source"      # source | batch | plate | well
    resample: bool = False           # draw shards with replacement instead of epoch by epoch
    normalize: str = "plate"         # plate | none
    include_poscon: bool = False     # positive controls as compounds too
    augment: Augment = field(default_factory=lambda: Augment(crop=0, flip=True, rot90=True, intensity_jitter=0.1))


@dataclass
class OptimConfig:
    lr: float = 1e-3             # AdamW peak learning rate
    weight_decay: float = 0.05   # AdamW weight decay
    warmup_steps: int = 10       # linear warm-up steps, then cosine decay
    min_lr_ratio: float = 0.1    # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0       # gradient norm clip (0 = none)


@dataclass
class EngineConfig:
    zero_stage: int = 1              # DeepSpeed ZeRO stage: 0, 1 or 2
    precision: str = "auto"          # auto (bf16 where the GPU has it, else fp32) | bf16 | fp32
    grad_accum: int = 1              # micro-steps per optimizer step
    dist_timeout_s: float = 120.0    # a dead rank fails the others after this long


@dataclass
class WandbConfig:
    enabled: bool = True             # log to wandb (offline unless mode/WANDB_MODE says online)
    project: str = "micon"           # wandb project
    entity: str = ""                 # wandb team or user ("" = your default)
    mode: str = ""                   # "" = $WANDB_MODE or offline; online needs WANDB_API_KEY
    name: str = ""                   # run name ("" = wandb picks one)
    log_every: int = 1               # log metrics every this many steps


@dataclass
class TrainConfig:
    method: str = "micon"
    out: str = "runs/train"          # run directory: checkpoints, config, wandb, final.json
    steps: int = 100                 # optimizer steps
    micro_batch: int = 8             # examples per rank per micro-step
    seed: int = 0                    # model initialisation and data shuffle seed
    ckpt_every: int = 50             # save a checkpoint every this many steps (and at the end)
    keep_ckpts: int = 2              # newest checkpoints kept on disk
    resume: str = "latest"           # latest | none | a step directory name
    on_nonfinite: str = "stop"       # stop | skip (drop the batch on every rank; not counted as a step)
    max_skips_in_a_row: int = 10     # on_nonfinite=skip: stop after this many non-finite batches in a row
    progress: bool = True            # progress bar on rank 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        if not self.data.shards:
            raise ConfigError("data.shards is required: the directory written by ./launch.sh prep")
        if get_method(self.method).needs.graphs and not self.data.graphs:
            raise ConfigError(f"method={self.method} needs data.graphs: the directory written by ./launch.sh featurize")
        if self.micro_batch < 2:
            raise ConfigError("micro_batch must be at least 2 (contrastive losses need negatives)")
        if self.data.stream not in ("auto", "replicate_sets", "plates"):
            raise ConfigError("data.stream: auto, replicate_sets or plates")
        if self.data.stream == "replicate_sets" and not get_method(self.method).needs.pairs:
            raise ConfigError(f"method={self.method} reads single sites: use data.stream=plates or auto")
        if self.data.normalize not in NORMALIZATIONS:
            raise ConfigError(f"data.normalize: one of {', '.join(NORMALIZATIONS)}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError("on_nonfinite must be stop or skip")
        if self.engine.zero_stage not in (0, 1, 2):
            raise ConfigError("engine.zero_stage: 0, 1 or 2")
        if self.engine.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError("engine.precision: auto, bf16 or fp32")
