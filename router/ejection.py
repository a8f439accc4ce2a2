"""Outlier ejection: a worker that keeps failing is tried last for a while, then probed back in.

A dead worker answers UNAVAILABLE at once, but a hung one (SIGSTOP, a wedged process) costs
every request routed to it an attempt timeout before failover. After `failures` consecutive
failures or attempt timeouts the worker is *ejected*: for a back-off (`base_s`, doubling per
failed probe up to `max_s`) it goes to the end of every member order, so requests reach a
healthy member first. When the back-off ends, one request is let through in its normal place
(the probe); its success clears everything, its failure ejects again for twice as long.

Invariants:
- ejection reorders, it never removes: an ejected worker is still tried after the others, so
  when every member of a shard is ejected, requests still go somewhere;
- at most one probe per worker is outstanding (`probe_until`); a probe whose answer never
  comes (cancelled because another member answered first, or never sent) frees the slot
  (`abandoned`, called only by the request the probe was handed to: another request's
  cancelled attempt on that worker must not let a second probe go), and a lost one frees it
  after PROBE_TIMEOUT_S;
- any success from a worker clears its state (it answered, so it is not hung or dead);
- state exists only for workers with a recent failure, and is dropped when they leave the
  fleet (`forget`), so memory is bounded by the fleet size.
Event loop only: no locks.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from modelfleet.log import event
from router.counters import RouterCounters

log = logging.getLogger("modelfleet.router.ejection")

PROBE_TIMEOUT_S = 10.0


@dataclass(slots=True)
class _State:
    consecutive: int = 0
    ejected_until: float = 0.0  # 0: not ejected
    backoff: float = 0.0
    probe_until: float = 0.0  # a probe is outstanding until then


class OutlierEjector:
    def __init__(self, failures: int = 3, base_s: float = 1.0, max_s: float = 30.0,
                 counters: RouterCounters | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.base_s = base_s
        self.max_s = max_s
        self.counters = counters if counters is not None else RouterCounters()
        self._clock = clock
        self._states: dict[str, _State] = {}
        self._ejected = 0  # workers ejected now: 0 makes `order` free

    @property
    def active(self) -> bool:
        """Whether any worker is ejected now (False: `order` and probes cost nothing)."""
        return self._ejected > 0

    def ejected(self) -> list[str]:
        return sorted(w for w, s in self._states.items() if s.ejected_until)

    def is_ejected(self, worker_id: str) -> bool:
        state = self._states.get(worker_id)
        return state is not None and state.ejected_until != 0.0

    def order(self, members: list[str]) -> list[str]:
        """members with the ejected ones moved to the end, except a worker whose probe is due."""
        return self.order_with_probes(members)[0]

    def order_with_probes(self, members: list[str]) -> tuple[list[str], tuple[str, ...]]:
        """(order, the workers handed to this request as probes): the caller owes `abandoned` for
        each probe it cancels or never sends."""
        if not self._ejected:
            return members, ()
        now = self._clock()
        first: list[str] = []
        last: list[str] = []
        probes: tuple[str, ...] = ()
        for worker_id in members:
            state = self._states.get(worker_id)
            if state is None or not state.ejected_until:
                first.append(worker_id)
            elif now >= state.ejected_until and now >= state.probe_until:
                state.probe_until = now + PROBE_TIMEOUT_S
                self.counters.probes += 1
                probes += (worker_id,)
                first.append(worker_id)  # the probe keeps its place, so it really gets the request
            else:
                last.append(worker_id)
        return (first + last if last else first), probes

    def success(self, worker_id: str) -> None:
        state = self._states.pop(worker_id, None)
        if state is not None and state.ejected_until:
            self._ejected -= 1
            self.counters.restored += 1
            event(log, "router.worker_restored", worker=worker_id)

    def failure(self, worker_id: str, why: str) -> None:
        """A failure or attempt timeout of `worker_id` (not errors about the request itself)."""
        if not self.failures:
            return
        state = self._states.get(worker_id)
        if state is None:
            state = self._states[worker_id] = _State()
        state.consecutive += 1
        now = self._clock()
        if state.ejected_until:
            if now >= state.ejected_until:  # the probe (or a request past the back-off) failed
                state.backoff = min(self.max_s, state.backoff * 2)
                state.ejected_until = now + state.backoff
                state.probe_until = 0.0
                self.counters.ejections += 1
                event(log, "router.worker_ejected", level=logging.WARNING, worker=worker_id, why=why,
                      backoff_s=state.backoff, consecutive=state.consecutive)
        elif state.consecutive >= self.failures:
            state.backoff = self.base_s
            state.ejected_until = now + state.backoff
            self._ejected += 1
            self.counters.ejections += 1
            event(log, "router.worker_ejected", level=logging.WARNING, worker=worker_id, why=why,
                  backoff_s=state.backoff, consecutive=state.consecutive)

    def abandoned(self, worker_id: str) -> None:
        """The probe of worker_id handed to a request was cancelled unanswered or never sent:
        another may go."""
        state = self._states.get(worker_id)
        if state is not None and state.probe_until:
            state.probe_until = 0.0

    def forget(self, worker_id: str) -> None:
        """The worker left the fleet, or a new process registered under its id: its past is not the new one's."""
        state = self._states.pop(worker_id, None)
        if state is not None and state.ejected_until:
            self._ejected -= 1
