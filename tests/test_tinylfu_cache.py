"""The worker's cache policy (worker.tinylfu_cache) and its frequency sketch, exactly.

The policy is a data structure: these tests drive the real class with exact sizes, which a
worker's measured model sizes cannot give (test_model_cache runs it inside a real worker), and
the ModelCache around it with real LightGBM models, in process.
"""
from __future__ import annotations

import asyncio
import threading

import pytest
from cachetools import LRUCache
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.bench import tenant_draws
from loadtest.bench_cache_policy import lru_misses, tinylfu_misses
from modelfleet.demo_models import sample_features, train_model_text
from worker import predictor
from worker.frequency_sketch import MAX_COUNT, FrequencySketch
from worker.model_cache import ModelCache
from worker.predictor import LoadedModel
from worker.tinylfu_cache import TinyLfuCache


class Recorder:
    """A TinyLfuCache of unit-sized values that remembers what it evicted, in order."""

    def __init__(self, budget: int, sizes: dict[str, int] | None = None) -> None:
        self.evicted: list[str] = []
        self.refused = 0  # evicted as candidates refused admission
        self.cache: TinyLfuCache[str, str] = TinyLfuCache(
            budget, sizeof=lambda v: (sizes or {}).get(v, 1), on_evict=self._evicted)

    def _evicted(self, key: str, value: str, refused: bool) -> None:
        self.evicted.append(key)
        self.refused += refused

    def ask(self, key: str) -> bool:
        """One request: True on a hit, else the value is 'loaded' and put."""
        if self.cache.get(key) is not None:
            return True
        self.cache.put(key, key)
        return False


def test_hot_keys_survive_a_scan_that_flushes_an_lru_of_the_same_size():
    r = Recorder(budget=10)
    lru: LRUCache = LRUCache(maxsize=10)
    hot = [f"hot-{i}" for i in range(5)]
    for _ in range(4):
        for key in hot:
            r.ask(key)
            lru[key] = key
    for i in range(50):  # one-off keys, each asked for once
        r.ask(f"scan-{i}")
        lru[f"scan-{i}"] = 1
    assert all(r.cache.peek(key) == key for key in hot)
    assert not any(key in lru for key in hot)
    assert r.cache.peek("scan-49") == "scan-49"  # the newest is always held
    held = {k for k, _ in r.cache.items()}
    assert len(held) == 10 and r.cache.currsize == 10
    assert r.refused == len(r.evicted) == 50 - (len(held) - len(hot))  # the scan displaced no hot key


def test_a_key_asked_for_more_often_than_a_held_one_takes_its_place():
    r = Recorder(budget=4)  # window 1 (the newest) + main 3
    for key in ("a", "b", "c", "d"):
        r.ask(key)  # a, b, c admitted while there is room; d in the window
    r.ask("e")  # d (asked for once) loses to a (once): refused
    assert r.evicted == ["d"]
    for _ in range(3):
        r.ask("e")  # hits in the window: e asked for 4 times
    r.ask("f")  # e leaves the window and beats a, the main area's least recently used
    assert r.evicted == ["d", "a"]
    assert {k for k, _ in r.cache.items()} == {"b", "c", "e", "f"}


def test_a_hit_on_probation_protects_from_later_eviction():
    r = Recorder(budget=5)  # window 1 + main 4 (protected up to 3.2)
    for key in ("a", "b", "c", "d", "e"):
        r.ask(key)  # a-d in probation, e in the window
    r.ask("a")  # promoted: a is protected; b is now the least recently used on probation
    for _ in range(3):
        r.ask("x")  # x: loaded into the window (e leaves, refused), then asked for twice more
    r.ask("y")  # x (3 asks) beats b (1) and takes its place; a, protected, is not the victim
    assert "a" in r.cache and "b" not in r.cache and "x" in r.cache


def test_a_model_warmed_ahead_of_its_traffic_is_admitted_whatever_its_frequency():
    r = Recorder(budget=4)  # window 1 (the newest) + main 3
    for _ in range(3):
        for key in ("a", "b", "c", "d"):
            r.ask(key)  # a, b, c: the main area, d in the window; each asked for 3 times
    r.cache.put("warmed", "warmed", admit=True)  # a rebalance's Warm: never asked for here yet
    r.cache.put("cold", "cold")  # the warmed one leaves the window: admitted over a hot one
    r.ask("next")  # the cold one leaves the window: refused
    assert "warmed" in r.cache and "cold" not in r.cache
    assert r.evicted == ["d", "a", "cold"] and r.refused == 2


def test_bytes_never_exceed_the_budget_when_the_newest_is_large():
    sizes = {"big": 6, "huge": 9}
    r = Recorder(budget=8, sizes={**{f"k{i}": 1 for i in range(8)}, **sizes})
    for i in range(8):
        for _ in range(3):
            r.ask(f"k{i}")
    r.cache.put("big", "big")  # 6 of 8 bytes: main must make room, whatever its frequencies
    assert r.cache.currsize <= 8 and r.cache.peek("big") == "big"
    with pytest.raises(ValueError):  # larger than the whole budget (ModelCache answers RESOURCE_EXHAUSTED)
        r.cache.put("huge", "huge")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["get", "put", "pop"]), st.integers(0, 30), st.integers(1, 9),
                          st.booleans()), max_size=300),
       st.integers(9, 40))
def test_invariants_hold_under_any_sequence(operations, budget):
    """Bytes within budget and equal to what is held; every value leaves through on_evict or
    pop exactly once; the value just put is held."""
    held: dict[int, tuple[int, int]] = {}  # key -> (serial, size): what the cache should hold
    left: list[tuple[int, int]] = []
    cache: TinyLfuCache[int, tuple[int, int]] = TinyLfuCache(
        budget, sizeof=lambda v: v[1], on_evict=lambda k, v, refused: left.append(v))
    serial = seen = 0
    for op, key, size, admit in operations:
        if op == "get":
            assert cache.get(key) == held.get(key)
        elif op == "pop":
            assert cache.pop(key) == held.pop(key, None)
        elif key not in cache:
            serial += 1
            cache.put(key, (serial, size), admit=admit)
            held[key] = (serial, size)
            assert cache.peek(key) == (serial, size)  # the newest is held
        for value in left[seen:]:  # each evicted value was held, and leaves once
            owner = {v: k for k, v in held.items()}
            assert value in owner
            del held[owner[value]]
        seen = len(left)
        assert dict(cache.items()) == held and len(cache) == len(held)
        assert cache.currsize == sum(size for _, size in held.values()) <= budget


def test_hit_ratio_beats_an_lru_on_the_benchmark_zipf_mix():
    stream = tenant_draws("zipf10k", 10_000, 60_000, seed=1).tolist()
    lru, (tiny, _) = lru_misses(stream, 500), tinylfu_misses(stream, 500)
    assert tiny.sum() < 0.9 * lru.sum(), (tiny.sum(), lru.sum())


def test_sketch_counts_caps_and_ages():
    sketch = FrequencySketch(capacity=100)
    for i in range(5):
        sketch.increment("a")
    sketch.increment("b")
    assert sketch.frequency("a") == 5 and sketch.frequency("b") == 1 and sketch.frequency("never") == 0
    for _ in range(40):
        sketch.increment("a")
    assert sketch.frequency("a") == MAX_COUNT
    others = [f"k{i}" for i in range(sketch.sample_size)]
    for key in others:  # one sample period: every counter halves
        sketch.increment(key)
    assert sketch.frequency("a") == MAX_COUNT // 2
    assert sum(sketch.frequency(f"unseen-{i}") for i in range(1000)) < 300  # few collisions


def test_every_concurrent_miss_is_served_an_open_model_when_the_cache_holds_one():
    """16 tenants missing at once through a budget of one model: their loads finish close
    together and evict each other before their waiters' turn. Each request must still predict,
    inline as the servicer does for one row, or borrowed into a thread as it does for a batch."""
    texts = [train_model_text(seed=s, num_features=8, num_trees=20, num_leaves=15) for s in range(4)]
    sizes = []
    for text in texts:
        model = LoadedModel.from_model_text(text)
        sizes.append(model.nbytes)
        model.close()
    cache = ModelCache(lambda tenant, version: LoadedModel.from_model_text(texts[int(tenant) % 4]),
                       int(1.5 * max(sizes)), load_threads=4, max_queued_loads=0)
    rows = sample_features(1, 3, num_features=8)

    async def ask(tenant: str) -> list[float]:
        model, _ = await cache.get(tenant, "v1")
        if int(tenant) % 2:  # right away, no await in between
            return model.predict(rows[0])
        with model.borrow(while_closing=True):  # taken before the await, as the servicer does
            return await asyncio.get_running_loop().run_in_executor(None, model.predict, rows.reshape(-1))

    async def storm() -> list[list[float]]:
        results = []
        for _ in range(5):
            results += await asyncio.gather(*(ask(str(i)) for i in range(16)))
        return results

    try:
        answers = asyncio.run(storm())
    finally:
        cache.close()
    expected = {}
    for i in range(4):
        model = LoadedModel.from_model_text(texts[i])
        expected[i] = model.predict(rows.reshape(-1))
        model.close()
    assert answers == [expected[i % 4][:1] if i % 2 else expected[i % 4] for _ in range(5) for i in range(16)]
    assert cache.counters.evictions >= 40  # they really did evict each other


def test_evicted_models_are_freed_off_the_event_loop(monkeypatch):
    """Freeing a large model takes milliseconds that every request on the loop would wait."""
    freed_on: list[str] = []
    real_free = predictor._free_native

    def recording_free(fast_config: int, booster: int, row_predictor=None) -> None:
        freed_on.append(threading.current_thread().name)
        real_free(fast_config, booster, row_predictor)

    monkeypatch.setattr(predictor, "_free_native", recording_free)
    text = train_model_text(seed=1, num_features=8, num_trees=20, num_leaves=15)
    model = LoadedModel.from_model_text(text)
    budget = int(1.5 * model.nbytes)  # one model: every load evicts the one before
    model.close()
    freed_on.clear()
    cache = ModelCache(lambda tenant, version: LoadedModel.from_model_text(text), budget, load_threads=1)

    async def cycle() -> str:
        for tenant in ("a", "b", "c", "d"):
            await cache.get(tenant, "v1")
        return threading.current_thread().name

    loop_thread = asyncio.run(cycle())
    cache.close()
    assert len(freed_on) == 4 and loop_thread not in freed_on[:3], freed_on  # the last: freed at shutdown
    assert all(name.startswith("model-free") for name in freed_on[:3]), freed_on
