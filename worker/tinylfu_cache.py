"""Which loaded models to keep within a byte budget: W-TinyLFU (an LRU with a frequency filter).

Why not a plain LRU: with per-tenant traffic (Zipf-like: a few hot tenants, a long tail) every
one-off request of a tail tenant pushes a model out that is wanted again soon; each such miss
costs a model parse (milliseconds of CPU). W-TinyLFU (Einziger, Friedman & Manes, "TinyLFU: A
Highly Efficient Cache Admission Policy", 2017; the policy of Java's Caffeine) keeps hot models
through such scans: on Zipf s=1.1 over 10k / 100k tenants with room for 1,000 models it misses
~18% / ~27% of requests where an LRU misses ~22% / ~33% (`python -m loadtest.bench_cache_policy`).
Its price: when the whole hot set changes at once, it must first forget the old one (the
sketch ages), so for a few cache generations it misses more than an LRU (~42% against ~39%
over the first 4,000 requests after a switch from one Zipf mix to another).

Three LRU segments share the budget:
- the window (~1% of the budget, and always its newest model): every loaded model enters here,
  so a new tenant's burst is served from cache whatever its history;
- probation and protected, the main area: a model leaving the window is a candidate and gets
  in only if the frequency sketch (worker.frequency_sketch) says it was asked for more often than
  the model it would evict (probation's least recently used first); a hit in probation promotes
  to protected (at most 80% of the main area; its least recently used go back to probation).

Invariant: the bytes of all models held never exceed the budget (the window's newest model is
paid for by evicting from the main area). Every model that leaves goes to `on_evict` exactly
once, told whether it was a candidate refused admission; `pop` hands a model back without it.
Runs on the event loop thread only (no locks).
"""
from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Hashable
from typing import Callable, Generic, TypeVar

from worker.frequency_sketch import FrequencySketch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

WINDOW_SHARE = 0.01
PROTECTED_SHARE = 0.8
# Caffeine's defence against a flood of keys colliding with a hot one in the sketch: a warm
# candidate that loses is still admitted once in 128 tries.
_WARM_CANDIDATE = 6
_LUCKY_ADMISSION = 1 / 128


class TinyLfuCache(Generic[K, V]):
    def __init__(self, budget: int, sizeof: Callable[[V], int], on_evict: Callable[[K, V, bool], None],
                 window_share: float = WINDOW_SHARE, protected_share: float = PROTECTED_SHARE) -> None:
        """sizeof: a value's bytes, read once when it is put. on_evict(key, value, refused):
        refused is True for a candidate refused admission to the main area."""
        self.budget = budget
        self._sizeof = sizeof
        self._on_evict = on_evict
        self._window_budget = int(budget * window_share)
        self._protected_share = protected_share
        self._window: OrderedDict[K, V] = OrderedDict()
        self._probation: OrderedDict[K, V] = OrderedDict()
        self._protected: OrderedDict[K, V] = OrderedDict()
        self._sizes: dict[K, int] = {}
        self._window_bytes = self._probation_bytes = self._protected_bytes = 0
        self._sketch = FrequencySketch()
        self._sized_for = 0
        self._random = random.Random()
        self._admit_unasked: set[K] = set()  # put with admit=True, still in the window

    # --- reading -------------------------------------------------------------------------------

    @property
    def currsize(self) -> int:
        return self._window_bytes + self._probation_bytes + self._protected_bytes

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: K) -> bool:
        return key in self._sizes

    def items(self) -> list[tuple[K, V]]:
        return [*self._window.items(), *self._probation.items(), *self._protected.items()]

    def peek(self, key: K) -> V | None:
        """The value without counting an access or touching recency."""
        for segment in (self._window, self._probation, self._protected):
            value = segment.get(key)
            if value is not None:
                return value
        return None

    # --- using ---------------------------------------------------------------------------------

    def get(self, key: K) -> V | None:
        """Counts one request for `key` (hit or miss) and returns its value if held."""
        self._sketch.increment(key)
        value = self._window.get(key)
        if value is not None:
            self._window.move_to_end(key)
            return value
        value = self._protected.get(key)
        if value is not None:
            self._protected.move_to_end(key)
            return value
        value = self._probation.pop(key, None)
        if value is not None:  # asked for again while on probation: protected from now on
            size = self._sizes[key]
            self._probation_bytes -= size
            self._protected[key] = value
            self._protected_bytes += size
            self._demote_protected()
        return value

    def put(self, key: K, value: V, admit: bool = False) -> None:
        """Holds a newly loaded `value` (`key` must not be held: `pop` it first), evicting what must go.
        `admit`: it is known to be wanted soon (a rebalance warms it before traffic moves), so it
        enters the main area when it leaves the window, whatever its frequency so far."""
        size = self._sizeof(value)
        if size > self.budget:
            raise ValueError(f"{size} bytes do not fit a budget of {self.budget}")
        if key in self._sizes:
            raise KeyError(f"{key!r} is held already")
        self._sizes[key] = size
        if admit:
            self._admit_unasked.add(key)
        self._window[key] = value
        self._window_bytes += size
        while len(self._window) > 1 and self._window_bytes > self._window_budget:
            candidate, candidate_value = self._window.popitem(last=False)
            self._window_bytes -= self._sizes[candidate]
            self._admit(candidate, candidate_value)
        while self.currsize > self.budget:  # the window's newest alone may exceed the window's share
            self._evict_from_main()
        if len(self._sizes) > self._sized_for:
            self._sized_for = len(self._sizes)
            self._sketch.resize(self._sized_for)

    def pop(self, key: K, default: V | None = None) -> V | None:
        """Removes `key` without calling `on_evict` (the caller owns the value now)."""
        size = self._sizes.pop(key, None)
        if size is None:
            return default
        self._admit_unasked.discard(key)
        if key in self._window:
            self._window_bytes -= size
            return self._window.pop(key)
        if key in self._probation:
            self._probation_bytes -= size
            return self._probation.pop(key)
        self._protected_bytes -= size
        return self._protected.pop(key)

    def popitem(self) -> tuple[K, V]:
        """Removes some entry without calling `on_evict` (for shutting down)."""
        key = next(iter(self._sizes))
        return key, self.pop(key)

    # --- inside --------------------------------------------------------------------------------

    def _admit(self, candidate: K, value: V) -> None:
        """`candidate` left the window: into probation if it is wanted more than what it displaces."""
        admit = candidate in self._admit_unasked
        self._admit_unasked.discard(candidate)
        size = self._sizes[candidate]
        main_budget = self.budget - self._window_bytes
        if size > main_budget:
            return self._reject(candidate, value)
        candidate_frequency = self._sketch.frequency(candidate)
        while self._probation_bytes + self._protected_bytes + size > main_budget:
            victim = next(iter(self._probation or self._protected))
            if not admit and not self._wins(candidate_frequency, self._sketch.frequency(victim)):
                return self._reject(candidate, value)
            self._evict_from_main()
        self._probation[candidate] = value
        self._probation_bytes += size

    def _reject(self, candidate: K, value: V) -> None:
        del self._sizes[candidate]
        self._on_evict(candidate, value, True)

    def _wins(self, candidate_frequency: int, victim_frequency: int) -> bool:
        if candidate_frequency > victim_frequency:
            return True
        return candidate_frequency >= _WARM_CANDIDATE and self._random.random() < _LUCKY_ADMISSION

    def _evict_from_main(self) -> None:
        segment = self._probation or self._protected
        key = next(iter(segment))
        self._on_evict(key, self.pop(key), False)

    def _demote_protected(self) -> None:
        limit = (self.budget - self._window_bytes) * self._protected_share
        while self._protected_bytes > limit and len(self._protected) > 1:
            key, value = self._protected.popitem(last=False)
            size = self._sizes[key]
            self._protected_bytes -= size
            self._probation[key] = value
            self._probation_bytes += size
