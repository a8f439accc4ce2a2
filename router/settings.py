"""The router's failover, hedging, ejection and quota settings as one typed object.

Read from the parsed command line when the options are there, else from the `MODELFLEET_*`
environment variables, else the defaults (modelfleet.config): a router built without these
flags on its command line still honours the variables, so every feature is on by default.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from modelfleet import config

_OPTIONS = {
    "hedge_after_ms": config.HEDGE_AFTER_MS,
    "eject_after_failures": config.EJECT_AFTER_FAILURES,
    "eject_backoff_s": config.EJECT_BACKOFF_S,
    "eject_max_backoff_s": config.EJECT_MAX_BACKOFF_S,
    "tenant_rate_limit": config.TENANT_RATE_LIMIT,
    "tenant_burst": config.TENANT_BURST,
    "tenant_max_inflight": config.TENANT_MAX_INFLIGHT,
}


@dataclass(frozen=True)
class ResilienceSettings:
    hedge_after_ms: float | str = 0.0  # 0 = off, 'auto' = observed p95
    eject_after_failures: int = 3  # 0 = never eject
    eject_backoff_s: float = 1.0
    eject_max_backoff_s: float = 30.0
    tenant_rate_limit: float = 10_000.0  # 0 = no limit
    tenant_burst: float = 0.0  # 0 = one second of the rate
    tenant_max_inflight: int = 1024  # 0 = no limit

    @classmethod
    def from_args(cls, args: Any = None) -> "ResilienceSettings":
        """Flags where `args` has them, else the environment, else the defaults."""
        values = {}
        for f in fields(cls):
            option = _OPTIONS[f.name]
            value = getattr(args, option.dest, None) if args is not None else None
            values[f.name] = value if value is not None else option.resolve_default()
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.hedge_after_ms != "auto" and float(self.hedge_after_ms) < 0:
            raise SystemExit("error: --hedge-after-ms must be 'auto' or >= 0")
        if self.eject_after_failures < 0 or self.eject_backoff_s <= 0 or self.eject_max_backoff_s < self.eject_backoff_s:
            raise SystemExit("error: --eject-after-failures >= 0 and 0 < --eject-backoff <= --eject-max-backoff")
        if self.tenant_rate_limit < 0 or self.tenant_burst < 0 or self.tenant_max_inflight < 0:
            raise SystemExit("error: --tenant-rate-limit, --tenant-burst and --tenant-max-inflight must be >= 0")
