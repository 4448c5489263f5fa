"""Model tests: D-MPNN against a loop transcription, image encoder modes, MICON/SimCLR/CLIP forward and
backward on CPU with tiny images, and the gradient (detach) switches."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from micon import losses
from micon.chem.graph import MolGraph, collate_graphs
from micon.models import (CLIP, MICON, DMPNNEncoder, FingerprintMLP, ImageEncoder, SimCLR, graphs_to_torch)

ATOM_DIM, BOND_DIM = 6, 3


def random_molecule(rng: np.random.Generator, n_atoms: int, ring: bool = False) -> MolGraph:
    """A chain (or ring) of n_atoms with random features; edges 2i / 2i+1 are the two directions of bond i."""
    bonds = [(i, i + 1) for i in range(n_atoms - 1)] + ([(n_atoms - 1, 0)] if ring and n_atoms > 2 else [])
    edges = [e for u, v in bonds for e in ((u, v), (v, u))]
    edge_index = np.array(edges, dtype=np.int64).T.reshape(2, -1)
    bond_features = np.repeat(rng.normal(size=(len(bonds), BOND_DIM)), 2, axis=0).astype(np.float32)
    return MolGraph(rng.normal(size=(n_atoms, ATOM_DIM)).astype(np.float32),
                    bond_features.reshape(-1, BOND_DIM), edge_index)


def molecules(seed: int = 0) -> list[MolGraph]:
    rng = np.random.default_rng(seed)
    return [random_molecule(rng, 4), random_molecule(rng, 1), random_molecule(rng, 5, ring=True),
            random_molecule(rng, 2), random_molecule(rng, 6, ring=True)]


def reference_dmpnn(model: DMPNNEncoder, graphs: list[MolGraph]) -> torch.Tensor:
    """Chemprop's D-MPNN written with explicit loops over atoms and edges, using the model's weights."""
    out = []
    with torch.no_grad():
        for g in graphs:
            x = torch.tensor(g.atom_features)
            e = torch.tensor(g.bond_features)
            src, dst = g.edge_index
            h0 = [torch.relu(model.W_i(torch.cat([x[src[k]], e[k]]))) for k in range(g.n_edges)]
            h = list(h0)
            for _ in range(model.depth - 1):
                new = []
                for k in range(g.n_edges):  # edge v->w: messages k'->v except w->v
                    m = torch.zeros(model.out_dim)
                    for j in range(g.n_edges):
                        if dst[j] == src[k] and src[j] != dst[k]:
                            m = m + h[j]
                    new.append(torch.relu(h0[k] + model.W_h(m)))
                h = new
            atoms = []
            for a in range(g.n_atoms):
                m = sum((h[j] for j in range(g.n_edges) if dst[j] == a), torch.zeros(model.out_dim))
                atoms.append(torch.relu(model.W_o(torch.cat([x[a], m]))))
            out.append(torch.stack(atoms).mean(0))
    return torch.stack(out)


def test_dmpnn_matches_loop_reference():
    torch.manual_seed(0)
    graphs = molecules()
    model = DMPNNEncoder(ATOM_DIM, BOND_DIM, hidden_dim=8, depth=3)
    got = model(graphs_to_torch(collate_graphs(graphs)))
    assert got.shape == (len(graphs), 8)
    torch.testing.assert_close(got, reference_dmpnn(model, graphs), atol=1e-5, rtol=1e-5)


def test_dmpnn_handles_molecules_without_bonds():
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    model = DMPNNEncoder(ATOM_DIM, BOND_DIM, hidden_dim=8, depth=2, aggregation="sum")
    singles = [random_molecule(rng, 1) for _ in range(3)]
    batch = graphs_to_torch(collate_graphs(singles))
    assert batch.edge_index.shape == (2, 0) and batch.bond_features.shape == (0, BOND_DIM)
    out = model(batch)
    x = batch.atom_features
    expected = torch.relu(model.W_o(torch.cat([x, torch.zeros(3, 8)], dim=1)))
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert model.W_o.weight.grad is not None


def test_dmpnn_permuting_molecules_permutes_outputs():
    torch.manual_seed(0)
    graphs = molecules(3)
    model = DMPNNEncoder(ATOM_DIM, BOND_DIM, hidden_dim=8, depth=4)
    out = model(graphs_to_torch(collate_graphs(graphs)))
    perm = [3, 0, 4, 2, 1]
    out_perm = model(graphs_to_torch(collate_graphs([graphs[i] for i in perm])))
    torch.testing.assert_close(out_perm, out[perm], atol=1e-6, rtol=1e-5)


def test_dmpnn_rejects_wrong_feature_sizes():
    model = DMPNNEncoder(ATOM_DIM + 1, BOND_DIM)
    with pytest.raises(ValueError, match="atom_dim=7"):
        model(graphs_to_torch(collate_graphs(molecules())))


def test_fingerprint_mlp_shape():
    model = FingerprintMLP(n_bits=64, hidden_dim=16, out_dim=8)
    assert model(torch.randint(0, 2, (3, 64))).shape == (3, 8)
    with pytest.raises(ValueError, match="fingerprints"):
        model(torch.zeros(3, 32))


def test_per_channel_mode_is_the_shared_backbone_on_each_repeated_channel():
    torch.manual_seed(0)
    enc = ImageEncoder("tiny", in_chans=3, mode="per_channel", per_channel_dim=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = enc(x)
        parts = [enc.channel_proj(enc.backbone(x[:, c:c + 1].repeat(1, 3, 1, 1))) for c in range(3)]
    assert enc.out_dim == 12 and got.shape == (2, 12)
    torch.testing.assert_close(got, torch.cat(parts, dim=1), atol=1e-5, rtol=1e-5)


def test_image_encoder_errors_are_clear():
    with pytest.raises(ValueError, match="unknown image encoder preset"):
        ImageEncoder("resnet5000")
    with pytest.raises(ValueError, match="mode"):
        ImageEncoder("tiny", mode="rgb")
    with pytest.raises(ValueError, match=r"\[B, 5, H, W\]"):
        ImageEncoder("tiny", in_chans=5)(torch.zeros(1, 3, 32, 32))


def _micon(preset: str, mode: str, **kwargs) -> MICON:
    img_size = 32 if preset.startswith("vit") else None
    image = ImageEncoder(preset, in_chans=5, mode=mode, img_size=img_size)
    mol = DMPNNEncoder(ATOM_DIM, BOND_DIM, hidden_dim=16, depth=2)
    return MICON(image, mol, projection_dim=8, projection_hidden=16, generator_hidden=32, **kwargs)


def _batch(b: int = 2, v: int = 2, size: int = 32):
    g = torch.Generator().manual_seed(0)
    treated = torch.randn(b, v, 5, size, size, generator=g)
    controls = torch.randn(b, v, 5, size, size, generator=g)
    return treated, controls, graphs_to_torch(collate_graphs(molecules()[:b]))


@pytest.mark.parametrize("preset,mode", [("resnet50", "per_channel"), ("resnet50", "multichannel"),
                                         ("vit_small_patch16_224", "per_channel"),
                                         ("vit_small_patch16_224", "multichannel")])
def test_micon_forward_backward_presets(preset, mode):
    torch.manual_seed(0)
    model = _micon(preset, mode)
    treated, controls, graph = _batch()
    out = model(treated, controls, graph)
    d = model.embed_dim
    assert d == (5 * model.image_encoder.backbone.num_features if mode == "per_channel"
                 else model.image_encoder.backbone.num_features)
    for key in ("treated", "control", "generated", "target"):
        assert out[key].shape == (2, 2, 8)
    assert out["treated_embedding"].shape == (2, 2, d) and out["compound_embedding"].shape == (2, d)
    loss = losses.micon_loss(out, temperature=0.5)["loss"]
    loss.backward()
    grads = [p.grad for p in model.image_encoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def _encoder_grads_after_counterfactual(model: MICON):
    treated, controls, graph = _batch()
    out = model(list(treated.unbind(1)), list(controls.unbind(1)), graph, labels=torch.tensor([4, 9]))
    assert out["labels"].tolist() == [4, 9]
    losses.counterfactual_paclr_loss(out["generated"], out["target"], out["labels"], 0.5).backward()
    image_grads = [p.grad for p in model.image_encoder.parameters()]
    other = [model.generator.net.net[1].weight.grad, model.molecule_encoder.W_i.weight.grad,
             model.image_projector.net[1].weight.grad]
    return image_grads, other


def test_official_detach_keeps_counterfactual_loss_off_the_image_encoder():
    torch.manual_seed(0)
    image_grads, other = _encoder_grads_after_counterfactual(_micon("tiny", "per_channel"))
    assert all(g is None for g in image_grads)
    assert all(g is not None and g.abs().sum() > 0 for g in other)


@pytest.mark.parametrize("detach_control,detach_target", [(False, False), (False, True), (True, False)])
def test_undetached_counterfactual_reaches_image_encoder(detach_control, detach_target):
    torch.manual_seed(0)
    model = _micon("tiny", "multichannel", detach_control=detach_control, detach_target=detach_target)
    image_grads, _ = _encoder_grads_after_counterfactual(model)
    assert any(g is not None and g.abs().sum() > 0 for g in image_grads)


def test_micon_with_fingerprints_and_shape_errors():
    torch.manual_seed(0)
    model = MICON(ImageEncoder("tiny", in_chans=5, mode="multichannel"), FingerprintMLP(32, 16, 8),
                  projection_dim=8)
    treated, controls, _ = _batch(b=3, v=2)
    out = model(treated, controls, torch.randint(0, 2, (3, 32)))
    assert out["generated"].shape == (3, 2, 8) and out["labels"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="one control per treated view"):
        model(treated, controls[:, :1], torch.randint(0, 2, (3, 32)))
    with pytest.raises(ValueError, match="2 compounds but there are 3 examples"):
        model(treated, controls, torch.randint(0, 2, (2, 32)))


def test_simclr_and_clip_baselines():
    torch.manual_seed(0)
    simclr = SimCLR(ImageEncoder("tiny", in_chans=5, mode="multichannel"), projection_dim=8)
    treated, _, graph = _batch()
    out = simclr(treated)
    assert out["view1"].shape == (2, 8)
    losses.simclr_loss(out["view1"], out["view2"], 0.5).backward()
    assert simclr.image_encoder.backbone.conv1[0].weight.grad is not None

    clip = CLIP(ImageEncoder("tiny", in_chans=5, mode="multichannel"),
                DMPNNEncoder(ATOM_DIM, BOND_DIM, hidden_dim=16), projection_dim=8)
    out = clip(treated[:, 0], graph)
    assert out["image"].shape == (2, 8) and out["molecule"].shape == (2, 8)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    losses.clip_loss(out["image"], out["molecule"], out["logit_scale"]).backward()
    assert clip.logit_scale.grad is not None and clip.molecule_encoder.W_i.weight.grad is not None
    assert clip(treated, graph)["image"].shape == (2, 2, 8)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1000.0))
    assert clip(treated[:, 0], graph)["logit_scale"].item() == pytest.approx(100.0)


@pytest.mark.parametrize("encoder", ["dmpnn", "fingerprint", "table"])
def test_each_method_asks_for_the_molecule_form_its_encoder_reads(encoder):
    from micon.methods import METHODS, LossConfig
    from micon.models.factory import MOLECULE_ENCODERS, ModelConfig

    assert encoder in MOLECULE_ENCODERS
    cfg = ModelConfig(preset="tiny", molecule=encoder, molecule_dim=16, projection_dim=8)
    for method in METHODS.values():
        needs = method.data_needs(cfg)
        reads = method.needs.molecules
        assert (needs.graphs, needs.fingerprints, needs.vectors) == (
            reads and encoder == "dmpnn", reads and encoder == "fingerprint", reads and encoder == "table")
        assert needs.molecules == reads and needs.pairs == method.needs.pairs and needs.controls == method.needs.controls
        if not needs.fingerprints:
            continue
        with pytest.raises(ValueError, match="n_bits"):
            method.feature_dims(cfg)                # the size comes from the store, never a constant
        dims = method.feature_dims(cfg, fingerprint_bits=96)
        assert dims == {"atom_dim": 0, "bond_dim": 0, "fingerprint_bits": 96, "table_dim": 0}
        torch.manual_seed(0)
        model = method.build_model(cfg, 5, **dims)
        assert model.molecule_encoder.n_bits == 96
        treated, controls, _ = _batch(b=3)
        bits = torch.from_numpy(np.random.default_rng(0).integers(0, 2, (3, 96), dtype=np.uint8))
        batch = {"views": treated, "controls": controls, "labels": torch.arange(3), "fingerprints": bits}
        parts = method.loss(model, method.to_device(batch, torch.device("cpu"), torch.float32), LossConfig())
        assert torch.isfinite(parts["loss"])
        parts["loss"].backward()
        assert model.molecule_encoder.net[0].weight.grad.abs().sum() > 0
