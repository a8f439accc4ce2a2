"""Failed model loads, remembered for a back-off so a broken model is not reloaded per request.

Without it a corrupt artifact costs a store read, a sha256 and a parse on every request for
that tenant (and an etcd read for an unknown version): one broken tenant could keep the load
pool busy and push healthy tenants' loads back.

Policy, by what failed:
- NotFound (the version is not registered): remembered NOT_FOUND_S (1 s) flat, so a version
  registered a moment later is usable within a second;
- Unavailable (etcd or the store unreachable): remembered UNAVAILABLE_S (1 s) flat, never
  escalated: the outage is not the model's fault, and it may end any moment;
- anything else (corrupt or missing artifact, unparseable model, a model larger than the whole
  cache, a bug): exponential back-off per (tenant, version), BASE_S doubling to MAX_S (1 s ..
  60 s); a successful load forgets the entry.

Invariants: while an entry is live, `check` raises an error of the original class (so the
same gRPC status) whose message names tenant, version and cause; an expired entry is kept
(LRU-bounded) only to remember its back-off level for the next failure.
Runs on the event loop thread only (no locks).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from cachetools import LRUCache

from modelfleet.errors import ModelfleetError, NotFound, Unavailable

BASE_S = 1.0
MAX_S = 60.0
NOT_FOUND_S = 1.0
UNAVAILABLE_S = 1.0
MAX_ENTRIES = 10_000

Key = tuple[str, str]


@dataclass(slots=True)
class _Failure:
    error: ModelfleetError
    until: float
    backoff: float


class NegativeCache:
    def __init__(self, base_s: float = BASE_S, max_s: float = MAX_S, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = MAX_ENTRIES) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self.hits = 0  # requests answered from a remembered failure
        self._clock = clock
        self._entries: LRUCache = LRUCache(maxsize=max_entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, key: Key) -> None:
        """Raises the remembered failure while its back-off lasts; else returns."""
        if not self._entries:  # the common case: nothing has failed
            return
        entry = self._entries.get(key)
        if entry is None:
            return
        left = entry.until - self._clock()
        if left <= 0:
            return
        self.hits += 1
        raise _repeat(entry.error, f"{entry.error} (load failure remembered; next attempt in {left:.1f} s)")

    def record(self, key: Key, exc: BaseException) -> float:
        """Remembers a failed load; returns the back-off in seconds."""
        error = _as_modelfleet_error(key, exc)
        if isinstance(error, NotFound):
            backoff = NOT_FOUND_S
        elif isinstance(error, Unavailable):
            backoff = UNAVAILABLE_S
        else:
            previous = self._entries.get(key)
            escalating = previous is not None and not isinstance(previous.error, (NotFound, Unavailable))
            backoff = min(self.max_s, previous.backoff * 2) if escalating else self.base_s
        self._entries[key] = _Failure(error, self._clock() + backoff, backoff)
        return backoff

    def forget(self, key: Key) -> None:
        """A successful load: the model is fine now."""
        if self._entries:
            self._entries.pop(key, None)


def _as_modelfleet_error(key: Key, exc: BaseException) -> ModelfleetError:
    """The error to repeat, naming tenant, version and cause. Anything not ours (a bug) becomes
    a plain ModelfleetError (INTERNAL, answered without a traceback per request: the one
    traceback was logged when the load failed)."""
    what = f"tenant {key[0]!r} version {key[1]!r}"
    if isinstance(exc, ModelfleetError):
        return exc if key[0] in str(exc) else _repeat(exc, f"{what}: {exc}")
    return ModelfleetError(f"{what}: loading failed: {type(exc).__name__}: {exc}")


def _repeat(error: ModelfleetError, message: str) -> ModelfleetError:
    """A fresh error of the same class and status with a new message."""
    try:
        copy = type(error)(message)
    except TypeError:  # a subclass with a different constructor
        copy = ModelfleetError(message)
    copy.code = error.code
    return copy
