"""The training data path: shard split, replicate pairing, and exact fast-forward for resumed runs."""
from __future__ import annotations

import itertools

import pytest
import torch

from micon import schema
from micon.data.pipeline import (Counts, ExampleStream, ReplicatePairer, StreamConfig, collate_identity,
                                 shard_slot)
from micon.methods import get_method


def test_shard_split_is_shared_disjoint_and_complete():
    shards = [f"s{i}" for i in range(12)]
    for epoch in range(3):
        slots = [shard_slot(shards, epoch, 7, slot, 4, False) for slot in range(4)]
        assert sorted(itertools.chain(*slots)) == sorted(shards)
        assert all(len(s) == 3 for s in slots)
    assert shard_slot(shards, 0, 7, 0, 4, False) != shard_slot(shards, 1, 7, 0, 4, False)
    with pytest.raises(ValueError, match="12 shards cannot feed 16 data streams"):
        shard_slot(shards, 0, 0, 0, 16, False)


def _site(key, cpd, source, batch, plate, well):
    return dict(key=key, meta={schema.JCP: cpd, schema.SOURCE: source, schema.BATCH: batch, schema.PLATE: plate,
                               schema.WELL: well})


def test_pairer_prefers_another_source_and_never_pairs_a_well_with_itself():
    counts = Counts()
    p = ReplicatePairer(capacity=10, prefer="source", counts=counts)
    assert p.push(_site("a", "X", "s1", "b1", "p1", "A01")) is None
    assert p.push(_site("b", "X", "s1", "b1", "p1", "A01")) is None       # same well: not a replicate
    pair = p.push(_site("c", "X", "s1", "b2", "p2", "B01"))               # another batch: pairs with a
    assert {pair[0]["key"], pair[1]["key"]} == {"a", "c"}
    pair = p.push(_site("d", "X", "s2", "b3", "p3", "C01"))               # another source: pairs with b
    assert {pair[0]["key"], pair[1]["key"]} == {"b", "d"}
    assert counts["pairs_across_source"] == 1 and counts["pairs_across_batch"] == 1
    # capacity: the oldest unpaired site is evicted and counted
    for i in range(12):
        p.push(_site(f"z{i}", f"C{i}", "s1", "b1", "p1", "A02"))
    assert len(p.waiting) == 10 and counts["pair_evicted"] >= 1


def _batches(ds, workers, n):
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=collate_identity)
    return list(itertools.islice(iter(loader), n))


@pytest.mark.parametrize("workers,rsets", [(0, False), (2, False), (0, True), (2, True)])
def test_fast_forward_continues_exactly_where_the_stream_stopped(tiny_shards, workers, rsets):
    cfg = StreamConfig(needs=get_method("paclr").needs, batch_size=4, shuffle_buffer=16, replicate_sets=rsets)
    full = _batches(ExampleStream(str(tiny_shards), cfg, 0, 1, workers), workers, 7)
    resumed = _batches(ExampleStream(str(tiny_shards), cfg, 0, 1, workers, skip_batches=3), workers, 4)
    for a, b in zip(full[3:], resumed):
        assert a["compounds"] == b["compounds"]
        assert torch.equal(a["views"], b["views"]) and torch.equal(a["controls"], b["controls"])


@pytest.mark.parametrize("within", [False, True])
def test_replicate_set_stream_pairs_within_a_source_first_when_asked(tiny_shards, within):
    """data.pair_within_source: the replicate-set stream pairs each well with another batch of its own source
    (the tiny screen has two batches per source), else with another source, as by default."""
    cfg = StreamConfig(needs=get_method("paclr").needs, batch_size=4, replicate_sets=True, pair_within_source=within)
    counts = {}
    for b in _batches(ExampleStream(str(tiny_shards), cfg, 0, 1, 0), 0, 4):
        counts = b["counts"]      # cumulative over the stream
    across_source, across_batch = counts.get("pairs_across_source", 0), counts.get("pairs_across_batch", 0)
    assert across_source + across_batch >= 0.9 * counts["examples"]
    if within:
        assert across_batch >= 0.75 * counts["examples"], counts
    else:
        assert across_source >= 0.75 * counts["examples"], counts
