"""Contrastive objectives of MICON and its baselines: SupCon, PaCLR, counterfactual PaCLR, CLIP, SimCLR.

Every loss is rank-aware: embeddings are all-gathered *with* gradients, each rank scores only its own
rows as anchors (open_clip's "local loss"), and the value is scaled so that the mean of the per-rank
losses equals the single-process loss on the concatenated batch. Pure tensor code: no I/O, and no
process-group set-up (the training job initialises torch.distributed; without it nothing is gathered).

Gradient convention (all losses): the all-gather backward sums the gradients of every rank's loss
into the owning rank, so after DDP/DeepSpeed *average* the parameter gradients over ranks they equal
the gradient of the single-process loss on the concatenated batch. All ranks must pass tensors of the
same shape (drop incomplete last batches). Logits are computed in at least float32.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from micon.distributed import gather_no_grad, gather_with_grad, global_sum, rank_world

__all__ = [
    "gather_with_grad",
    "supcon_loss",
    "paclr_loss",
    "counterfactual_paclr_loss",
    "micon_loss",
    "clip_loss",
    "simclr_loss",
]

# Key kinds: a row is a positive of an anchor only if label, scope and kind all match.
_TREATED, _CONTROL = 0, 1


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _keys(labels: Tensor, kind: int, labels_are_global: bool) -> Tensor:
    """[n, 3] int64 keys (label, scope, kind); scope is this rank for rank-local labels, else -1."""
    rank, _ = rank_world()
    labels = labels.reshape(-1).long()
    scope = torch.full_like(labels, -1 if labels_are_global else rank)
    return torch.stack([labels, scope, torch.full_like(labels, kind)], dim=1)


# ---------------------------------------------------------------------------------------------
# the shared multi-positive InfoNCE core
# ---------------------------------------------------------------------------------------------

def _multi_positive_nce(anchors: Tensor, anchor_keys: Tensor, anchor_rows: Tensor | None,
                        candidates: Tensor | None, candidate_keys: Tensor | None,
                        temperature: float) -> Tensor:
    """Mean over all ranks' valid anchors of -1/|P(a)| sum_{p in P(a)} log softmax_a(p).

    anchors [n, D] (local), anchor_keys [n, 3]; `anchor_rows` [n] bool picks which local rows are
    anchors (None: all). If `candidates` is None the candidate set is the gathered anchors themselves
    (SupCon: an anchor is excluded from its own denominator and positives); else it is the gathered
    `candidates` [m, D] with `candidate_keys` [m, 3]. P(a) = candidates whose key equals the anchor's;
    anchors with no positive are skipped. Returns world * (sum of local anchor losses) / (global count),
    whose mean over ranks is the single-process mean.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rank, world = rank_world()
    dtype = _compute_dtype(anchors)
    n = anchors.shape[0]
    same_set = candidates is None
    if same_set:
        candidates, candidate_keys = anchors, anchor_keys
    all_candidates = gather_with_grad(candidates).to(dtype)
    all_keys = gather_no_grad(candidate_keys)

    local = torch.arange(n, device=anchors.device)
    if anchor_rows is not None:
        local = local[anchor_rows.reshape(-1).to(anchors.device)]
    a = anchors[local].to(dtype)
    logits = a @ all_candidates.T / temperature                                     # [n_a, N]
    ak = anchor_keys[local]
    positives = ak[:, None, 0] == all_keys[None, :, 0]                              # [n_a, N]
    for col in range(1, ak.shape[1]):  # column by column: no [n_a, N, 3] intermediate
        positives &= ak[:, None, col] == all_keys[None, :, col]
    if same_set:
        self_col = local + rank * n
        is_self = torch.zeros_like(positives)
        is_self[torch.arange(local.numel(), device=a.device), self_col] = True
        positives &= ~is_self
        logits = logits.masked_fill(is_self, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    n_pos = positives.sum(1)
    pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(1)
    valid = n_pos > 0
    per_anchor = torch.where(valid, -pos_log_prob / n_pos.clamp(min=1), torch.zeros_like(pos_log_prob))
    n_valid = global_sum(valid.sum().to(dtype))
    return per_anchor.sum() * world / n_valid.clamp(min=1)


# ---------------------------------------------------------------------------------------------
# public losses
# ---------------------------------------------------------------------------------------------

def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.1, *,
                anchor_mask: Tensor | None = None, labels_are_global: bool = False,
                normalize: bool = True) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) over L2-normalised features.

    features [n, D], labels [n] int. For anchor i (every row, or rows where `anchor_mask` [n] is True):
    l_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p/t) / sum_{a != i} exp(z_i.z_a/t) ), with
    P(i) = {p != i : labels[p] == labels[i]} and the denominator over every other row (anchor or not).
    Returns the mean of l_i over anchors with |P(i)| >= 1 (anchors without positives are skipped).
    Distributed: rows are gathered from all ranks; labels are rank-local (equal labels on different
    ranks are *different* classes) unless `labels_are_global`.
    """
    return _multi_positive_nce(_normalize(features, normalize), _keys(labels, _TREATED, labels_are_global),
                               anchor_mask, None, None, temperature)


def paclr_loss(treated: Tensor, controls: Tensor, labels: Tensor, temperature: float = 0.1, *,
               dmso_positives: bool = False, labels_are_global: bool = False,
               normalize: bool = True) -> Tensor:
    """PaCLR: perturbation-aware SupCon over treated views and their same-plate DMSO controls.

    treated [B, V, D]: V views (replicate images) of compound b with label labels[b] ([B] int);
    controls [B, Vc, D] or [M, D]: DMSO control images (their pairing with examples does not matter).
    Rows = all treated views plus all controls (gathered over ranks); every row is in every
    denominator except the anchor itself. Positives of a treated anchor: the other treated rows with
    the same compound label (its other views, and other examples of that compound). Controls are
    never positives of a treated anchor, so they act as hard negatives carrying the plate effect.

    * dmso_positives=False (paper text, default): control rows are *not anchors*; they only appear
      as negatives in the treated anchors' denominators. Loss = mean over the B*V treated anchors.
    * dmso_positives=True (official microsoft/MICON code, label 0 for every DMSO image): control rows
      are anchors too and their positives are all other control rows (across ranks). Loss = mean over
      all B*V + M anchors.
    """
    if treated.dim() != 3:
        raise ValueError(f"treated must be [B, V, D], got shape {tuple(treated.shape)}")
    b, v, d = treated.shape
    if labels.shape != (b,):
        raise ValueError(f"labels must be [B]={b} compound labels, got shape {tuple(labels.shape)}")
    if controls.shape[-1] != d:
        raise ValueError(f"controls have dim {controls.shape[-1]}, treated have {d}")
    controls = controls.reshape(-1, d)
    m = controls.shape[0]
    feats = torch.cat([treated.reshape(b * v, d), controls], dim=0)
    keys = torch.cat([_keys(labels.repeat_interleave(v), _TREATED, labels_are_global),
                      _keys(torch.zeros(m, dtype=torch.long, device=labels.device), _CONTROL, True)])
    anchor_rows = None
    if not dmso_positives:
        anchor_rows = torch.arange(b * v + m, device=treated.device) < b * v
    return _multi_positive_nce(_normalize(feats, normalize), keys, anchor_rows, None, None, temperature)


def counterfactual_paclr_loss(generated: Tensor, target: Tensor, labels: Tensor, temperature: float = 0.1,
                              *, mode: Literal["union", "cross"] = "union", labels_are_global: bool = False,
                              normalize: bool = True) -> Tensor:
    """Counterfactual PaCLR between generated (control + compound) and real treated embeddings.

    generated, target [B, V, D]: G's prediction from view v's control, and the real treated view v;
    labels [B] compound labels. Positives are defined by compound label only.

    * mode="union" (official code): SupCon over the 2*B*V rows {target} U {generated}; every row is an
      anchor, positives = all other rows of the same compound (generated or real, any view),
      denominator = all other rows. Loss = mean over the 2*B*V anchors.
    * mode="cross": anchors = generated rows only, candidates = real target rows only; positives of
      generated g_{b,v} = targets of the same compound (all views, including t_{b,v}), denominator =
      all target rows. Loss = mean over the B*V generated anchors.
    The total MICON objective is paclr + lambda * this (see `micon_loss`).
    """
    if generated.shape != target.shape or generated.dim() != 3:
        raise ValueError(f"generated and target must both be [B, V, D], got {tuple(generated.shape)} "
                         f"and {tuple(target.shape)}")
    b, v, d = generated.shape
    if labels.shape != (b,):
        raise ValueError(f"labels must be [B]={b} compound labels, got shape {tuple(labels.shape)}")
    keys = _keys(labels.repeat_interleave(v), _TREATED, labels_are_global)
    gen = _normalize(generated.reshape(b * v, d), normalize)
    tgt = _normalize(target.reshape(b * v, d), normalize)
    if mode == "union":
        return _multi_positive_nce(torch.cat([tgt, gen]), torch.cat([keys, keys]), None, None, None, temperature)
    if mode == "cross":
        return _multi_positive_nce(gen, keys, None, tgt, keys, temperature)
    raise ValueError(f"counterfactual mode must be 'union' or 'cross', got {mode!r}")


def micon_loss(outputs: dict[str, Tensor], *, temperature: float = 0.1,
               counterfactual_weight: float = 1.0, counterfactual_temperature: float | None = None,
               dmso_positives: bool = False, counterfactual_mode: Literal["union", "cross"] = "union",
               labels_are_global: bool = False) -> dict[str, Tensor]:
    """Total MICON objective from `MICON.forward` outputs: loss = paclr + weight * counterfactual.

    Reads outputs["treated"], ["control"], ["generated"], ["target"] (each [B, V, P]) and ["labels"] [B].
    Returns {"loss", "paclr", "counterfactual"} (scalars; the last two for logging).
    """
    paclr = paclr_loss(outputs["treated"], outputs["control"], outputs["labels"], temperature,
                       dmso_positives=dmso_positives, labels_are_global=labels_are_global)
    if counterfactual_weight == 0:
        cf = paclr.new_zeros(())
    else:
        cf = counterfactual_paclr_loss(outputs["generated"], outputs["target"], outputs["labels"],
                                       counterfactual_temperature or temperature, mode=counterfactual_mode,
                                       labels_are_global=labels_are_global)
    return {"loss": paclr + counterfactual_weight * cf, "paclr": paclr.detach(), "counterfactual": cf.detach()}


def simclr_loss(view1: Tensor, view2: Tensor, temperature: float = 0.1, *, normalize: bool = True) -> Tensor:
    """NT-Xent (SimCLR): view1, view2 [n, D] are two augmentations of the same n images.

    Over the 2n rows (gathered over ranks), anchor i's only positive is its other view and its
    denominator is every other row; loss = mean over the 2n anchors.
    """
    if view1.shape != view2.shape or view1.dim() != 2:
        raise ValueError(f"view1 and view2 must both be [n, D], got {tuple(view1.shape)} and {tuple(view2.shape)}")
    n = view1.shape[0]
    idx = torch.arange(n, device=view1.device)
    return supcon_loss(torch.cat([view1, view2]), torch.cat([idx, idx]), temperature, normalize=normalize)


def clip_loss(image: Tensor, molecule: Tensor, logit_scale: Tensor | float, *, normalize: bool = True) -> Tensor:
    """Symmetric InfoNCE (CLIP/CLOOME) between image [n, D] (or [n, V, D]) and molecule [n, D].

    logits = logit_scale * img . mol^T (logit_scale is the multiplier, i.e. exp of the learnable log
    scale, already clamped); loss = (CE(image->molecule) + CE(molecule->image)) / 2 with the matching
    pair as target; with V views per compound the per-view losses are averaged (official MICON).
    Distributed: local rows against all gathered rows, targets arange(n) + rank * n.
    """
    if image.dim() == 3:
        return torch.stack([clip_loss(image[:, v], molecule, logit_scale, normalize=normalize)
                            for v in range(image.shape[1])]).mean()
    if image.dim() != 2 or image.shape != molecule.shape:
        raise ValueError(f"image and molecule must both be [n, D], got {tuple(image.shape)} and {tuple(molecule.shape)}")
    rank, _ = rank_world()
    dtype = _compute_dtype(image)
    img = _normalize(image, normalize).to(dtype)
    mol = _normalize(molecule, normalize).to(dtype)
    all_img, all_mol = gather_with_grad(img), gather_with_grad(mol)
    targets = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
    loss_img = F.cross_entropy(logit_scale * img @ all_mol.T, targets)
    loss_mol = F.cross_entropy(logit_scale * mol @ all_img.T, targets)
    return (loss_img + loss_mol) / 2


def _normalize(x: Tensor, normalize: bool) -> Tensor:
    return F.normalize(x, dim=-1) if normalize else x
