"""When to hedge: send the same request to the next shard member if the first is slow.

A hedge trades a little extra load for a shorter tail: after `delay()` without an answer, the
failover loop sends the request to the next member too and takes whichever answers first.

- fixed: `--hedge-after-ms 25` hedges after 25 ms;
- auto: the p95 of this router's recent successful attempt latencies, clamped to
  [AUTO_MIN_S, AUTO_MAX_S], so about 5 % of requests are hedged; recomputed every
  RECOMPUTE_EVERY observations (a sort of SAMPLE values: microseconds amortised), and AUTO_MAX_S
  until MIN_SAMPLES have been seen;
- off: 0.

Budget: whatever the delay, hedges are at most about BUDGET_RATIO of requests (a token credit
of BUDGET_RATIO per request, capped): when everything slows down at once (overload), p95 lags
and a fixed delay would hedge nearly every request, doubling the load on a fleet that is
already struggling. The budget keeps hedging from turning a slowdown into an outage.
"""
from __future__ import annotations

from collections import deque

AUTO_MIN_S = 0.005
AUTO_MAX_S = 1.0
SAMPLE = 1024
RECOMPUTE_EVERY = 128
MIN_SAMPLES = 128
BUDGET_RATIO = 0.1
BUDGET_CAP = 20.0


class HedgePolicy:
    def __init__(self, setting: float | str = 0.0) -> None:
        """setting: milliseconds (0 = off) or 'auto'."""
        self.auto = setting == "auto"
        self._fixed = None if self.auto or not float(setting) else float(setting) / 1000
        self._sample: deque[float] = deque(maxlen=SAMPLE)
        self._since_recompute = 0
        self._auto_delay = AUTO_MAX_S
        self._credit = BUDGET_CAP

    @property
    def enabled(self) -> bool:
        return self.auto or self._fixed is not None

    def delay(self) -> float | None:
        """Seconds to wait before hedging this request; None = do not hedge it."""
        if self.auto:
            delay = self._auto_delay
        elif self._fixed is None:
            return None
        else:
            delay = self._fixed
        self._credit = min(BUDGET_CAP, self._credit + BUDGET_RATIO)
        return delay

    def take(self) -> bool:
        """Spends one hedge from the budget; False when it is empty (do not hedge)."""
        if self._credit < 1.0:
            return False
        self._credit -= 1.0
        return True

    def observe(self, seconds: float) -> None:
        """A successful attempt's latency (auto mode learns from these)."""
        if not self.auto:
            return
        self._sample.append(seconds)
        self._since_recompute += 1
        if self._since_recompute >= RECOMPUTE_EVERY and len(self._sample) >= MIN_SAMPLES:
            self._since_recompute = 0
            ordered = sorted(self._sample)
            p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
            self._auto_delay = min(AUTO_MAX_S, max(AUTO_MIN_S, p95))

    @property
    def current_delay_s(self) -> float | None:
        return self._auto_delay if self.auto else self._fixed
