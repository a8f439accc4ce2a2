"""No native leak across load/evict cycles: the worker's ModelCache and LoadedModel, in process.

Every cycle is a miss that loads a model (a real LightGBM parse in the cache's load pool) and,
the byte budget holding just one model, evicts (closes, frees) the previous one; the loaded
model then predicts one row, and every tenth cycle a small batch, as the servicer would. Free
heap is handed back to the OS on the worker's cadence (`memory.trim` about once a second
while evictions happen). RSS is read after a warm-up, when malloc's arenas, Python's
allocators and LightGBM's per-thread buffers have reached their steady state, and again at
the end: a leak of even 1% of each model (~200 bytes a cycle) would add 16 MB over the soak's
80k measured cycles, against its bound of 10 MB.

`make soak` runs the 100k-cycle soak; the 5k-cycle version runs with the normal suite.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from modelfleet.demo_models import sample_features, train_model_text
from modelfleet.procfs import rss_bytes
from worker import memory, predictor
from worker.model_cache import ModelCache
from worker.predictor import LoadedModel

pytestmark = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")

NUM_FEATURES = 8
TENANTS = 8  # the budget holds one model, so each cycle's tenant was evicted since: always a miss
TRIM_EVERY_S = 1.0  # the worker's trim cadence (worker.server._trim_after_evictions)


def model_texts() -> list[str]:
    """A few distinct small models of one shape, so their sizes are within a few % of each other."""
    return [train_model_text(seed=seed, num_features=NUM_FEATURES, num_trees=20, num_leaves=15)
            for seed in range(4)]


def one_model_budget(texts: list[str]) -> int:
    """Room for the largest of the models, never for two of them: every load evicts."""
    sizes = []
    for text in texts:
        model = LoadedModel.from_model_text(text)
        sizes.append(model.nbytes)
        model.close()
    assert max(sizes) < 1.3 * min(sizes), sizes
    return int(1.5 * max(sizes))


async def cycle(cache: ModelCache, cycles: int, warm_up: int, rows: np.ndarray) -> tuple[int, int]:
    """Runs `cycles` load/evict cycles; RSS after `warm_up` of them and at the end."""
    rss_warm = 0
    last_trim = time.monotonic()
    batch = rows[:4].reshape(-1)
    for i in range(cycles):
        model, loaded = await cache.get(f"tenant-{i % TENANTS}", "v1")
        assert loaded
        with model.borrow():
            model.predict(rows[i % len(rows)])
            if i % 10 == 0:
                model.predict(batch)
        if time.monotonic() - last_trim >= TRIM_EVERY_S:
            memory.trim()
            last_trim = time.monotonic()
        if i + 1 == warm_up:
            memory.trim()
            rss_warm = rss_bytes()
    memory.trim()
    return rss_warm, rss_bytes()


def soak(cycles: int, warm_up: int) -> dict[str, float]:
    texts = model_texts()
    budget = one_model_budget(texts)
    rows = sample_features(seed=3, rows=64, num_features=NUM_FEATURES)
    cache = ModelCache(lambda tenant, version: LoadedModel.from_model_text(texts[int(tenant[7:]) % len(texts)]),
                       budget, load_threads=2, max_queued_loads=0)
    measured_before = predictor.sizing.measured
    started = time.perf_counter()
    try:
        rss_warm, rss_end = asyncio.run(cycle(cache, cycles, warm_up, rows))
        assert cache.counters.loads == cycles and cache.counters.evictions == cycles - 1
        assert len(cache) == 1 and cache.bytes_used <= budget
    finally:
        cache.close()
    figures = {"cycles": cycles, "seconds": time.perf_counter() - started, "rss_warm_mb": rss_warm / 2**20,
               "rss_end_mb": rss_end / 2**20, "growth_mb": (rss_end - rss_warm) / 2**20,
               "growth_kb": (rss_end - rss_warm) // 1024, "measured_loads": predictor.sizing.measured - measured_before}
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    return figures


def test_5k_load_evict_cycles_do_not_grow_rss():
    figures = soak(cycles=5_000, warm_up=1_000)
    assert figures["growth_mb"] < 3, figures  # a 1%-of-a-model leak: 0.8 MB; a whole model: 80 MB
    assert figures["measured_loads"] < 5_000 // predictor._MEASURE_EVERY + predictor._MEASURE_FIRST + 1


@pytest.mark.soak
def test_soak_100k_load_evict_cycles_do_not_grow_rss():
    figures = soak(cycles=100_000, warm_up=20_000)
    assert figures["growth_mb"] < 10, figures
