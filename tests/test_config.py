"""The typed configuration tree: YAML + key=value overrides, clear errors, shipped configs load."""
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from micon.config import ConfigError, load_config, parse_overrides, save_config, to_dict
from train.config import TrainConfig


@dataclass
class Inner:
    rate: float = 0.1
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    steps: int = 10
    flag: bool = False
    inner: Inner = field(default_factory=Inner)
    paths: dict[str, str] = field(default_factory=dict)


def test_overrides_types_and_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 5\ninner: {rate: 0.5}\n")
    cfg = load_config(Outer, tmp_path / "c.yaml", ["inner.names=a,b", "flag=yes", "steps=1_000",
                                                    "paths.micon=/x", "paths.simclr=/y"])
    assert cfg == Outer(1000, True, Inner(0.5, ["a", "b"]), {"micon": "/x", "simclr": "/y"})
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Outer, tmp_path / "saved.yaml") == cfg
    assert to_dict(cfg)["inner"]["names"] == ["a", "b"]
    assert parse_overrides(["a.b=1"]) == {"a": {"b": "1"}}


@pytest.mark.parametrize("args, message", [
    (["stpes=3"], "unknown key stpes (did you mean steps?)"),
    (["inner.rte=3"], "unknown key inner.rte (did you mean inner.rate?)"),
    (["steps=1.5"], "steps='1.5': expected int"),
    (["flag=maybe"], "flag='maybe': expected bool"),
    (["steps"], "is not key=value"),
])
def test_errors_say_what_to_change(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(Outer, None, args)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "train" / "configs").glob("*.yaml")))
def test_shipped_training_configs_load(path):
    cfg = load_config(TrainConfig, path, ["data.shards=s", "data.graphs=g"])
    # one config per method, named after it, and the official recipe (a MICON run)
    assert cfg.method == ("micon" if path.stem == "official" else path.stem)


def test_training_config_validation():
    with pytest.raises(ConfigError, match="method='dino': choose one of micon, paclr, clip, simclr"):
        load_config(TrainConfig, None, ["method=dino", "data.shards=s"])
    with pytest.raises(ConfigError, match="method=micon needs data.graphs"):
        load_config(TrainConfig, None, ["data.shards=s"])
