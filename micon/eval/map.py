"""The mAP framework with copairs semantics: per-profile average precision of retrieving positives
(pairs named by sameby/diffby columns) against negatives, mean AP per group, permutation p-values,
Benjamini-Hochberg correction and the fraction retrieved.

Blockwise and vectorised: query blocks generate their candidate pairs from group codes, similarities
come from a row gather or one block x N product, never an N x N matrix, and no pair list of the whole
dataset (copairs' memory problem). Pure: no I/O, no on-disk null cache (copairs writes ~/.copairs).

Ties (the one deliberate difference from copairs): copairs ranks positives first among equal
similarities, so a constant embedding scores AP = 1. Here the default `ties="expected"` scores a tie
block by the expected AP over a uniformly random order of its members (closed form), so a constant
embedding scores the chance level; "positives_first" (copairs) and "negatives_first" are available.
Without ties (continuous features) all three equal copairs' values.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import digamma

from micon import schema
from micon.eval.profiles import l2_normalize

__all__ = [
    "average_precision",
    "mean_average_precision",
    "null_average_precision",
    "benjamini_hochberg",
    "fraction_retrieved",
    "expected_average_precision",
    "chance_map",
    "phenotypic_activity",
    "phenotypic_consistency",
    "REFERENCE_INDEX",
]

Ties = Literal["expected", "positives_first", "negatives_first"]
# copairs' assign_reference_index convention: -1 for non-controls, the row number for each control,
# so that controls are never positives of each other and only controls are negatives.
REFERENCE_INDEX = "Metadata_Reference_Index"


# ---------------------------------------------------------------------------------------------
# rank arithmetic
# ---------------------------------------------------------------------------------------------

def _harmonic_span(c: np.ndarray, n: np.ndarray) -> np.ndarray:
    """sum_{k=c+1}^{c+n} 1/k, elementwise: exact for spans up to 16 (1/(c+1) for the common untied
    case), digamma differences beyond."""
    c, n = np.broadcast_arrays(np.asarray(c, dtype=np.float64), np.asarray(n, dtype=np.int64))
    shape = c.shape
    c, n = c.ravel(), n.ravel()
    out = np.where(n == 1, 1.0 / (c + 1.0), 0.0)
    short = np.flatnonzero((n > 1) & (n <= 16))
    if short.size:
        cs, ns = c[short], n[short]
        j = np.arange(1, 17)
        out[short] = np.where(j[None, :] <= ns[:, None], 1.0 / (cs[:, None] + j[None, :]), 0.0).sum(axis=1)
    long = np.flatnonzero(n > 16)
    if long.size:
        out[long] = digamma(c[long] + n[long] + 1.0) - digamma(c[long] + 1.0)
    return out.reshape(shape)


def _tie_block_precision(a, n, c, t, ties: Ties) -> np.ndarray:
    """Sum of precision@k over the positives of a tie block: `a` positives among `n` tied items that
    follow `c` ranked items of which `t` are positives."""
    a = a.astype(np.float64)
    c = c.astype(np.float64)
    t = t.astype(np.float64)
    if ties == "positives_first":
        return a + (t - c) * _harmonic_span(c, a.astype(np.int64))
    if ties == "negatives_first":
        b = n - a
        return a + (t - c - b) * _harmonic_span(c + b, a.astype(np.int64))
    if ties != "expected":
        raise ValueError(f"ties must be 'expected', 'positives_first' or 'negatives_first', got {ties!r}")
    # E[sum_k rel_k TP_k / k] over random orders: position k (c < k <= c+n) is positive with
    # probability a/n and then has t + 1 + (k-c-1)(a-1)/(n-1) positives at or above it.
    h = _harmonic_span(c, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.where(n > 1, (a - 1) / np.maximum(n - 1, 1) * (n - (c + 1) * h), 0.0)
    return np.where(a > 0, a / n * ((t + 1) * h + spread), 0.0)


def expected_average_precision(n_pos: np.ndarray, n_total: np.ndarray) -> np.ndarray:
    """Expected AP of a uniformly random ranking with M positives among L items (copairs' mu0)."""
    M = np.asarray(n_pos, dtype=np.int64)
    L = np.asarray(n_total, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = _tie_block_precision(M, L, np.zeros_like(M), np.zeros_like(M), "expected") / M
    return np.where(M > 0, mu, 0.0)


def chance_map(ap: pd.DataFrame, group_col: str = schema.JCP) -> pd.Series:
    """Per group (compound): the mAP a random ranking is expected to give, the mean over the group's scored
    wells (`average_precision` rows with positives) of `expected_average_precision`."""
    scored = ap[(ap["n_pos_pairs"] > 0).to_numpy()]
    mu = expected_average_precision(scored["n_pos_pairs"].to_numpy(), scored["n_total_pairs"].to_numpy())
    return pd.Series(mu).groupby(scored[group_col].to_numpy()).mean()


def _normalize_ap(ap: np.ndarray, M: np.ndarray, L: np.ndarray) -> np.ndarray:
    """copairs normalize_ap: (AP - mu0) / max(1 - mu0, 1e-10), clipped to [-1, 1]."""
    mu0 = expected_average_precision(M, np.maximum(L, 1))
    with np.errstate(invalid="ignore"):
        return np.clip((ap - mu0) / np.maximum(1.0 - mu0, 1e-10), -1.0, 1.0)


# Similarities below this size are ranked as 0: profiles orthogonal in exact arithmetic give +-1e-17 that
# depends on the summation order (a row gather, a matrix product, a GPU), which would break their ties.
ZERO_SIMILARITY = 2.0 ** -30


def _rank_resolution(sims: np.ndarray) -> np.ndarray:
    """float64 similarities -> the float32 values that are ranked (see ZERO_SIMILARITY)."""
    out = sims.astype(np.float32)
    out[np.abs(out) < ZERO_SIMILARITY] = 0.0
    return out


# ---------------------------------------------------------------------------------------------
# pair generation from group codes
# ---------------------------------------------------------------------------------------------

def _codes(meta: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    if not columns:
        return np.zeros(len(meta), dtype=np.int64)
    return meta.groupby(list(columns), sort=False, observed=True).ngroup().to_numpy(np.int64)


class _Groups:
    """CSR view of rows grouped by a code: the candidates of row q are order[starts[g]:starts[g]+sizes[g]]."""

    def __init__(self, key: np.ndarray):
        self.key = key
        self.order = np.argsort(key, kind="stable")
        self.sizes = np.bincount(key) if len(key) else np.zeros(0, np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    def candidates(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = self.key[queries]
        lengths = self.sizes[g]
        q_rep = np.repeat(queries, lengths)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return q_rep, self.order[np.repeat(self.starts[g], lengths) + offsets]


def _gather_similarity(x: np.ndarray, q: np.ndarray, c: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Cosine similarity of unit rows for each (q, c) pair, rows gathered into two small reused
    buffers (allocating a fresh pairs x d matrix per chunk costs more in page faults than the maths)."""
    out = np.empty(len(q), dtype=x.dtype)
    buf_q = np.empty((min(chunk, len(q)), x.shape[1]), dtype=x.dtype)
    buf_c = np.empty_like(buf_q)
    for i in range(0, len(q), chunk):
        j = min(i + chunk, len(q))
        a, b = buf_q[:j - i], buf_c[:j - i]
        np.take(x, q[i:j], axis=0, out=a)
        np.take(x, c[i:j], axis=0, out=b)
        out[i:j] = np.einsum("ij,ij->i", a, b)
    return out


def _scored_pairs(groups: _Groups, diff_codes: list[np.ndarray], queries: np.ndarray, scored: np.ndarray,
                  x: np.ndarray, dense_group: int = 64):
    """Pairs of a block's queries under one rule: (query, candidate, similarity) for the `scored`
    queries, and the number of pairs of every query (`scored` False: counted, never compared).

    Small groups (replicates of a compound): candidates are listed and their rows gathered. Large
    groups (a plate, or everything when there is no sameby column): one product of the group's
    queries against the group's members, so each profile row is read once per group, not per pair.
    """
    counts = np.zeros(len(queries), dtype=np.int64)
    local = np.arange(len(queries))
    g = groups.key[queries]
    if not len(queries) or groups.sizes[g].mean() < dense_group:
        q, c = groups.candidates(queries)
        ql = np.repeat(local, groups.sizes[g])
        keep = q != c
        for codes in diff_codes:
            keep &= codes[q] != codes[c]
        counts += np.bincount(ql[keep], minlength=len(queries))
        keep &= scored[ql]
        q, c = q[keep], c[keep]
        return q, c, _gather_similarity(x, q, c), counts
    out_q, out_c, out_s = [], [], []
    by_group = np.argsort(g, kind="stable")
    for rows in np.split(by_group, np.flatnonzero(np.diff(g[by_group])) + 1):
        qs = queries[rows]
        gid = g[rows[0]]
        members = groups.order[groups.starts[gid]:groups.starts[gid] + groups.sizes[gid]]
        keep = qs[:, None] != members[None, :]
        for codes in diff_codes:
            keep &= codes[qs][:, None] != codes[members][None, :]
        counts[rows] = keep.sum(axis=1)
        keep &= scored[rows][:, None]
        live = np.flatnonzero(keep.any(axis=1))
        if not live.size:
            continue
        sims = x[qs[live]] @ x[members].T
        qi, mj = np.nonzero(keep[live])
        out_q.append(qs[live][qi])
        out_c.append(members[mj])
        out_s.append(sims[qi, mj])
    if not out_q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, x.dtype), counts
    return np.concatenate(out_q), np.concatenate(out_c), np.concatenate(out_s), counts


def _block_ap(q, c_sim, rel, n_rows_block, b0, ties: Ties):
    """AP (sum of precision at positives), positives and totals per query row of one block."""
    order = np.lexsort((-c_sim, q))
    q, s, rel = q[order] - b0, c_sim[order], rel[order]
    M = np.bincount(q, weights=rel, minlength=n_rows_block)
    L = np.bincount(q, minlength=n_rows_block)
    if not len(q):
        return np.zeros(n_rows_block), M, L
    new = np.ones(len(q), dtype=bool)
    new[1:] = (q[1:] != q[:-1]) | (s[1:] != s[:-1])
    starts = np.flatnonzero(new)
    n = np.diff(np.append(starts, len(q)))
    a = np.add.reduceat(rel, starts)
    block_q = q[starts]
    query_start = np.concatenate([[0], np.cumsum(L)])[block_q]
    c = starts - query_start
    cum_rel = np.concatenate([[0], np.cumsum(rel)])
    t = cum_rel[starts] - cum_rel[query_start]
    contrib = _tie_block_precision(a, n, c, t, ties)
    return np.bincount(block_q, weights=contrib, minlength=n_rows_block), M, L


# ---------------------------------------------------------------------------------------------
# the same AP in torch, on any device (a GPU at consortium size; the CPU for the tests)
# ---------------------------------------------------------------------------------------------

# similarities per query block on a device (every query of the block against every profile)
DEVICE_BLOCK_SIMS = 1 << 26


def _device_rule_mask(q, same_code, diff_codes: list):
    """(block, N) bool: candidate j of query q under one rule (same group, different in every diffby
    column, not the query itself)."""
    import torch

    n = same_code.shape[0]
    mask = same_code[q][:, None] == same_code[None, :]
    mask &= q[:, None] != torch.arange(n, device=q.device)[None, :]
    for codes in diff_codes:
        mask &= codes[q][:, None] != codes[None, :]
    return mask


def _device_tie_blocks(x64, pos, neg, b0: int, b1: int):
    """One query block's tie blocks that hold positives, in `_block_ap`'s order (query, then similarity
    descending), with their counts: (query row, a, n, c, t) as int64 NumPy arrays, plus the positives M
    and all candidates L per query. Similarities are float64 products ranked at float32 resolution, as
    on the CPU; every count is an exact integer, so `_tie_block_precision` then gives the CPU's numbers."""
    import torch

    q = torch.arange(b0, b1, device=x64.device)
    sims = (x64[b0:b1] @ x64.T).to(torch.float32)
    sims.masked_fill_(sims.abs() < ZERO_SIMILARITY, 0.0)            # as _rank_resolution
    pos_mask = _device_rule_mask(q, *pos)
    neg_mask = _device_rule_mask(q, *neg)
    M = pos_mask.sum(1)
    L = M + neg_mask.sum(1)
    m_max = int(M.max()) if len(q) else 0
    if not m_max:
        z = np.zeros(0, np.int64)
        return (z, z, z, z, z), M.cpu().numpy(), L.cpu().numpy()
    # each query's positive similarities, descending; -inf pads rows with fewer than m_max positives
    pos_vals = torch.topk(torch.where(pos_mask, sims, float("-inf")), m_max, dim=1, sorted=True).values
    first = torch.ones_like(pos_vals, dtype=torch.bool)
    first[:, 1:] = pos_vals[:, 1:] != pos_vals[:, :-1]
    first &= torch.arange(m_max, device=x64.device)[None, :] < M[:, None]
    counts = torch.zeros((4, *pos_vals.shape), dtype=torch.int64, device=x64.device)   # a, n, c, t
    for j in range(m_max):
        s = pos_vals[:, j:j + 1]
        above, tied = sims > s, sims == s
        counts[0, :, j] = (tied & pos_mask).sum(1)
        counts[1, :, j] = counts[0, :, j] + (tied & neg_mask).sum(1)
        counts[3, :, j] = (above & pos_mask).sum(1)
        counts[2, :, j] = counts[3, :, j] + (above & neg_mask).sum(1)
    rows, slots = torch.nonzero(first, as_tuple=True)        # row-major: query, then similarity descending
    a, n, c, t = counts[:, rows, slots].cpu().numpy()
    return (rows.cpu().numpy(), a, n, c, t), M.cpu().numpy(), L.cpu().numpy()


def _device_average_precision(x: np.ndarray, pos: tuple, neg: tuple, ties: Ties, device: str, progress: bool):
    """Per-row AP sum, positives and totals of `average_precision`, every query block on `device`.
    `pos`/`neg`: (same-group code, [diffby codes]) of each rule as NumPy int64 arrays."""
    import torch

    dev = torch.device("cpu" if device == "torch:cpu" else device)
    x64 = torch.from_numpy(x).to(dev, torch.float64)
    pos_t, neg_t = ((torch.tensor(same, device=dev), [torch.tensor(c, device=dev) for c in diff])
                    for same, diff in (pos, neg))
    n = len(x)
    rows = max(1, DEVICE_BLOCK_SIMS // max(n, 1))
    bounds = [(b0, min(b0 + rows, n)) for b0 in range(0, n, rows)]
    if progress:
        from micon.progress import bar as progress_bar
        bounds = progress_bar(bounds, desc=f"average precision blocks ({device})", unit="block")
    ap_sum = np.zeros(n)
    n_pos = np.zeros(n, dtype=np.int64)
    n_total = np.zeros(n, dtype=np.int64)
    for b0, b1 in bounds:
        (q, a, nn, c, t), M, L = _device_tie_blocks(x64, pos_t, neg_t, b0, b1)
        contrib = _tie_block_precision(a, nn, c, t, ties)
        ap_sum[b0:b1] = np.bincount(q, weights=contrib, minlength=b1 - b0)
        n_pos[b0:b1], n_total[b0:b1] = M, L
    return ap_sum, n_pos, n_total


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def average_precision(meta: pd.DataFrame, feats: np.ndarray, pos_sameby: Sequence[str], pos_diffby: Sequence[str],
                      neg_sameby: Sequence[str], neg_diffby: Sequence[str], *, ties: Ties = "expected",
                      max_pairs: int = 4_000_000, progress: bool = False, device: str = "auto") -> pd.DataFrame:
    """Per-profile AP with copairs' pair rules (`copairs.map.average_precision`, cosine similarity).

    Row j is a positive of row i (i != j) when it equals i in every `pos_sameby` column and differs
    in every `pos_diffby` column; a negative likewise with `neg_sameby` / `neg_diffby` (a pair meeting
    both rules counts twice, as in copairs). Returns a copy of `meta` (index reset) with
    `average_precision` (NaN without positives), `normalized_average_precision`, `n_pos_pairs` and
    `n_total_pairs`. Memory is bounded by `max_pairs` candidate pairs per query block.

    Similarities are computed in float64 and ranked at float32 resolution (copairs ranks float32
    values too), those below ZERO_SIMILARITY as 0: equal profiles tie whichever product computed them
    (a row gather for small groups, a matrix product for large ones), and the `ties` rule then decides.

    `device` (micon.eval.retrieval.resolve_device; "auto": a GPU when torch sees one) scores each query
    block against every profile there (DEVICE_BLOCK_SIMS similarities per block) and counts, for each
    positive, the candidates above and tied with it; the AP arithmetic is then the CPU's, so the
    numbers are the same. It pays where groups are large (consistency without `neg_sameby`: N^2 pairs).
    """
    from micon.eval.retrieval import resolve_device

    device = resolve_device(device)
    pos_sameby, pos_diffby = list(pos_sameby), list(pos_diffby)
    neg_sameby, neg_diffby = list(neg_sameby), list(neg_diffby)
    for name, same, diff in (("pos", pos_sameby, pos_diffby), ("neg", neg_sameby, neg_diffby)):
        if set(same) & set(diff):
            raise ValueError(f"{name}_sameby and {name}_diffby must be disjoint, both hold {set(same) & set(diff)}")
        if not same and not diff:
            raise ValueError(f"give at least one {name}_sameby or {name}_diffby column")
    columns = sorted(set(pos_sameby + pos_diffby + neg_sameby + neg_diffby))
    missing = [col for col in columns if col not in meta.columns]
    if missing:
        raise KeyError(f"average_precision: metadata lacks column(s) {missing}; it has {list(meta.columns)}")
    if meta[columns].isna().any(axis=None):
        raise ValueError(f"average_precision: metadata columns {columns} must not hold missing values")
    if len(meta) != len(feats):
        raise ValueError(f"average_precision: metadata has {len(meta)} rows, features {len(feats)}")
    out = meta.reset_index(drop=True).copy()
    x = l2_normalize(feats, np.float64)
    n = len(out)
    col_codes = {col: _codes(out, [col]) for col in columns}
    pos_groups, neg_groups = _Groups(_codes(out, pos_sameby)), _Groups(_codes(out, neg_sameby))
    pos_diff = [col_codes[col] for col in pos_diffby]
    neg_diff = [col_codes[col] for col in neg_diffby]

    if device != "cpu":
        ap_sum, n_pos, n_total = _device_average_precision(
            x, (pos_groups.key, pos_diff), (neg_groups.key, neg_diff), ties, device, progress)
        return _ap_frame(out, ap_sum, n_pos, n_total)

    # split queries into blocks of at most max_pairs candidate pairs (before diffby filtering)
    per_query = pos_groups.sizes[pos_groups.key] + neg_groups.sizes[neg_groups.key]
    cum = np.cumsum(per_query)
    bounds, b0 = [], 0
    while b0 < n:
        b1 = max(b0 + 1, int(np.searchsorted(cum, (cum[b0 - 1] if b0 else 0) + max_pairs, side="right")))
        bounds.append((b0, min(b1, n)))
        b0 = min(b1, n)
    if progress:
        from micon.progress import bar as progress_bar
        bounds = progress_bar(bounds, desc="average precision blocks", unit="block")

    ap_sum = np.zeros(n)
    n_pos = np.zeros(n, dtype=np.int64)
    n_total = np.zeros(n, dtype=np.int64)
    for b0, b1 in bounds:
        queries = np.arange(b0, b1)
        everyone = np.ones(len(queries), dtype=bool)
        qp, cp, sp, m = _scored_pairs(pos_groups, pos_diff, queries, everyone, x)
        # a query without positives has no AP: its negatives are counted, never compared
        qn, cn, sn, l_neg = _scored_pairs(neg_groups, neg_diff, queries, m > 0, x)
        q = np.concatenate([qp, qn])
        rel = np.concatenate([np.ones(len(qp)), np.zeros(len(qn))])
        sims = _rank_resolution(np.concatenate([sp, sn]))
        s, _, _ = _block_ap(q, sims, rel, b1 - b0, b0, ties)
        ap_sum[b0:b1], n_pos[b0:b1], n_total[b0:b1] = s, m, m + l_neg
    return _ap_frame(out, ap_sum, n_pos, n_total)


def _ap_frame(out: pd.DataFrame, ap_sum: np.ndarray, n_pos: np.ndarray, n_total: np.ndarray) -> pd.DataFrame:
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(n_pos > 0, ap_sum / np.maximum(n_pos, 1), np.nan)
    out["average_precision"] = ap
    out["normalized_average_precision"] = np.where(n_total > 0, _normalize_ap(ap, n_pos, n_total), np.nan)
    out["n_pos_pairs"] = n_pos
    out["n_total_pairs"] = n_total
    return out


def null_average_precision(n_pos: int, n_total: int, null_size: int, seed: int = 0) -> np.ndarray:
    """AP of `null_size` random rankings with `n_pos` positives among `n_total` items (no ties).

    The stream is seeded by (seed, n_pos, n_total), so a configuration's null does not depend on which
    other configurations exist (copairs seeds by their order and caches by configuration on disk).
    """
    M, L = int(n_pos), int(n_total)
    if not 0 < M <= L:
        raise ValueError(f"null_average_precision: need 0 < n_pos <= n_total, got {M}, {L}")
    if M == L:
        return np.ones(null_size)
    rng = np.random.default_rng([int(seed), M, L])
    ranks = np.arange(1, M + 1, dtype=np.float64)
    if M * M <= L:  # few positives: draw positions, redraw the rows that repeat one
        pos = np.sort(rng.integers(0, L, size=(null_size, M)), axis=1)
        while True:
            dup = np.flatnonzero((np.diff(pos, axis=1) == 0).any(axis=1))
            if not dup.size:
                break
            pos[dup] = np.sort(rng.integers(0, L, size=(dup.size, M)), axis=1)
    else:  # a random M-subset of positions: the M smallest of L uniform keys
        rows = max(1, (1 << 22) // L)
        pos = np.empty((null_size, M), dtype=np.int64)
        for i in range(0, null_size, rows):
            keys = rng.random((min(rows, null_size - i), L))
            pos[i:i + rows] = np.sort(np.argpartition(keys, M - 1, axis=1)[:, :M], axis=1)
    return (ranks / (pos + 1)).mean(axis=1)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (statsmodels 'fdr_bh'); NaN stays NaN and is not counted."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = valid.size
    if not m:
        return out
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    out[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return out


def mean_average_precision(ap_scores: pd.DataFrame, sameby: Sequence[str], null_size: int = 10000,
                           threshold: float = 0.05, seed: int = 0, max_floats: int = 1 << 24) -> pd.DataFrame:
    """mAP per group of `sameby`, with permutation p-values and BH correction (copairs semantics).

    Profiles without positives are dropped. A group's null sample j is the mean over its members of
    the j-th null AP of each member's (n_pos_pairs, n_total_pairs) configuration (members sharing a
    configuration share a null stream, as in copairs, which makes p conservative). p = (#{null >=
    mAP} + 1) / (null_size + 1) (copairs counts null > mAP for mAP, >= for single APs); corrected by
    Benjamini-Hochberg over groups. Columns: sameby, `mean_average_precision`,
    `mean_normalized_average_precision`, `n_profiles`, `p_value`, `corrected_p_value`, `below_p`,
    `below_corrected_p`.
    """
    sameby = list(sameby)
    scores = ap_scores[ap_scores["average_precision"].notna() & (ap_scores["n_pos_pairs"] > 0)]
    scores = scores.reset_index(drop=True)
    group = _codes(scores, sameby)
    n_groups = int(group.max()) + 1 if len(group) else 0
    sizes = np.bincount(group, minlength=n_groups)
    first = np.full(n_groups, -1, dtype=np.int64)
    first[group[::-1]] = np.arange(len(group))[::-1]
    result = scores.iloc[first][sameby].reset_index(drop=True) if n_groups else pd.DataFrame(columns=sameby)
    ap = scores["average_precision"].to_numpy(np.float64)
    map_ = np.bincount(group, weights=ap, minlength=n_groups) / np.maximum(sizes, 1)
    result["mean_average_precision"] = map_
    result["mean_normalized_average_precision"] = np.bincount(
        group, weights=scores["normalized_average_precision"].to_numpy(np.float64), minlength=n_groups) / \
        np.maximum(sizes, 1)
    result["n_profiles"] = sizes

    confs = scores[["n_pos_pairs", "n_total_pairs"]].to_numpy(np.int64)
    uniq, conf_of_row = np.unique(confs, axis=0, return_inverse=True) if len(confs) else (np.zeros((0, 2)), [])
    conf_of_row = np.asarray(conf_of_row).reshape(-1)
    null = np.stack([null_average_precision(M, L, null_size, seed) for M, L in uniq]) if len(uniq) else \
        np.zeros((0, null_size))
    # A group's null sample j is the mean of its members' null rows, so groups with the same multiset
    # of configurations share one null distribution: build it once per multiset (a sparse count
    # matrix times the null), sort it, and place every group's mAP in it by binary search.
    members = pd.DataFrame({"g": group, "c": conf_of_row}).sort_values(["g", "c"], kind="stable")
    signature = members.groupby("g", sort=True)["c"].agg(lambda c: c.to_numpy(np.int64).tobytes())
    sig_of_group, sig_keys = pd.factorize(signature.to_numpy())
    sig_confs = [np.frombuffer(key, dtype=np.int64) for key in sig_keys]
    sig_rows = np.repeat(np.arange(len(sig_confs)), [len(c) for c in sig_confs])
    sig_counts = sparse.csr_matrix((np.ones(len(sig_rows)), (sig_rows, np.concatenate(sig_confs or [[]]).astype(np.int64))),
                                   shape=(len(sig_confs), len(uniq)))
    sig_sizes = np.array([len(c) for c in sig_confs], dtype=np.float64)
    groups_of_sig = np.split(np.argsort(sig_of_group, kind="stable"), np.cumsum(np.bincount(sig_of_group))[:-1]) \
        if n_groups else []
    n_ge = np.zeros(n_groups, dtype=np.int64)
    step = max(1, max_floats // max(null_size, 1))
    for s0 in range(0, len(sig_confs), step):
        s1 = min(s0 + step, len(sig_confs))
        means = np.sort(np.asarray(sig_counts[s0:s1] @ null) / sig_sizes[s0:s1, None], axis=1)
        for i, sig in enumerate(range(s0, s1)):
            g = groups_of_sig[sig]
            # a tolerance keeps equal values equal after different summation orders
            n_ge[g] = null_size - np.searchsorted(means[i], map_[g] - 1e-12, side="left")
    result["p_value"] = (n_ge + 1) / (null_size + 1)
    result["corrected_p_value"] = benjamini_hochberg(result["p_value"].to_numpy())
    result["below_p"] = result["p_value"] < threshold
    result["below_corrected_p"] = result["corrected_p_value"] < threshold
    return result


def fraction_retrieved(map_scores: pd.DataFrame, threshold: float = 0.05) -> float:
    """Share of groups whose BH-corrected p-value is below `threshold` (the JUMP "fraction retrieved")."""
    if not len(map_scores):
        return float("nan")
    return float((map_scores["corrected_p_value"] < threshold).mean())


def _with_reference_index(meta: pd.DataFrame, negcon: np.ndarray) -> pd.DataFrame:
    out = meta.reset_index(drop=True).copy()
    ref = np.full(len(out), -1, dtype=np.int64)
    ref[negcon] = np.flatnonzero(negcon)
    out[REFERENCE_INDEX] = ref
    return out


def _negcon(meta: pd.DataFrame, compound_col: str) -> np.ndarray:
    if schema.ROLE in meta.columns:
        return (meta[schema.ROLE] == schema.NEGCON).to_numpy()
    return (meta[compound_col] == schema.DMSO).to_numpy()


def phenotypic_activity(meta: pd.DataFrame, feats: np.ndarray, *, compound_col: str = schema.JCP,
                        neg_sameby: Sequence[str] = (schema.PLATE,), null_size: int = 10000,
                        threshold: float = 0.05, seed: int = 0, ties: Ties = "expected",
                        **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Phenotypic activity (JUMP recipe): can a compound's wells be told apart from DMSO?

    Positives: other wells of the same compound (pos_sameby=[compound, reference index]); negatives:
    DMSO wells (neg_diffby=[compound, reference index]) on the same plate (`neg_sameby`, pass () for
    all plates). Returns (per-well AP frame, per-compound mAP frame); DMSO rows have no AP.
    """
    data = _with_reference_index(meta, _negcon(meta, compound_col))
    ap = average_precision(data, feats, pos_sameby=[compound_col, REFERENCE_INDEX], pos_diffby=[],
                           neg_sameby=list(neg_sameby), neg_diffby=[compound_col, REFERENCE_INDEX],
                           ties=ties, **kwargs)
    return ap, mean_average_precision(ap, [compound_col], null_size=null_size, threshold=threshold, seed=seed)


def phenotypic_consistency(meta: pd.DataFrame, feats: np.ndarray, *, sameby: Sequence[str] = (schema.JCP,),
                           neg_sameby: Sequence[str] = (), compound_col: str = schema.JCP,
                           null_size: int = 10000, threshold: float = 0.05, seed: int = 0,
                           ties: Ties = "expected", **kwargs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Retrieval against other compounds: are a group's wells closer to each other than to other groups?

    DMSO wells are dropped first. Positives share every `sameby` column, negatives differ in all of
    them (optionally sharing `neg_sameby`, e.g. the plate, which also keeps the cost linear). With
    the default `sameby=[compound]` this is replicate retrieval against other compounds; pass a
    target-annotation column for the JUMP target-consistency recipe. Returns (AP frame, mAP frame).
    Without `neg_sameby` every pair of wells is scored: cost grows with N^2 (blockwise, bounded memory).
    """
    keep = ~_negcon(meta, compound_col)
    data = meta.reset_index(drop=True).loc[keep].reset_index(drop=True)
    ap = average_precision(data, np.asarray(feats)[keep], pos_sameby=list(sameby), pos_diffby=[],
                           neg_sameby=list(neg_sameby), neg_diffby=list(sameby), ties=ties, **kwargs)
    return ap, mean_average_precision(ap, list(sameby), null_size=null_size, threshold=threshold, seed=seed)
