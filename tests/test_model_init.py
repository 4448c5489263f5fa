"""model.init=CKPT starts a method from another run's image encoder (read through micon.checkpoint): a PaCLR run
starts from a SimCLR run's encoder, weights equal, and says so in its log; an encoder of another architecture
or channel list is refused with one line naming both. In-process, one rank, one training step in all."""
from __future__ import annotations

import logging

import pytest
import torch

from micon.checkpoint import load_checkpoint, resolve_model_file
from micon.config import load_config
from micon.distributed import free_port
from train.config import TrainConfig
from train.trainer import EXIT_OK, Trainer, train


def _cfg(shards, out, *extra):
    return load_config(TrainConfig, None, [f"data.shards={shards}", f"out={out}", "micro_batch=4", "progress=false",
                                           "wandb.enabled=false", "data.augment.crop=16", "model.projection_dim=8",
                                           *extra])


@pytest.fixture(scope="module")
def simclr_run(tiny_shards, tmp_path_factory):
    """Another run: one SimCLR step (an image-only pretraining run), seed 7."""
    out = tmp_path_factory.mktemp("pretrain") / "simclr"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(free_port())).items():
            mp.setenv(k, v)
        assert train(_cfg(tiny_shards, out, "method=simclr", "steps=1", "seed=7")) == EXIT_OK
    return out


def test_a_method_starts_from_another_runs_image_encoder(simclr_run, tiny_shards, tmp_path, one_rank, caplog):
    source = load_checkpoint(simclr_run).weights
    encoder = {k.removeprefix("image_encoder."): v for k, v in source.items() if k.startswith("image_encoder.")}
    with caplog.at_level(logging.INFO, logger="micon.train"):
        trainer = Trainer(_cfg(tiny_shards, tmp_path / "paclr", "method=paclr", "steps=1",
                               f"model.init={simclr_run}")).setup()
    try:
        loaded = trainer.engine.module.image_encoder.state_dict()
        assert loaded.keys() == encoder.keys()
        for k, v in encoder.items():
            assert torch.equal(loaded[k].float(), v), k
        fresh = Trainer(_cfg(tiny_shards, tmp_path / "x", "method=paclr")).method.build_model(
            trainer.cfg.model, 5).image_encoder.state_dict()
        assert not torch.equal(fresh["backbone.conv1.0.weight"], loaded["backbone.conv1.0.weight"])
    finally:
        trainer.finish(1)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("model.init: "))
    assert str(resolve_model_file(simclr_run)) in line and "simclr, step 1" in line


def test_an_encoder_of_another_shape_is_refused_naming_both(simclr_run, tiny_shards, tmp_path, one_rank, capsys):
    assert train(_cfg(tiny_shards, tmp_path / "r18", "method=paclr", "model.preset=resnet18",
                      f"model.init={simclr_run}")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"train: model.init={simclr_run}: its image encoder (tiny multichannel")
    assert "is not this run's (resnet18 multichannel" in err[0]

    ck = torch.load(resolve_model_file(simclr_run), weights_only=True)   # the same encoder, other channels
    ck["record"]["channels"] = list(reversed(ck["record"]["channels"]))
    other = tmp_path / "reordered.pt"
    torch.save(ck, other)
    assert train(_cfg(tiny_shards, tmp_path / "chans", "method=paclr", f"model.init={other}")) == 1
    err = capsys.readouterr().err
    there, here = ",".join(ck["record"]["channels"]), ",".join(reversed(ck["record"]["channels"]))
    assert f"channels {there}) is not this run's (tiny multichannel channels {here})" in err
