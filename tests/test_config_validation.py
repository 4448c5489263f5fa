"""Configs are validated in one place before start-up: every numeric field of every job's configuration
declares its range in its type (micon.config.Range), the loader checks them all, and a value outside gives
one line naming the key, the value and the range, exit code 2, no traceback. The crop is checked against
the stored site size when the shard manifest is read."""
from __future__ import annotations

import dataclasses
import importlib
import math
import re
import typing

import pytest

from micon.cli import JOBS
from micon.config import ConfigError, Range, check_ranges, config_help, load_config, range_of
from tests.conftest import run_job
from train.config import TrainConfig

TRAIN = ["data.shards=s", "method=simclr"]


def _config_class(job):
    module, name = job.config.split(":")
    return getattr(importlib.import_module(module), name)


def _numeric_fields(cls, prefix=""):
    """(dotted key, class, field name, type) of every int or float leaf of a config tree."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if typing.get_origin(tp) in (typing.Union,) and len(args) == 1 else tp
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
        elif tp in (int, float):
            yield prefix + f.name, cls, f.name, tp


# ints whose allowed values are not a range (checked by the class's validate(), with a test of their own)
NOT_A_RANGE = {"synth.wells_per_plate"}   # 96 or 384


@pytest.mark.parametrize("name", [n for n, job in JOBS.items() if job.config])
def test_every_numeric_field_of_every_job_declares_its_range(name):
    """A new int field must say what it accepts (a float is at least finite without saying so)."""
    missing = [key for key, cls, field, tp in _numeric_fields(_config_class(JOBS[name]))
               if tp is int and range_of(cls, field) is None and f"{name}.{key}" not in NOT_A_RANGE]
    assert not missing, f"{name}: declare a Range for {missing}"


@pytest.mark.parametrize("name", [n for n, job in JOBS.items() if job.config])
def test_every_job_default_is_in_range_and_nan_is_refused_for_every_float(name):
    cls = _config_class(JOBS[name])
    defaults = cls.__new__(cls)
    for f in dataclasses.fields(cls):   # the declared defaults, without the job's own required-key checks
        setattr(defaults, f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
    check_ranges(defaults)
    floats = [(key, c, field) for key, c, field, tp in _numeric_fields(cls) if tp is float]
    for key, c, field in floats:
        r = range_of(c, field)
        assert r is not None and r.problem(math.nan) and r.problem(math.inf), key


@pytest.mark.parametrize("override, message", [
    ("steps=-1", "steps=-1: out of range, allowed >= 1"),
    ("steps=0", "steps=0: out of range, allowed >= 1"),
    ("optim.lr=nan", "optim.lr=nan: out of range, allowed a finite number >= 0"),
    ("optim.lr=inf", "optim.lr=inf: out of range, allowed a finite number >= 0"),
    ("optim.lr=-0.1", "optim.lr=-0.1: out of range, allowed >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1: out of range, allowed >= 0"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0: out of range, allowed >= 0"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio=1.5: out of range, allowed 0 to 1"),
    ("loss.temperature=0", "loss.temperature=0.0: out of range, allowed > 0"),
    ("loss.temperature=-0.1", "loss.temperature=-0.1: out of range, allowed > 0"),
    ("micro_batch=1", "micro_batch=1: out of range, allowed >= 2 (contrastive losses need negatives)"),
    ("micro_batch=0", "micro_batch=0: out of range, allowed >= 2"),
    ("ckpt_every=0", "ckpt_every=0: out of range, allowed >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1: out of range, allowed >= 0"),
    ("data.augment.crop=-8", "data.augment.crop=-8: out of range, allowed >= 0"),
    ("data.augment.intensity_jitter=nan", "data.augment.intensity_jitter=nan: out of range"),
    ("engine.zero_stage=3", "engine.zero_stage=3: out of range, allowed 0 to 2"),
    ("engine.grad_accum=0", "engine.grad_accum=0: out of range, allowed >= 1"),
    ("model.projection_dim=0", "model.projection_dim=0: out of range, allowed >= 1"),
])
def test_training_ranges(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TrainConfig, None, [*TRAIN, override])


def test_ranges_of_the_other_jobs():
    from data_prep.featurize import FeaturizeConfig
    from data_prep.ingest import IngestConfig
    from evaluate.embed import EmbedConfig
    from evaluate.run import EvalConfig
    from micon.synth import resolve_config

    cases = [(IngestConfig, ["p_high=101"], "p_high=101.0: out of range, allowed 0 to 100"),
             (IngestConfig, ["rsets.seed=-1"], "rsets.seed=-1: out of range, allowed >= 0"),
             (IngestConfig, ["heldout_compound_fraction=nan"], "heldout_compound_fraction=nan: out of range"),
             (EmbedConfig, ["batch_size=0"], "batch_size=0: out of range, allowed >= 1"),
             (EvalConfig, ["embeddings.a=x", "bootstrap=1"], "bootstrap=1: out of range, allowed >= 2"),
             (EvalConfig, ["embeddings.a=x", "epsilon=0"], "epsilon=0.0: out of range, allowed > 0"),
             (FeaturizeConfig, ["n_bits=0"], "n_bits=0: out of range, allowed >= 8")]
    for cls, args, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(cls, None, args)
    with pytest.raises(ConfigError, match=re.escape("cells_per_site=nan: out of range, allowed a finite number > 0")):
        resolve_config(["cells_per_site=nan"])
    with pytest.raises(ConfigError, match=re.escape("dmso_wells=0: out of range, allowed >= 1 (every plate needs")):
        resolve_config(["dmso_wells=0"])


def test_a_range_declared_in_the_type_is_checked_and_shown_in_help():
    @dataclasses.dataclass
    class Job:
        n: typing.Annotated[int, Range(1, 5)] = 2   # how many
        x: float = 0.5                                # any finite number
        inner: typing.Optional[int] = None            # not numeric when unset

    assert load_config(Job, None, ["n=5"]).n == 5
    with pytest.raises(ConfigError, match=re.escape("n=6: out of range, allowed 1 to 5")):
        load_config(Job, None, ["n=6"])
    with pytest.raises(ConfigError, match=re.escape("x=nan: out of range, allowed a finite number")):
        load_config(Job, None, ["x=nan"])
    assert "how many [1 to 5]" in config_help(Job) and "[" not in config_help(Job).split("x=0.5")[1].splitlines()[0]


@pytest.mark.parametrize("override, message", [("steps=-1", "steps=-1: out of range, allowed >= 1"),
                                               ("optim.lr=nan", "optim.lr=nan: out of range")])
def test_train_refuses_an_invalid_value_with_one_line_and_exit_2(tmp_path, override, message):
    proc = run_job("train.run", "-", f"data.shards={tmp_path}", "method=simclr", f"out={tmp_path / 'run'}", override,
                   check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()   # nothing started, nothing written


def test_a_crop_larger_than_the_stored_sites_is_refused_at_start_up(tiny_shards, tmp_path, one_rank, capsys):
    from micon.data.shards import Manifest
    from train.trainer import EXIT_CONFIG, train

    size = min(Manifest.load(tiny_shards).data["image_shape"][1:])
    cfg = load_config(TrainConfig, None, [f"data.shards={tiny_shards}", f"out={tmp_path / 'crop'}", "method=simclr",
                                          "micro_batch=4", "steps=2", "progress=false", "wandb.enabled=false",
                                          f"data.augment.crop={2 * size}"])
    assert train(cfg) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"train: data.augment.crop={2 * size}: out of range, allowed 0 to {size}"), err
    assert f"{size}x{size} px" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "crop" / "config.yaml").exists()   # no record of a crop that never applied


def test_a_crop_the_size_of_the_stored_sites_is_accepted(tiny_shards, tmp_path):
    from micon.data.shards import Manifest
    from train.trainer import Trainer

    manifest = Manifest.load(tiny_shards)
    size = min(manifest.data["image_shape"][1:])
    for crop in (0, size // 2, size):
        trainer = Trainer(load_config(TrainConfig, None, [f"data.shards={tiny_shards}", "method=simclr",
                                                          f"data.augment.crop={crop}"]))
        trainer.manifest = manifest
        trainer._check_crop()
    trainer.cfg.data.augment.crop = size + 1
    with pytest.raises(ConfigError, match=f"allowed 0 to {size}"):
        trainer._check_crop()


def _all_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _all_fields(tp, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, cls, f.name


@pytest.mark.parametrize("name", [n for n, job in JOBS.items() if job.config])
def test_every_key_of_every_job_has_its_whole_help_text(name):
    """--help shows each key's whole comment, continuation lines included: none is missing and none
    ends mid-sentence (optim.kernel used to stop at 'fused |', engine.channels_last at 'set on')."""
    from micon.config import field_meanings

    cut = re.compile(r"(,|\||\(|:| on| to| the| a| of| and| or| with| for)$")
    for key, cls, field in _all_fields(_config_class(JOBS[name])):
        text = field_meanings(cls).get(field, "")
        assert text, f"{name}: {key} has no help text (a comment on its line)"
        assert not cut.search(text), f"{name}: {key}'s help ends mid-sentence: {text!r}"
    if name == "train":     # a comment continued on the next line is read whole
        hints = typing.get_type_hints(TrainConfig)
        assert field_meanings(hints["optim"])["kernel"].endswith("for_loop (torch's per-tensor loop, the slowest)")
