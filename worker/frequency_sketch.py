"""How often each model was asked for lately, in fixed memory: TinyLFU's count-min sketch.

The model cache asks "is the model just loaded wanted more often than the one it would push
out?" for every candidate. Exact counts would grow with every tenant ever seen (100k+); a
count-min sketch answers within a small overestimate in a fixed 4 x 65,536 bytes.

- Four rows, one counter per row per key (double hashing of Python's per-process randomised
  `hash`, so request traffic cannot aim collisions at a chosen tenant), capped at 15: only
  "hotter than" matters, and a cap keeps one burst from pinning a model for long.
- Conservative update: only the counters at the current minimum are raised, which keeps the
  overestimate of rare keys low.
- Aging: after `5 x capacity` increments every counter is halved, so the sketch follows the
  traffic of the last few cache generations, not all history (TinyLFU's reset). Caffeine ages
  after 10 x; 5 x gives up a little of the steady-state gain for a faster recovery when the hot
  set changes at once (`loadtest.bench_cache_policy`'s switch from one Zipf mix to another,
  room for 1,000 models: misses over the next 4,000 requests LRU 38.5 %, aging at 10 x 44.9 %,
  at 5 x 41.8 %; the steady-state miss ratios rise by 0.3-0.6 points).

Runs on the event loop thread only (no locks).
"""
from __future__ import annotations

from collections.abc import Hashable

import numpy as np

ROWS = 4
WIDTH_BITS = 16
MAX_COUNT = 15
SAMPLES_PER_ENTRY = 5  # increments per cached entry between halvings (see Aging above)

_WIDTH = 1 << WIDTH_BITS
_MASK = _WIDTH - 1
_ROW_OFFSETS = tuple(row << WIDTH_BITS for row in range(ROWS))
_HASH_BITS = (1 << 64) - 1


class FrequencySketch:
    def __init__(self, capacity: int = 1024) -> None:
        """capacity: about how many entries the cache holds (sets the aging period)."""
        self._counters = bytearray(ROWS * _WIDTH)
        self._additions = 0
        self.sample_size = SAMPLES_PER_ENTRY * max(64, capacity)

    def resize(self, capacity: int) -> None:
        """The cache now holds about `capacity` entries: age over 5 x that many increments."""
        self.sample_size = SAMPLES_PER_ENTRY * max(64, capacity)

    @staticmethod
    def _slots(key: Hashable) -> tuple[int, int, int, int]:
        h = hash(key) & _HASH_BITS
        step = (h >> 32) | 1  # odd: the four rows' slots differ even when the low bits collide
        return ((h & _MASK), ((h + step) & _MASK) | _ROW_OFFSETS[1],
                ((h + 2 * step) & _MASK) | _ROW_OFFSETS[2], ((h + 3 * step) & _MASK) | _ROW_OFFSETS[3])

    def frequency(self, key: Hashable) -> int:
        c = self._counters
        a, b, d, e = self._slots(key)
        return min(c[a], c[b], c[d], c[e])

    def increment(self, key: Hashable) -> None:
        c = self._counters
        slots = self._slots(key)
        a, b, d, e = slots
        low = min(c[a], c[b], c[d], c[e])  # once per request: no generator
        if low < MAX_COUNT:
            for s in slots:
                if c[s] == low:
                    c[s] = low + 1
        self._additions += 1
        if self._additions >= self.sample_size:
            self._halve()

    def _halve(self) -> None:
        counters = np.frombuffer(self._counters, dtype=np.uint8)
        np.right_shift(counters, 1, out=counters)
        self._additions //= 2
