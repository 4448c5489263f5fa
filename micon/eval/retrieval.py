"""Replicate retrieval across technical boundaries: NR / NSB / NSS / NSP / NSL top-k hit rate (= Recall@k; MICON
paper, MorphoHELM).

A query well scores a hit at k when a gallery well of the same compound is among its k most
cosine-similar *eligible* gallery wells, eligible meaning any other well (NR), or from another batch (NSB),
source (NSS) or plate (NSP), or at another well position (NSL: not same layout position). Computed blockwise (query blocks x gallery chunks, exact two-stage top-k merge), never
an N x N matrix; exclusion masks are always built from gallery metadata against query metadata.
`device="cuda"` (the default "auto" when torch sees a GPU) computes the same blocks in torch there, with
the same results. No I/O; the Ray variant uses an already-running Ray (the caller owns `ray.init`).

Conventions (documented because the official code differs or is silent):
* Queries are the treated and positive-control wells (`query_roles`); DMSO (negcon) and empty
  wells never are. DMSO wells join the gallery only with `gallery_negcon=True` (the official
  analysis drops them before evaluation: the default).
* Ties in (computed) similarity are broken by gallery row index, lower first, so results are
  deterministic and identical however the queries are blocked or the gallery is distributed over
  runs of whole chunks.
* A query counts only if at least one same-compound gallery well survives its exclusion; the others
  are left out of the denominator and counted (`n_queries_*`, `n_ineligible_*`). With query ==
  gallery this is the official "compound present in more than one batch / source" filter, applied
  per query, which stays right when query and gallery are different tables.
* The query's own row is excluded because it shares its plate, batch and source with itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from micon import schema
from micon.eval.profiles import l2_normalize

__all__ = ["MODES", "topk_hit_rate", "topk_hit_rate_ray", "topk_neighbours", "summarise_first_hits",
           "expected_hit_rate", "resolve_device"]

# Exclusion key of each mode: the candidate is dropped when it shares the key with the query.
# Batch and plate keys include the source so that names reused by two sources cannot collide.
# nr: no restriction (only the query's own well is dropped); nsl: not same layout position (every candidate at the
# query's well position, on any plate, is dropped: the position confound of plates that share one layout)
MODES: dict[str, tuple[str, ...]] = {
    "nr": (schema.SOURCE, schema.BATCH, schema.PLATE, schema.WELL),
    "nsb": (schema.SOURCE, schema.BATCH),
    "nss": (schema.SOURCE,),
    "nsp": (schema.SOURCE, schema.BATCH, schema.PLATE),
    "nsl": (schema.WELL,),
}
DEFAULT_QUERY_ROLES = (schema.TREATED, schema.POSCON)


def resolve_device(device: str = "auto") -> str:
    """Where the similarity blocks are computed: "cpu" (NumPy products, the reference path), "cuda" or
    "cuda:N" (the same blocks in torch on that GPU), "torch:cpu" (the device code on the CPU: what the tests
    compare with "cpu"), or "auto" (the first GPU when torch sees one, else "cpu")."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("cpu", "torch:cpu"):
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but torch sees no GPU (torch.cuda.is_available() is False); "
                             f"pass device='auto' or 'cpu', or run where a GPU is visible")
        return device
    raise ValueError(f"device={device!r}: choose auto, cpu, cuda, cuda:N or torch:cpu")


# ---------------------------------------------------------------------------------------------
# deterministic top-k (value descending, index ascending)
# ---------------------------------------------------------------------------------------------

def _topk(vals: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row under the total order (value desc, index asc); returns (values, indices) sorted.

    Used to merge candidate lists (a few x k columns): a full lexsort is cheap there.
    """
    order = np.lexsort((idx, -vals), axis=-1)[:, :k]
    return np.take_along_axis(vals, order, 1), np.take_along_axis(idx, order, 1)


def _merge_topk(a: tuple[np.ndarray, np.ndarray] | None, b: tuple[np.ndarray, np.ndarray], k: int):
    if a is None:
        return b
    return _topk(np.concatenate([a[0], b[0]], axis=1), np.concatenate([a[1], b[1]], axis=1), k)


def _chunk_topk(masked, c0: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one (block x chunk) similarity tensor (excluded entries already -inf), ties broken by
    column index.

    torch.topk selects (an order of magnitude faster than np.argpartition on CPU) but picks an
    arbitrary member among values tied with the k-th. Asking for k + 1 reveals such rows (the
    (k+1)-th value equals the k-th); only those are redone with an exact lexsort, so the selected set
    is always the (value desc, index asc) top-k. Rows with fewer than k eligible columns are padded
    by -inf entries, which are dropped later whatever their index.
    """
    import torch

    n = masked.shape[1]
    if n <= k:
        return _topk(masked.numpy(), np.broadcast_to(np.arange(c0, c0 + n, dtype=np.int64), masked.shape), k)
    top_v, top_i = torch.topk(masked, k + 1 if n > k + 1 else k, dim=1, sorted=True)
    vals, cols = top_v[:, :k].numpy().copy(), top_i[:, :k].numpy().astype(np.int64)
    if n > k + 1:
        tied = torch.nonzero((top_v[:, k] == top_v[:, k - 1]) & (top_v[:, k - 1] > float("-inf"))).flatten().numpy()
        if tied.size:
            row_vals = masked[tied].numpy()
            order = np.lexsort((np.broadcast_to(np.arange(n), row_vals.shape), -row_vals), axis=-1)[:, :k]
            vals[tied] = np.take_along_axis(row_vals, order, 1)
            cols[tied] = order
    return _topk(vals, cols + c0, k)


def restarts(modes: Sequence[str]) -> list[bool]:
    """For modes in computation order: True where a mode's exclusions do not contain the previous mode's (its key
    is not a subset of the previous key), so its mask starts again from the unmasked similarities instead of
    continuing in place (nsl after nss: same position does not contain same source)."""
    return [i > 0 and not set(MODES[m]) <= set(MODES[modes[i - 1]]) for i, m in enumerate(modes)]


def _gallery_topk(q_feats: np.ndarray, q_keys: np.ndarray, gallery: dict, k: int, lo: int, hi: int,
                  chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eligible gallery rows in [lo, hi) for each query row and each mode.

    q_keys: (modes, B) exclusion codes of the queries; gallery["keys"]: (modes, G), modes ordered
    from the smallest excluded set to the largest (nr, nsp, nsb, nss: same well implies same plate implies same
    batch implies same source), so the exclusions are applied in place, one after another; a mode whose set does
    not contain the previous one (gallery["restart"]: nsl) starts from a copy of the unmasked block. Returns values
    and global gallery indices of shape (modes, B, k); missing candidates have value -inf.
    Similarities are computed in float64 and rounded to the features' dtype before ranking: a float32
    product's last bits depend on the BLAS thread count and the block's shape (a Ray worker and the
    driver disagreed on near-ties), the rounded float64 one does not, so any blocking, split of
    [0, G) into runs of whole chunks, or process gives the same neighbours.
    """
    import torch

    g_feats, g_keys = gallery["feats"], gallery["keys"]
    n_modes, B = q_keys.shape
    best = [None] * n_modes
    q_keys_t = torch.from_numpy(np.ascontiguousarray(q_keys))
    q64 = q_feats.astype(np.float64)
    restart = gallery.get("restart") or [False] * n_modes
    for c0 in range(lo, hi, chunk):
        c1 = min(c0 + chunk, hi)
        sims = torch.from_numpy((q64 @ g_feats[c0:c1].astype(np.float64).T).astype(q_feats.dtype))
        raw = sims.clone() if any(restart) else None
        g_keys_t = torch.from_numpy(np.ascontiguousarray(g_keys[:, c0:c1]))
        for m in range(n_modes):
            if restart[m]:
                sims = raw.clone()
            sims.masked_fill_(q_keys_t[m][:, None] == g_keys_t[m][None, :], float("-inf"))
            best[m] = _merge_topk(best[m], _chunk_topk(sims, c0, k), k)
    if not best or best[0] is None:
        return (np.full((n_modes, B, k), -np.inf, dtype=q_feats.dtype), np.full((n_modes, B, k), -1, dtype=np.int64))
    vals = np.stack([b[0] for b in best])
    idx = np.stack([b[1] for b in best])
    if vals.shape[2] < k:  # the range held fewer than k rows
        pad = k - vals.shape[2]
        vals = np.concatenate([vals, np.full((n_modes, B, pad), -np.inf, vals.dtype)], axis=2)
        idx = np.concatenate([idx, np.full((n_modes, B, pad), -1, np.int64)], axis=2)
    return vals, idx


def _first_hits(vals: np.ndarray, idx: np.ndarray, q_compound: np.ndarray, g_compound: np.ndarray) -> np.ndarray:
    """1-based rank of the first same-compound neighbour in each top-k list, 0 when none. (modes, B)."""
    hit = (vals > -np.inf) & (g_compound[np.maximum(idx, 0)] == q_compound[None, :, None])
    return np.where(hit.any(axis=2), hit.argmax(axis=2) + 1, 0)


# ---------------------------------------------------------------------------------------------
# the same blocks in torch, on any device (GPU at consortium size; on the CPU for the tests)
# ---------------------------------------------------------------------------------------------

def _lexsort_topk_t(vals, idx, k: int):
    """Torch `_topk`: the first k under (value desc, index asc). A stable sort by index, then a stable
    descending sort by value, keeps equal values in index order."""
    import torch

    by_idx = torch.argsort(idx, dim=1, stable=True)
    vals, idx = torch.gather(vals, 1, by_idx), torch.gather(idx, 1, by_idx)
    by_val = torch.argsort(vals, dim=1, descending=True, stable=True)[:, :k]
    return torch.gather(vals, 1, by_val), torch.gather(idx, 1, by_val)


def _chunk_topk_t(masked, c0: int, k: int):
    """Torch `_chunk_topk`: topk asked for k + 1, and the rows whose k-th and (k+1)-th values tie redone
    with a stable descending sort (value desc, column asc), so the set is the exact (value, index) top-k."""
    import torch

    n = masked.shape[1]
    cols = torch.arange(c0, c0 + n, device=masked.device).expand(masked.shape[0], n)
    if n <= k:
        return _lexsort_topk_t(masked, cols, k)
    top_v, top_i = torch.topk(masked, k + 1 if n > k + 1 else k, dim=1, sorted=True)
    vals, pos = top_v[:, :k].clone(), top_i[:, :k].clone()
    if n > k + 1:
        tied = torch.nonzero((top_v[:, k] == top_v[:, k - 1]) & (top_v[:, k - 1] > float("-inf"))).flatten()
        if tied.numel():
            v, o = torch.sort(masked[tied], dim=1, descending=True, stable=True)
            vals[tied], pos[tied] = v[:, :k], o[:, :k]
    return _lexsort_topk_t(vals, pos + c0, k)


def _gallery_topk_t(q_feats: np.ndarray, q_keys: np.ndarray, gallery_t: dict, k: int, lo: int, hi: int,
                    chunk: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """`_gallery_topk` in torch on `gallery_t`'s device: the same chunks, the same float64 products
    rounded to the features' dtype, the same cumulative exclusions and the same (value, index) order."""
    import torch

    g64, g_keys = gallery_t["feats64"], gallery_t["keys"]
    dev = g64.device
    n_modes, B = q_keys.shape
    q64 = torch.from_numpy(np.ascontiguousarray(q_feats)).to(dev, torch.float64)
    q_keys_t = torch.from_numpy(np.ascontiguousarray(q_keys)).to(dev)
    tdtype = torch.from_numpy(np.zeros(0, dtype)).dtype
    best = [None] * n_modes
    restart = gallery_t.get("restart") or [False] * n_modes
    for c0 in range(lo, hi, chunk):
        c1 = min(c0 + chunk, hi)
        sims = (q64 @ g64[c0:c1].T).to(tdtype)
        raw = sims.clone() if any(restart) else None
        for m in range(n_modes):
            if restart[m]:
                sims = raw.clone()
            sims.masked_fill_(q_keys_t[m][:, None] == g_keys[m, c0:c1][None, :], float("-inf"))
            v, i = _chunk_topk_t(sims, c0, k)
            best[m] = (v, i) if best[m] is None else _lexsort_topk_t(torch.cat([best[m][0], v], 1),
                                                                     torch.cat([best[m][1], i], 1), k)
    if not best or best[0] is None:
        return (np.full((n_modes, B, k), -np.inf, dtype=dtype), np.full((n_modes, B, k), -1, dtype=np.int64))
    vals = torch.stack([b[0] for b in best]).cpu().numpy()
    idx = torch.stack([b[1] for b in best]).cpu().numpy().astype(np.int64)
    if vals.shape[2] < k:  # the range held fewer than k rows
        pad = k - vals.shape[2]
        vals = np.concatenate([vals, np.full((n_modes, B, pad), -np.inf, vals.dtype)], axis=2)
        idx = np.concatenate([idx, np.full((n_modes, B, pad), -1, np.int64)], axis=2)
    return vals, idx


def _gallery_on_device(gallery: dict, device: str) -> dict:
    import torch

    dev = torch.device("cpu" if device == "torch:cpu" else device)
    return {"feats64": torch.from_numpy(gallery["feats"]).to(dev, torch.float64),
            "keys": torch.from_numpy(np.ascontiguousarray(gallery["keys"])).to(dev),
            "restart": gallery.get("restart")}


def _shard_topk(q_feats, q_keys, gallery, k, lo, hi, chunk):
    """Ray task body: one query block against gallery rows [lo, hi); top-k candidates for the merge."""
    return _gallery_topk(q_feats, q_keys, gallery, k, lo, hi, chunk)


# ---------------------------------------------------------------------------------------------
# preparation: roles, codes, normalised features
# ---------------------------------------------------------------------------------------------

def _roles(meta: pd.DataFrame, compound_col: str) -> np.ndarray:
    if schema.ROLE in meta.columns:
        return meta[schema.ROLE].astype(str).to_numpy()
    if compound_col not in meta.columns:
        raise KeyError(f"retrieval: metadata has neither {schema.ROLE!r} nor {compound_col!r}")
    return np.array([schema.role_of(j) for j in meta[compound_col].astype(str)], dtype=object)


@dataclass
class _Prepared:
    query_rows: np.ndarray       # rows of the query table that are queries
    q_feats: np.ndarray          # (Q, d) unit rows
    q_keys: np.ndarray           # (modes, Q) exclusion codes
    q_compound: np.ndarray       # (Q,) compound codes
    gallery: dict                # feats (G, d), keys (modes, G), compound (G,)
    gallery_rows: np.ndarray     # rows of the gallery table in the gallery
    eligible: np.ndarray         # (modes, Q) at least one same-compound gallery well survives exclusion
    modes: tuple[str, ...]


def _joint_codes(q: pd.DataFrame, g: pd.DataFrame, columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Codes of `columns` over the query and gallery rows together, so equal values get equal codes."""
    missing = [c for c in columns if c not in q.columns or c not in g.columns]
    if missing:
        raise KeyError(f"retrieval: query or gallery metadata lacks column(s) {missing}")
    both = pd.concat([q[list(columns)], g[list(columns)]], ignore_index=True)
    if both.isna().any(axis=None):
        raise ValueError(f"retrieval: missing values in {list(columns)}; fill or drop those wells")
    codes = both.groupby(list(columns), sort=False, observed=True).ngroup().to_numpy(np.int64)
    return codes[:len(q)], codes[len(q):]


def _candidate_counts(q_compound: np.ndarray, q_key: np.ndarray, g_compound: np.ndarray,
                      g_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query: gallery rows left after its exclusion (N) and how many of them share its compound (P),
    by group counts (no Q x G matrix)."""
    n_keys = int(max(q_key.max(initial=0), g_key.max(initial=0))) + 1
    cpd_ids, cpd_counts = np.unique(g_compound, return_counts=True)
    pair_ids, pair_counts = np.unique(g_compound * n_keys + g_key, return_counts=True)
    key_ids, key_counts = np.unique(g_key, return_counts=True)

    def lookup(ids, counts, values):
        if not len(ids):
            return np.zeros(len(values), dtype=np.int64)
        pos = np.minimum(np.searchsorted(ids, values), len(ids) - 1)
        return np.where(ids[pos] == values, counts[pos], 0)

    same_compound = lookup(cpd_ids, cpd_counts, q_compound)
    same_compound_same_key = lookup(pair_ids, pair_counts, q_compound * n_keys + q_key)
    return len(g_key) - lookup(key_ids, key_counts, q_key), same_compound - same_compound_same_key


def _eligible(q_compound: np.ndarray, q_key: np.ndarray, g_compound: np.ndarray, g_key: np.ndarray) -> np.ndarray:
    """Per query: does any gallery row share its compound but not its exclusion key?"""
    return _candidate_counts(q_compound, q_key, g_compound, g_key)[1] > 0


def expected_hit_rate(n_candidates: np.ndarray, n_positives: np.ndarray, k: int) -> np.ndarray:
    """Chance of a top-k hit under a uniformly random ranking, per query: 1 - C(N-P, k) / C(N, k) with N
    candidates of which P are positives (the product form, exact and free of overflow)."""
    N = np.asarray(n_candidates, dtype=np.float64)
    P = np.asarray(n_positives, dtype=np.float64)
    miss = np.ones(np.broadcast(N, P).shape)
    for i in range(int(k)):
        with np.errstate(invalid="ignore", divide="ignore"):
            miss = miss * np.clip((N - P - i) / (N - i), 0.0, 1.0)
    return np.where(P > 0, 1.0 - np.where(N - P >= k, miss, 0.0), 0.0)


def _prepare(query_meta, query_feats, gallery_meta, gallery_feats, modes, compound_col, query_roles,
             gallery_negcon, dtype) -> _Prepared:
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown or len(set(modes)) != len(modes):
        raise ValueError(f"retrieval: modes must be distinct names from {list(MODES)}, got {list(modes)}")
    # smallest exclusion first: _gallery_topk applies the exclusions cumulatively
    modes = sorted(modes, key=lambda m: -len(MODES[m]))
    if len(query_meta) != len(query_feats):
        raise ValueError(f"retrieval: query metadata has {len(query_meta)} rows, features {len(query_feats)}")
    if gallery_meta is None:
        gallery_meta, gallery_feats = query_meta, query_feats
    elif gallery_feats is None or len(gallery_meta) != len(gallery_feats):
        raise ValueError("retrieval: pass gallery_feats with as many rows as gallery_meta")
    if np.shape(query_feats)[1] != np.shape(gallery_feats)[1]:
        raise ValueError(f"retrieval: query features are {np.shape(query_feats)[1]}-d, gallery "
                         f"{np.shape(gallery_feats)[1]}-d")
    q_role = _roles(query_meta, compound_col)
    g_role = _roles(gallery_meta, compound_col)
    query_rows = np.flatnonzero(np.isin(q_role, list(query_roles)) & (q_role != schema.NEGCON))
    g_allowed = [schema.TREATED, schema.POSCON] + ([schema.NEGCON] if gallery_negcon else [])
    gallery_rows = np.flatnonzero(np.isin(g_role, g_allowed))
    q = query_meta.iloc[query_rows]
    g = gallery_meta.iloc[gallery_rows]
    q_compound, g_compound = _joint_codes(q, g, [compound_col])
    q_keys, g_keys = [], []
    for mode in modes:
        qk, gk = _joint_codes(q, g, MODES[mode])
        q_keys.append(qk)
        g_keys.append(gk)
    q_keys = np.stack(q_keys) if q_keys else np.zeros((0, len(q)), np.int64)
    g_keys = np.stack(g_keys) if g_keys else np.zeros((0, len(g)), np.int64)
    eligible = np.stack([_eligible(q_compound, q_keys[m], g_compound, g_keys[m]) for m in range(len(modes))]) \
        if modes else np.zeros((0, len(q)), bool)
    gallery = {"feats": l2_normalize(np.asarray(gallery_feats)[gallery_rows], dtype), "keys": g_keys,
               "compound": g_compound, "restart": restarts(modes)}
    return _Prepared(query_rows, l2_normalize(np.asarray(query_feats)[query_rows], dtype), q_keys, q_compound,
                     gallery, gallery_rows, eligible, tuple(modes))


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def summarise_first_hits(first_hit: np.ndarray, eligible: np.ndarray, modes: Sequence[str],
                         ks: Iterable[int]) -> pd.DataFrame:
    """One row per k: hit rate per mode over eligible queries, plus query counts per mode."""
    ks = list(ks)
    rows = []
    for k in ks:
        row = {"k": k}
        for m, mode in enumerate(modes):
            n = int(eligible[m].sum())
            hits = int(((first_hit[m] >= 1) & (first_hit[m] <= k) & eligible[m]).sum())
            row[mode] = hits / n if n else np.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    for m, mode in enumerate(modes):
        frame[f"n_queries_{mode}"] = int(eligible[m].sum())
        frame[f"n_ineligible_{mode}"] = int((~eligible[m]).sum())
    ordered = [mode for mode in MODES if mode in modes]  # nr, nsb, nss, nsp, nsl whatever the computation order
    return frame[["k", *ordered, *(f"n_{what}_{mode}" for what in ("queries", "ineligible") for mode in ordered)]]


def _per_query(query_meta: pd.DataFrame, prep: _Prepared, first_hit: np.ndarray) -> pd.DataFrame:
    meta_cols = [c for c in query_meta.columns if c.startswith("Metadata_")]
    out = query_meta.iloc[prep.query_rows][meta_cols].reset_index(drop=True)
    out.insert(0, "query_row", prep.query_rows)
    for m, mode in enumerate(prep.modes):
        out[f"{mode}_eligible"] = prep.eligible[m]
        out[f"{mode}_first_hit"] = first_hit[m]
        n, p = _candidate_counts(prep.q_compound, prep.q_keys[m], prep.gallery["compound"], prep.gallery["keys"][m])
        out[f"{mode}_n_candidates"] = n
        out[f"{mode}_n_positives"] = p
    return out


def _search(prep: _Prepared, k: int, block_size: int, dtype, progress: bool, block_topk) -> tuple[np.ndarray, np.ndarray]:
    """Fill (modes, queries, k) values and gallery positions block by block; -1 marks no neighbour."""
    n_q = len(prep.query_rows)
    vals = np.full((len(prep.modes), n_q, k), -np.inf, dtype=dtype)
    idx = np.full((len(prep.modes), n_q, k), -1, dtype=np.int64)
    starts = range(0, n_q, block_size)
    if progress:
        from micon.progress import bar as progress_bar
        starts = progress_bar(starts, desc="top-k query blocks", unit="block", total=len(starts))
    for b0 in starts:
        b1 = min(b0 + block_size, n_q)
        vals[:, b0:b1], idx[:, b0:b1] = block_topk(b0, b1)
    idx[vals == -np.inf] = -1  # excluded candidates padding a short list are not neighbours
    return vals, idx


def _local_search(prep: _Prepared, k: int, block_size: int, gallery_chunk: int, dtype, progress: bool,
                  device: str = "cpu"):
    n_g = len(prep.gallery_rows)
    device = resolve_device(device)
    if device == "cpu":
        return _search(prep, k, block_size, dtype, progress, lambda b0, b1: _gallery_topk(
            prep.q_feats[b0:b1], prep.q_keys[:, b0:b1], prep.gallery, k, 0, n_g, gallery_chunk))
    gallery_t = _gallery_on_device(prep.gallery, device)
    return _search(prep, k, block_size, dtype, progress, lambda b0, b1: _gallery_topk_t(
        prep.q_feats[b0:b1], prep.q_keys[:, b0:b1], gallery_t, k, 0, n_g, gallery_chunk, dtype))


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"top-k hit rate: ks must be positive integers, got {ks}")
    return ks


def _report(query_meta: pd.DataFrame, prep: _Prepared, vals: np.ndarray, idx: np.ndarray, ks: list[int],
            per_query: bool):
    first_hit = _first_hits(vals, idx, prep.q_compound, prep.gallery["compound"])
    frame = summarise_first_hits(first_hit, prep.eligible, prep.modes, ks)
    return (frame, _per_query(query_meta, prep, first_hit)) if per_query else frame


def topk_neighbours(query_meta: pd.DataFrame, query_feats: np.ndarray, gallery_meta: pd.DataFrame | None = None,
                    gallery_feats: np.ndarray | None = None, *, k: int = 10,
                    modes: Sequence[str] = ("nsb", "nss", "nsp"), compound_col: str = schema.JCP,
                    query_roles: Sequence[str] = DEFAULT_QUERY_ROLES, gallery_negcon: bool = False,
                    block_size: int = 512, gallery_chunk: int = 32768, dtype=np.float32,
                    progress: bool = False, device: str = "auto") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """The k nearest eligible gallery wells of every query, per mode: (similarities, gallery rows, query rows).

    Gallery rows index `gallery_meta` (or `query_meta` when no gallery is given); -1 marks a missing
    neighbour (fewer than k eligible wells). Arrays are (queries, k); query rows index `query_meta`.
    """
    prep = _prepare(query_meta, query_feats, gallery_meta, gallery_feats, modes, compound_col, query_roles,
                    gallery_negcon, dtype)
    vals, idx = _local_search(prep, k, block_size, gallery_chunk, dtype, progress, device)
    rows = np.where(idx >= 0, prep.gallery_rows[np.maximum(idx, 0)], -1)
    return ({mode: vals[m] for m, mode in enumerate(prep.modes)},
            {mode: rows[m] for m, mode in enumerate(prep.modes)}, prep.query_rows)


def topk_hit_rate(query_meta: pd.DataFrame, query_feats: np.ndarray, gallery_meta: pd.DataFrame | None = None,
                  gallery_feats: np.ndarray | None = None, *, ks: Iterable[int] = range(1, 11),
                  modes: Sequence[str] = ("nsb", "nss", "nsp"), compound_col: str = schema.JCP,
                  query_roles: Sequence[str] = DEFAULT_QUERY_ROLES, gallery_negcon: bool = False,
                  block_size: int = 512, gallery_chunk: int = 32768, dtype=np.float32,
                  per_query: bool = False, progress: bool = False, device: str = "auto"):
    """NSB / NSS / NSP top-k hit rate of replicate retrieval (single process, blockwise).

    Returns a frame with one row per k: `k`, one column per mode (`nsb`, `nss`, `nsp`: share of
    eligible queries with a same-compound well among their k nearest eligible gallery wells), and
    `n_queries_<mode>` / `n_ineligible_<mode>`. With `per_query=True` also returns a per-query frame
    (query metadata, `<mode>_eligible`, `<mode>_first_hit`: 1-based rank of the first same-compound
    neighbour within max(ks), 0 when none; `<mode>_n_candidates` / `<mode>_n_positives`: gallery wells
    left after the exclusion and how many share the compound, for `expected_hit_rate`). Memory: block_size x gallery_chunk similarities at a time.
    `device` (see `resolve_device`; "auto": a GPU when torch sees one) computes the same blocks there, with
    the same results.
    """
    ks = _check_ks(ks)
    prep = _prepare(query_meta, query_feats, gallery_meta, gallery_feats, modes, compound_col, query_roles,
                    gallery_negcon, dtype)
    vals, idx = _local_search(prep, ks[-1], block_size, gallery_chunk, dtype, progress, device)
    return _report(query_meta, prep, vals, idx, ks, per_query)


def topk_hit_rate_ray(query_meta: pd.DataFrame, query_feats: np.ndarray, gallery_meta: pd.DataFrame | None = None,
                      gallery_feats: np.ndarray | None = None, *, ks: Iterable[int] = range(1, 11),
                      modes: Sequence[str] = ("nsb", "nss", "nsp"), compound_col: str = schema.JCP,
                      query_roles: Sequence[str] = DEFAULT_QUERY_ROLES, gallery_negcon: bool = False,
                      block_size: int = 512, gallery_chunk: int = 32768, gallery_shards: int = 1,
                      dtype=np.float32, per_query: bool = False, progress: bool = False):
    """`topk_hit_rate` with Ray tasks: one task per (query block, gallery shard).

    The prepared gallery is put in the object store once (`ray.put`); each task returns the top-k
    candidates of its block within its shard (contiguous runs of whole gallery chunks) and the driver
    merges the k x shards candidates. Chunk shapes equal the single-process path's, so the numbers
    are identical. Uses the running Ray instance (call `ray.init` first; Ray starts a local one otherwise).
    """
    import ray

    ks = _check_ks(ks)
    k = ks[-1]
    prep = _prepare(query_meta, query_feats, gallery_meta, gallery_feats, modes, compound_col, query_roles,
                    gallery_negcon, dtype)
    n_q, n_g = len(prep.query_rows), len(prep.gallery_rows)
    n_chunks = max(1, -(-n_g // gallery_chunk))
    per_shard = -(-n_chunks // max(1, gallery_shards))
    bounds = [(c * gallery_chunk, min((c + per_shard) * gallery_chunk, n_g)) for c in range(0, n_chunks, per_shard)]
    gallery_ref = ray.put(prep.gallery)
    task = ray.remote(_shard_topk)
    futures = {b0: [task.remote(prep.q_feats[b0:b0 + block_size], prep.q_keys[:, b0:b0 + block_size], gallery_ref,
                                k, lo, hi, gallery_chunk) for lo, hi in bounds]
               for b0 in range(0, n_q, block_size)}

    def merged(b0, b1):
        results = ray.get(futures.pop(b0))
        best = [None] * len(prep.modes)
        for v, i in results:
            best = [_merge_topk(best[m], (v[m], i[m]), k) for m in range(len(prep.modes))]
        return np.stack([b[0] for b in best]), np.stack([b[1] for b in best])

    vals, idx = _search(prep, k, block_size, dtype, progress, merged)
    return _report(query_meta, prep, vals, idx, ks, per_query)
