"""Each loss in micon.losses against an independent NumPy transcription of its formula (values and gradients)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from micon import losses


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _anchor_term(z: np.ndarray, i: int, positives: list[int], denominator: list[int], t: float) -> float:
    """-1/|P| sum_p log( exp(z_i.z_p/t) / sum_{a in denominator} exp(z_i.z_a/t) ), plain loops."""
    log_denominator = np.log(sum(np.exp(z[i] @ z[a] / t) for a in denominator))
    return -sum(z[i] @ z[p] / t - log_denominator for p in positives) / len(positives)


def ref_supcon(x, labels, t, anchor_mask=None):
    z = _unit(x)
    terms = []
    for i in range(len(z)):
        if anchor_mask is not None and not anchor_mask[i]:
            continue
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if positives:
            terms.append(_anchor_term(z, i, positives, [a for a in range(len(z)) if a != i], t))
    return float(np.mean(terms))


def ref_paclr(treated, controls, labels, t, dmso_positives):
    b, v, d = treated.shape
    rows, kind, lab = [], [], []
    for e in range(b):
        for w in range(v):
            rows.append(treated[e, w]); kind.append("treated"); lab.append(labels[e])
    for c in controls.reshape(-1, d):
        rows.append(c); kind.append("dmso"); lab.append(None)
    z = _unit(np.stack(rows))
    terms = []
    for i in range(len(z)):
        if kind[i] == "treated":
            positives = [p for p in range(len(z)) if p != i and kind[p] == "treated" and lab[p] == lab[i]]
        elif dmso_positives:
            positives = [p for p in range(len(z)) if p != i and kind[p] == "dmso"]
        else:
            continue  # paper mode: DMSO rows are negatives only
        if positives:
            terms.append(_anchor_term(z, i, positives, [a for a in range(len(z)) if a != i], t))
    return float(np.mean(terms))


def ref_counterfactual(generated, target, labels, t, mode):
    b, v, d = generated.shape
    lab = [labels[e] for e in range(b) for _ in range(v)]
    gen, tgt = _unit(generated.reshape(-1, d)), _unit(target.reshape(-1, d))
    terms = []
    if mode == "union":
        z = np.concatenate([tgt, gen])
        lab2 = lab + lab
        for i in range(len(z)):
            positives = [p for p in range(len(z)) if p != i and lab2[p] == lab2[i]]
            terms.append(_anchor_term(z, i, positives, [a for a in range(len(z)) if a != i], t))
    else:
        z = np.concatenate([gen, tgt])  # anchors 0..n-1, targets n..2n-1
        n = len(gen)
        for i in range(n):
            positives = [n + p for p in range(n) if lab[p] == lab[i]]
            terms.append(_anchor_term(z, i, positives, list(range(n, 2 * n)), t))
    return float(np.mean(terms))


def ref_simclr(v1, v2, t):
    z = _unit(np.concatenate([v1, v2]))
    n = len(v1)
    terms = [_anchor_term(z, i, [(i + n) % (2 * n)], [a for a in range(2 * n) if a != i], t) for i in range(2 * n)]
    return float(np.mean(terms))


def ref_clip(img, mol, scale):
    zi, zm = _unit(img), _unit(mol)
    n = len(zi)
    total = 0.0
    for i in range(n):
        li = [scale * zi[i] @ zm[j] for j in range(n)]
        lm = [scale * zm[i] @ zi[j] for j in range(n)]
        total += -(li[i] - np.log(np.sum(np.exp(li)))) - (lm[i] - np.log(np.sum(np.exp(lm))))
    return total / (2 * n)


def _check(torch_fn, ref_fn, arrays, atol=1e-9, grad_atol=1e-6):
    """Value and gradient (central finite differences of the NumPy reference) of torch_fn vs ref_fn."""
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    loss = torch_fn(*tensors)
    ref = ref_fn(*arrays)
    assert loss.item() == pytest.approx(ref, abs=atol)
    loss.backward()
    eps = 1e-6
    for k, a in enumerate(arrays):
        fd = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus = [x.copy() for x in arrays]; plus[k][idx] += eps
            minus = [x.copy() for x in arrays]; minus[k][idx] -= eps
            fd[idx] = (ref_fn(*plus) - ref_fn(*minus)) / (2 * eps)
        np.testing.assert_allclose(tensors[k].grad.numpy(), fd, atol=grad_atol)


RNG = np.random.default_rng(0)
# four examples of three compounds (compound 7 twice), two views each, DMSO controls per view
LABELS = np.array([7, 3, 7, 5])


def test_supcon_matches_reference_with_anchor_mask_and_lonely_rows():
    x = RNG.normal(size=(7, 3))
    labels = np.array([0, 1, 0, 2, 1, 0, 9])  # label 9 has no positive: skipped
    mask = np.array([1, 1, 1, 1, 0, 1, 1], bool)
    lab = torch.tensor(labels)
    _check(lambda f: losses.supcon_loss(f, lab, 0.5), lambda f: ref_supcon(f, labels, 0.5), [x])
    _check(lambda f: losses.supcon_loss(f, lab, 0.3, anchor_mask=torch.tensor(mask)),
           lambda f: ref_supcon(f, labels, 0.3, mask), [x])


@pytest.mark.parametrize("dmso_positives", [False, True])
@pytest.mark.parametrize("control_shape", [(4, 2, 3), (5, 3)])
def test_paclr_matches_reference(dmso_positives, control_shape):
    treated = RNG.normal(size=(4, 2, 3))
    controls = RNG.normal(size=control_shape)
    lab = torch.tensor(LABELS)
    _check(lambda t, c: losses.paclr_loss(t, c, lab, 0.4, dmso_positives=dmso_positives),
           lambda t, c: ref_paclr(t, c, LABELS, 0.4, dmso_positives), [treated, controls])


def test_paclr_modes_differ_and_dmso_only_negative_in_paper_mode():
    treated = torch.tensor(RNG.normal(size=(4, 2, 3)))
    controls = torch.tensor(RNG.normal(size=(4, 2, 3)), requires_grad=True)
    lab = torch.tensor(LABELS)
    paper = losses.paclr_loss(treated, controls, lab, 0.4)
    official = losses.paclr_loss(treated, controls, lab, 0.4, dmso_positives=True)
    assert not torch.isclose(paper, official)
    # paper mode: pushing a control towards its treated partner must raise the loss (it is a negative)
    moved = controls.detach().clone()
    moved[0, 0] = treated[0, 0] * 10
    assert losses.paclr_loss(treated, moved, lab, 0.4) > paper


@pytest.mark.parametrize("mode", ["union", "cross"])
def test_counterfactual_matches_reference(mode):
    generated = RNG.normal(size=(4, 2, 3))
    target = RNG.normal(size=(4, 2, 3))
    lab = torch.tensor(LABELS)
    _check(lambda g, t: losses.counterfactual_paclr_loss(g, t, lab, 0.25, mode=mode),
           lambda g, t: ref_counterfactual(g, t, LABELS, 0.25, mode), [generated, target])


def test_simclr_matches_reference():
    v1, v2 = RNG.normal(size=(5, 3)), RNG.normal(size=(5, 3))
    _check(lambda a, b: losses.simclr_loss(a, b, 0.2), lambda a, b: ref_simclr(a, b, 0.2), [v1, v2])


def test_clip_matches_reference_and_scale_gradient():
    img, mol = RNG.normal(size=(5, 3)), RNG.normal(size=(5, 3))
    _check(lambda a, b: losses.clip_loss(a, b, 3.0), lambda a, b: ref_clip(a, b, 3.0), [img, mol])
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    losses.clip_loss(torch.tensor(img), torch.tensor(mol), scale).backward()
    eps = 1e-6
    fd = (ref_clip(img, mol, 3.0 + eps) - ref_clip(img, mol, 3.0 - eps)) / (2 * eps)
    assert scale.grad.item() == pytest.approx(fd, abs=1e-6)


def test_clip_with_views_averages_views():
    img, mol = torch.tensor(RNG.normal(size=(4, 2, 3))), torch.tensor(RNG.normal(size=(4, 3)))
    expected = (ref_clip(img[:, 0].numpy(), mol.numpy(), 2.0) + ref_clip(img[:, 1].numpy(), mol.numpy(), 2.0)) / 2
    assert losses.clip_loss(img, mol, 2.0).item() == pytest.approx(expected, abs=1e-9)


def test_micon_loss_combines_terms():
    out = {k: torch.tensor(RNG.normal(size=(4, 2, 3))) for k in ("treated", "control", "generated", "target")}
    out["labels"] = torch.tensor(LABELS)
    res = losses.micon_loss(out, temperature=0.5, counterfactual_weight=0.3, dmso_positives=True)
    p = ref_paclr(out["treated"].numpy(), out["control"].numpy(), LABELS, 0.5, True)
    c = ref_counterfactual(out["generated"].numpy(), out["target"].numpy(), LABELS, 0.5, "union")
    assert res["loss"].item() == pytest.approx(p + 0.3 * c, abs=1e-9)
    assert res["paclr"].item() == pytest.approx(p, abs=1e-9)


def test_low_precision_inputs_are_scored_in_float32():
    x = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    lab = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = losses.supcon_loss(x, lab, 0.1)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_bad_shapes_have_clear_errors():
    with pytest.raises(ValueError, match=r"treated must be \[B, V, D\]"):
        losses.paclr_loss(torch.randn(4, 3), torch.randn(4, 3), torch.arange(4))
    with pytest.raises(ValueError, match="labels must be"):
        losses.paclr_loss(torch.randn(4, 2, 3), torch.randn(4, 3), torch.arange(3))
    with pytest.raises(ValueError, match="mode"):
        losses.counterfactual_paclr_loss(torch.randn(2, 2, 3), torch.randn(2, 2, 3), torch.arange(2), mode="x")
    with pytest.raises(ValueError, match="temperature"):
        losses.supcon_loss(torch.randn(4, 3), torch.arange(4), 0.0)


def test_chance_levels_are_the_losses_of_an_encoder_that_tells_nothing_apart():
    """Every method's declared chance level equals its loss on constant embeddings (uniform softmax)."""
    from micon.methods import LossConfig, get_method

    b, d = 6, 8
    z = torch.ones(b, 2, d)
    labels = torch.arange(b)
    cfg = LossConfig(temperature=0.1)
    paclr = losses.paclr_loss(z, torch.ones(b, 2, d), labels, 0.1)
    assert paclr.item() == pytest.approx(get_method("paclr").chance_loss(b, cfg), rel=1e-5)
    out = {"treated": z, "control": torch.ones(b, 2, d), "generated": z, "target": z, "labels": labels}
    for mode in ("union", "cross"):
        c = LossConfig(temperature=0.1, counterfactual_mode=mode, counterfactual_weight=0.5)
        total = losses.micon_loss(out, temperature=0.1, counterfactual_weight=0.5, counterfactual_mode=mode)["loss"]
        assert total.item() == pytest.approx(get_method("micon").chance_loss(b, c), rel=1e-5)
    assert losses.simclr_loss(z[:, 0], z[:, 1], 0.1).item() == pytest.approx(get_method("simclr").chance_loss(b, cfg))
    assert losses.clip_loss(z[:, 0], torch.ones(b, d), 10.0).item() == pytest.approx(
        get_method("clip").chance_loss(b, cfg), rel=1e-5)
