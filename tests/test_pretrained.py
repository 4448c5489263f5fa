"""Starting where users start: pretrained weights from a file or the local timm cache (never downloaded here),
the official recipe's frozen backbone (only the last stage trains), frozen per-compound molecule vectors, and
pretrained backbones as reference rows. Every weights file is written by the test from a seeded timm model."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from micon import schema
from micon.checkpoint import load_checkpoint
from micon.config import load_config
from tests.conftest import REPO, run_job
from tests.s3server import s3  # noqa: F401 (the fixture)

BASE = ["steps=3", "micro_batch=2", "progress=false", "wandb.enabled=false", "resume=none", "data.augment.crop=32",
        "model.projection_dim=8", "model.molecule_dim=16", "optim.warmup_steps=1", "ckpt_every=3"]


def timm_weights(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm model's state dict with seeded random values (an ImageNet classifier of 1,000 classes included)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=1000)
    with torch.no_grad():   # batch norm statistics too, so a frozen one is seen to keep them
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.randn_like(v) * 0.05 + (1.0 if k.endswith(("running_var", "bn1.weight")) else 0.0))
                if k.endswith("running_var"):
                    v.abs_()
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory):
    """resnet18 as .safetensors (timm names) and as a .pth (torchvision names, checked against torchvision's own
    resnet18), resnet101 as both."""
    from safetensors.torch import save_file
    import torchvision

    d = tmp_path_factory.mktemp("weights")
    files = {}
    for name in ("resnet18", "resnet101"):
        state = timm_weights(name)
        save_file(state, d / f"{name}.safetensors")
        tv = getattr(torchvision.models, name)(weights=None)
        tv.load_state_dict(state, strict=True)     # these are torchvision's key names, every one of them
        torch.save(tv.state_dict(), d / f"{name}.pth")
        files[name] = {"safetensors": d / f"{name}.safetensors", "pth": d / f"{name}.pth", "state": state}
    return files


@pytest.mark.parametrize("name", ["resnet18", "resnet101"])
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("mode", ["per_channel", "multichannel"])
def test_weights_files_load_in_both_modes(weights_files, name, fmt, mode):
    from micon.models.image import ImageEncoder

    state = weights_files[name]["state"]
    enc = ImageEncoder(name, in_chans=5, mode=mode, weights=str(weights_files[name][fmt]))
    assert "missing 0; unexpected 0; classifier dropped (2 tensors)" in enc.weights_report
    mine = enc.backbone.state_dict()
    for k, v in mine.items():
        if k == "conv1.weight" and mode == "multichannel":
            # timm's adapt_input_conv for 5 channels: the RGB filters repeated over the channels, scaled by 3/5
            expected = state[k].repeat(1, 2, 1, 1)[:, :5] * (3 / 5)
            assert v.shape == (64, 5, 7, 7) and torch.allclose(v, expected)
            assert "fitted from 3 to 5 input channels" in enc.weights_report
        else:
            assert torch.equal(v, state[k]), k
    # ImageNet normalisation: on for RGB weights reading grey channels (per channel), off for multichannel
    assert enc.input_norm == ("imagenet" if mode == "per_channel" else "none")
    x = torch.rand(2, 5, 32, 32)
    assert enc.eval()(x).shape == (2, enc.out_dim)


def test_imagenet_normalisation_is_applied_per_channel(weights_files):
    """The per-channel encoder with input_norm=imagenet equals the plain backbone fed (x - mean) / std per RGB
    channel of each grey channel repeated to 3, computed here directly."""
    from micon.models.image import ImageEncoder
    from micon.models.pretrained import IMAGENET_MEAN, IMAGENET_STD

    enc = ImageEncoder("resnet18", in_chans=5, mode="per_channel", weights=str(weights_files["resnet18"]["pth"])).eval()
    x = torch.rand(3, 5, 32, 32)
    rgb = x.reshape(15, 1, 32, 32).repeat(1, 3, 1, 1)
    rgb = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = enc.backbone(rgb).reshape(3, -1)
        assert torch.allclose(enc(x), expected, atol=1e-5)


def test_a_mismatched_shape_is_refused_naming_the_tensor(weights_files, tmp_path):
    from micon.models.image import ImageEncoder
    from micon.models.pretrained import WeightsError

    state = dict(weights_files["resnet18"]["state"])
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"tensor layer2\.0\.conv1\.weight has shape \[128, 64, 5, 5\] in the "
                                           r"file but \[128, 64, 3, 3\]"):
        ImageEncoder("resnet18", in_chans=5, mode="per_channel", weights=str(tmp_path / "bad.pt"))
    # weights of another architecture altogether share no tensor name
    with pytest.raises(WeightsError, match="none of its .* tensors"):
        ImageEncoder("dinov2_vits14", in_chans=5, mode="per_channel", img_size=28,
                     weights=str(weights_files["resnet18"]["safetensors"]))
    with pytest.raises(WeightsError, match="no such weights file"):
        ImageEncoder("resnet18", weights=str(tmp_path / "absent.safetensors"))


def test_timm_weights_come_from_the_local_cache(weights_files, tmp_path, monkeypatch):
    """model.pretrained=timm reads timm's default tag from the Hugging Face cache when it is there (a cache laid
    out by hand, as `hf download` leaves it) and never downloads under HF_HUB_OFFLINE."""
    import shutil

    from micon.models.image import ImageEncoder
    from micon.models.pretrained import WeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match=r"no weights for resnet18 \(timm/resnet18\.a1_in1k\) in the Hugging Face "
                                           rf"cache {tmp_path / 'hub'} and HF_HUB_OFFLINE is set; pre-stage"):
        ImageEncoder("resnet18", weights="timm")
    snap = tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    shutil.copy(weights_files["resnet18"]["safetensors"], snap / "model.safetensors")
    (tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0" * 40)
    enc = ImageEncoder("resnet18", weights="timm")
    assert "model.safetensors" in enc.weights_report
    assert torch.equal(enc.backbone.layer3[1].conv2.weight, weights_files["resnet18"]["state"]["layer3.1.conv2.weight"])


@pytest.mark.slow
def test_timm_without_a_cache_stops_training_with_one_line(tiny_shards, tmp_path):
    proc = run_job("train.run", "-", f"data.shards={tiny_shards}", f"out={tmp_path / 'run'}", "method=simclr",
                   "model.preset=resnet18", "model.mode=per_channel", "model.pretrained=timm", *BASE, check=False,
                   HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"in the Hugging Face cache {tmp_path / 'empty-cache'} and HF_HUB_OFFLINE is set" in lines[0]
    assert "hf download timm/resnet18.a1_in1k model.safetensors" in lines[0]


def _train_in_process(overrides):
    from train.config import TrainConfig
    from train.trainer import EXIT_OK, Trainer

    cfg = load_config(TrainConfig, None, overrides)
    trainer = Trainer(cfg).setup()
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    in_optimizer = sum(p.numel() for g in inner.param_groups for p in g["params"])
    trainable = sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad)
    code = trainer.fit()
    assert trainer.finish(code) == EXIT_OK
    return cfg, in_optimizer, trainable


@pytest.mark.slow
def test_last_stage_trains_layer4_and_keeps_the_rest_bit_for_bit(tiny_shards, weights_files, tmp_path, one_rank,
                                                                 caplog):
    state = weights_files["resnet18"]["state"]
    with caplog.at_level(logging.INFO, logger="micon.train"):
        cfg, in_optimizer, trainable = _train_in_process([
            f"data.shards={tiny_shards}", f"out={tmp_path / 'run'}", "method=paclr", "model.preset=resnet18",
            "model.mode=per_channel", f"model.pretrained={weights_files['resnet18']['pth']}",
            "model.trainable=last_stage", "optim.lr=1e-2", "engine.zero_stage=0", *BASE])
    assert "model.pretrained: 120 tensors" in caplog.text and "model.trainable=last_stage" in caplog.text
    ck = load_checkpoint(tmp_path / "run")
    assert ck.record.step == 3 and ck.record.model["trainable"] == "last_stage"
    assert ck.record.model["input_norm"] == "imagenet"    # resolved, so embed reproduces it
    prefix = "image_encoder.backbone."
    backbone = {k[len(prefix):]: v for k, v in ck.weights.items() if k.startswith(prefix)}
    frozen = [k for k in backbone if not k.startswith("layer4.")]
    assert frozen and all(torch.equal(backbone[k], state[k]) for k in frozen)       # batch norm statistics too
    changed = [k for k in backbone if k.startswith("layer4.") and k.endswith("weight")
               and not torch.equal(backbone[k], state[k])]
    assert changed, "layer4 did not train"
    # the optimiser holds exactly the trainable parameters: layer4 and the projection head
    model = ck.build_model()
    assert model.image_encoder.input_norm == "imagenet"    # what embed rebuilds applies the same inputs
    expected = sum(v.numel() for k, v in model.named_parameters() if k.startswith(("image_encoder.backbone.layer4.",
                                                                                      "projector.")))
    assert trainable == expected and in_optimizer == expected
    frozen_values = sum(v.numel() for k, v in model.named_parameters() if k.startswith("image_encoder.backbone.")
                        and not k.startswith("image_encoder.backbone.layer4."))
    assert frozen_values == sum(p.numel() for p in model.parameters()) - expected > 2_500_000


@pytest.mark.slow
def test_trainable_head_and_resume_keep_the_setting(tiny_shards, weights_files, tmp_path, one_rank):
    out = tmp_path / "run"
    args = [f"data.shards={tiny_shards}", f"out={out}", "method=simclr", "model.preset=resnet18",
            "model.mode=per_channel", f"model.pretrained={weights_files['resnet18']['safetensors']}",
            "model.trainable=head", *BASE]
    _, in_optimizer, trainable = _train_in_process(args)
    state = weights_files["resnet18"]["state"]
    ck = load_checkpoint(out)
    prefix = "image_encoder.backbone."
    assert all(torch.equal(v, state[k[len(prefix):]]) for k, v in ck.weights.items() if k.startswith(prefix))
    # a resume reads the run's own checkpoint, not the weights file (gone now), and keeps the backbone frozen
    (weights_files["resnet18"]["safetensors"]).rename(tmp_path / "moved.safetensors")
    try:
        _, in_optimizer2, trainable2 = _train_in_process([a for a in args if a != "resume=none"
                                                          and not a.startswith("steps=")] + ["steps=5",
                                                                                             "resume=latest"])
    finally:
        (tmp_path / "moved.safetensors").rename(weights_files["resnet18"]["safetensors"])
    ck2 = load_checkpoint(out)
    assert ck2.record.step == 5 and (trainable2, in_optimizer2) == (trainable, in_optimizer)
    assert all(torch.equal(v, state[k[len(prefix):]]) for k, v in ck2.weights.items() if k.startswith(prefix))
    # model.init from that run, with the official setting: its encoder is the start, and only layer4 trains
    out3 = tmp_path / "from-init"
    _, in_optimizer3, _ = _train_in_process([f"data.shards={args[0].split('=', 1)[1]}", f"out={out3}",
                                             "method=simclr", "model.preset=resnet18", "model.mode=per_channel",
                                             f"model.init={out}", "model.trainable=last_stage", *BASE])
    ck3 = load_checkpoint(out3)
    layer4 = sum(v.numel() for k, v in ck3.build_model().named_parameters() if ".layer4." in k)
    assert in_optimizer3 == trainable + layer4      # the projection head (all `head` trained) and layer4
    assert ck3.record.model["input_norm"] == "imagenet"     # the inputs the started-from encoder was trained on
    assert all(torch.equal(v, state[k[len(prefix):]]) for k, v in ck3.weights.items()
               if k.startswith(prefix) and ".layer4." not in f".{k[len(prefix):]}")


@pytest.fixture(scope="module")
def unimol_like_table(tiny_screen, tmp_path_factory):
    """A table of frozen per-compound vectors (as Uni-Mol's cls_repr would be): every compound of the screen."""
    compounds = pd.read_csv(tiny_screen / "metadata" / "compound.csv.gz")
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(size=(len(compounds), 24)).astype(np.float32),
                         columns=[f"cls_repr_{i}" for i in range(24)])
    table.insert(0, schema.JCP, compounds[schema.JCP].to_numpy())
    path = tmp_path_factory.mktemp("table") / "unimol.parquet"
    table.to_parquet(path)
    return path, table


@pytest.mark.slow
def test_molecule_table_trains_and_predicts(tiny_screen, tiny_shards, unimol_like_table, tmp_path, one_rank):
    from train.config import TrainConfig
    from train.trainer import EXIT_OK, train

    path, table = unimol_like_table
    out = tmp_path / "run"
    cfg = load_config(TrainConfig, None, [f"data.shards={tiny_shards}", f"out={out}", "method=micon",
                                          "model.molecule=table", f"model.molecule_table={path}", *BASE, "steps=2",
                                          "ckpt_every=2"])
    assert train(cfg) == EXIT_OK
    ck = load_checkpoint(out)
    assert ck.record.table_dim == 24 and ck.record.fingerprint_bits == 0
    # the vectors are inputs, not weights: the checkpoint holds only the trainable projection
    assert not [k for k, v in ck.weights.items() if tuple(v.shape) == (len(table), 24)]
    assert tuple(ck.weights["molecule_encoder.net.0.weight"].shape) == (32, 24)   # 24 values in, 2 x 16 hidden

    # predict: compounds with a row get a profile; one without is named and listed
    compounds = pd.read_csv(tiny_screen / "metadata" / "compound.csv.gz")
    extra = pd.DataFrame([{schema.JCP: "JCP2022_NOTINTABLE", schema.SMILES: "CCO", schema.INCHIKEY: ""}])
    pd.concat([compounds, extra], ignore_index=True).to_csv(tmp_path / "virtual.csv", index=False)
    proc = run_job("evaluate.predict", out, tmp_path / "virtual.csv", tmp_path / "pred", f"shards={tiny_shards}",
                   "controls=8")
    pred = pd.read_parquet(tmp_path / "pred" / "predicted_profiles.parquet")
    assert "JCP2022_NOTINTABLE" not in set(pred[schema.JCP]) and len(pred) > 10
    invalid = pd.read_csv(tmp_path / "pred" / "invalid_compounds.csv")
    assert "no row in the molecule table" in invalid.set_index(schema.JCP).loc["JCP2022_NOTINTABLE", "reason"]
    assert "JCP2022_NOTINTABLE" in proc.stderr


@pytest.mark.slow
def test_a_table_missing_training_compounds_is_refused_naming_them(tiny_shards, unimol_like_table, tmp_path):
    from micon.data.shards import Manifest

    path, table = unimol_like_table
    manifest = Manifest.load(tiny_shards)
    held_out = set(manifest.data["splits"]["heldout_compounds"])
    training = [c[schema.JCP] for c in manifest.data["compounds"]
                if c["Metadata_Role"] in (schema.TREATED, schema.POSCON) and c[schema.JCP] not in held_out]
    drop = sorted(training)[:7]
    table[~table[schema.JCP].isin(drop)].to_parquet(tmp_path / "partial.parquet")
    out = tmp_path / "run"
    proc = run_job("train.run", "-", f"data.shards={tiny_shards}", f"out={out}", "method=micon",
                   "model.molecule=table", f"model.molecule_table={tmp_path / 'partial.parquet'}", *BASE,
                   check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = next(line for line in proc.stderr.splitlines() if line.startswith("train: "))
    assert line.startswith(f"train: 7 of {len(training)} training compound(s) have no row in model.molecule_table=")
    assert ", ".join(drop[:5]) + " ..." in line
    listing = out / "missing_from_molecule_table.txt"
    assert str(listing) in line and listing.read_text().split() == drop
    assert not (out / "checkpoints").exists()     # refused before any step


@pytest.mark.slow
def test_official_recipe_trains_at_a_reduced_size(tiny_shards, tiny_graphs, weights_files, tmp_path, one_rank):
    """train/configs/official.yaml (ResNet-101 per channel, ImageNet weights, last stage, fingerprint MLP,
    temperature 1.0, lr 5e-3) trains 2 steps on CPU with the image size, batch and steps overridden."""
    from train.config import TrainConfig
    from train.trainer import EXIT_OK, train

    cfg = load_config(TrainConfig, REPO / "train" / "configs" / "official.yaml", [
        f"data.shards={tiny_shards}", f"data.graphs={tiny_graphs}", f"out={tmp_path / 'run'}", "steps=2",
        "micro_batch=2", "data.augment.crop=32", "data.num_workers=0", "progress=false", "wandb.enabled=false", "wandb.log_every=1",
        f"model.pretrained={weights_files['resnet101']['safetensors']}"])
    assert (cfg.model.preset, cfg.model.mode, cfg.model.trainable, cfg.loss.temperature, cfg.optim.lr) == \
        ("resnet101", "per_channel", "last_stage", 1.0, 5e-3)
    assert train(cfg) == EXIT_OK
    ck = load_checkpoint(tmp_path / "run")
    assert ck.record.model["preset"] == "resnet101" and ck.record.model["input_norm"] == "imagenet"
    state = weights_files["resnet101"]["state"]
    assert torch.equal(ck.weights["image_encoder.backbone.layer3.5.conv2.weight"], state["layer3.5.conv2.weight"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]


@pytest.mark.slow
def test_pretrained_reference_row_is_embedded_and_scored(tiny_shards, weights_files, tmp_path):
    emb = tmp_path / "emb"
    proc = run_job("evaluate.embed", f"pretrained:resnet18:{weights_files['resnet18']['safetensors']}", tiny_shards,
                   emb, "ray=false", "batch_size=32")
    info = json.loads((emb / "embed.json").read_text())
    assert info["identity"]["model"]["method"] == "pretrained_resnet18"
    meta = pd.read_parquet(emb / "sites.parquet")
    import zarr
    z = zarr.open_array(str(emb / "embeddings.zarr"), mode="r")
    assert z.shape == (len(meta), 5 * 512) and np.isfinite(z[:64]).all()
    run_job("evaluate.run", f"embeddings.pretrained_resnet18={emb}", f"out={tmp_path / 'eval'}", "ray=false",
            "bootstrap=50")
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())["methods"]["pretrained_resnet18"]
    assert 0 <= m["nsb_top1"] <= m["nsb_top10"] <= 1 and m["n_wells"] > 0
    bad = run_job("evaluate.embed", f"pretrained:resnet18:{tmp_path / 'absent.pth'}", tiny_shards, tmp_path / "e2",
                  "ray=false", check=False)
    assert bad.returncode != 0 and "no weights file at" in bad.stderr and "Traceback" not in bad.stderr
    del proc


def test_weights_and_molecule_table_from_object_storage(s3, weights_files, unimol_like_table):
    """A cluster keeps weights and vector tables in a bucket: both read from the S3 API server on localhost."""
    from micon import storage
    from micon.chem.table import MoleculeTable
    from micon.models.image import ImageEncoder

    s3.bucket("weights-and-tables")
    storage.put_file(weights_files["resnet18"]["pth"], storage.path("s3://weights-and-tables/w/resnet18.pth"))
    path, table = unimol_like_table
    storage.put_file(path, storage.path("s3://weights-and-tables/t/unimol.parquet"))
    enc = ImageEncoder("resnet18", in_chans=5, mode="multichannel", weights="s3://weights-and-tables/w/resnet18.pth")
    assert "from s3://weights-and-tables/w/resnet18.pth; missing 0; unexpected 0" in enc.weights_report
    assert torch.equal(enc.backbone.layer4[1].conv2.weight, weights_files["resnet18"]["state"]["layer4.1.conv2.weight"])
    remote = MoleculeTable("s3://weights-and-tables/t/unimol.parquet")
    ids = list(table[schema.JCP][:4])
    assert np.array_equal(remote.get(ids), table.set_index(schema.JCP).loc[ids].to_numpy(np.float32))


def test_dinov2_weights_load_at_another_size_and_its_last_blocks_train(tmp_path):
    """A DINOv2 ViT-S/14 file (timm names, 518 px position embeddings) into the dinov2_vits14 preset at 56 px:
    timm's own checkpoint filter resamples the position embeddings; last_stage trains the last 3 of 12 blocks."""
    from safetensors.torch import save_file

    from micon.models.image import ImageEncoder

    state = timm_weights("vit_small_patch14_dinov2")
    save_file(state, tmp_path / "dinov2.safetensors")
    enc = ImageEncoder("dinov2_vits14", in_chans=5, mode="per_channel", img_size=56, trainable="last_stage",
                       weights=str(tmp_path / "dinov2.safetensors"))
    assert "missing 0; unexpected 0" in enc.weights_report
    assert enc.backbone.pos_embed.shape[1] == 1 + (56 // 14) ** 2
    assert torch.equal(enc.backbone.blocks[5].attn.qkv.weight, state["blocks.5.attn.qkv.weight"])
    trains = {n.split(".")[1] for n, p in enc.backbone.named_parameters() if p.requires_grad and n.startswith("blocks.")}
    assert trains == {"9", "10", "11"} and enc.backbone.norm.weight.requires_grad
    assert not enc.backbone.patch_embed.proj.weight.requires_grad
    assert enc.eval()(torch.rand(2, 5, 56, 56)).shape == (2, 5 * 384)
