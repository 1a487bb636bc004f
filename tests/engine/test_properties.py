"""Property tests: the engine against the brute-force oracle, and streaming against batch.

Each property runs a fixed number of derandomised hypothesis examples (same examples on
every run, no example database): engine == oracle 400, block boundaries change nothing
200, closure locality 300, incremental store == oracle 300, search windows cover every link
400. Worlds (``worlds.worlds``) mix crowds, walks, stacks of identical photos, symmetric
ties and sparse noise near the antimeridian, at latitude 60 and on and around both poles,
with identical times and places. The whole engine suite takes about 30 s on 2 cores.
"""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from snapmap_pipeline.clustering import canonical_pass, closure, engine, search_windows

from .worlds import (
    Store,
    assert_same_as_oracle,
    exactly_linked,
    fetcher,
    inside,
    oracle_for,
    params_strategy,
    worlds,
)

pytestmark = pytest.mark.engine


def profile(examples: int) -> settings:
    """A fixed number of examples, the same ones on every run, nothing written to disk."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@profile(400)
@given(world=worlds(), params=params_strategy, data=st.data())
def test_engine_equals_oracle_for_any_order_and_repeats(world, params, data):
    expected = oracle_for(world, params)
    assume(not expected.fragile)
    shuffled = data.draw(st.permutations(world))
    repeats = data.draw(st.lists(st.sampled_from(world), max_size=5)) if world else []
    result = canonical_pass(shuffled + repeats, params)
    assert_same_as_oracle(result, expected)


@profile(200)
@given(world=worlds(), params=params_strategy)
def test_block_boundaries_do_not_change_the_result(world, params):
    # Blocks of one to four photos, and a hit budget that ends most blocks early, must
    # give exactly the answer of the default blocks.
    usual = canonical_pass(world, params)
    tiny = {
        "_BLOCK_MIN": 1,
        "_BLOCK_START": 2,
        "_BLOCK_MAX": 4,
        "_MAX_BLOCK_HITS": 3,
        "_CHUNK_MIN": 1,
        "_CHUNK_WORST_HITS": 2,
    }
    with mock.patch.multiple(engine, **tiny):
        assert canonical_pass(world, params) == usual


@profile(300)
@given(world=worlds(), params=params_strategy, data=st.data())
def test_closure_gives_the_whole_world_answer(world, params, data):
    seed = data.draw(st.lists(st.sampled_from(world), min_size=1, max_size=4, unique=True))
    store = {p.photo_id: p for p in world}
    members = closure(seed, fetcher(store), params)
    ids = {p.photo_id for p in members}

    assert {p.photo_id for p in seed} <= ids
    for outside in (p for p in world if p.photo_id not in ids):
        assert not any(exactly_linked(outside, m, params) for m in members)

    whole = canonical_pass(world, params)
    local = canonical_pass(members, params)
    assert local.assignment == {k: v for k, v in whole.assignment.items() if k in ids}
    assert local.events == {k: whole.events[k] for k in local.events}


@profile(300)
@given(world=worlds(max_photos=30), params=params_strategy, data=st.data())
def test_batches_with_repeats_and_replays_end_in_the_oracle_state(world, params, data):
    expected = oracle_for(world, params)
    assume(not expected.fragile)
    order = data.draw(st.permutations(world))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(order)), max_size=6)))
    batches = [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    store = Store(params)
    for i, batch in enumerate(batches):
        repeats = data.draw(st.lists(st.sampled_from(order), max_size=3))
        seen = {p.photo_id for b in batches[:i] for p in b} | {p.photo_id for p in batch}
        store.ingest(batch + [p for p in repeats if p.photo_id in seen])
        if i and data.draw(st.booleans()):
            replay = batches[data.draw(st.integers(0, i - 1))]
            assert store.ingest(replay).is_empty, "replaying an applied batch changed things"

    assert store.links == expected.assignment
    live = store.live()
    assert set(live) == set(expected.events)
    for event_id, stored in live.items():
        want = expected.events[event_id]
        assert (stored.photo_count, stored.first_photo_id) == (
            len(want.members),
            want.first_photo_id,
        )
        assert (stored.start_at, stored.end_at) == (want.start_at, want.end_at)
    for event_id in store.events:
        assert store.resolve(event_id) in live


@profile(400)
@given(world=worlds(), params=params_strategy, data=st.data())
def test_search_windows_contain_every_linked_photo(world, params, data):
    batch = data.draw(st.lists(st.sampled_from(world), min_size=1, max_size=6, unique=True))
    windows = search_windows(batch, params)
    assert all(w.lon_min <= w.lon_max and w.lat_min <= w.lat_max for w in windows)
    assert all(-180 <= w.lon_min and w.lon_max <= 180 for w in windows)
    for photo in world:
        if any(exactly_linked(photo, b, params) for b in batch):
            assert any(inside(w, photo) for w in windows), photo
