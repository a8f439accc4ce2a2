"""Make-before-break for a join: a `joining` worker loads the active tenants it is about to own.

Active = used within --warm-active-minutes on some other worker (modelfleet.rebalance). The wait
is bounded: a worker never stays `joining` for long, whatever the warm-ups meet.
- `--warm-join-budget` seconds in all (reading the fleet included): then the warm-ups not yet
  done are skipped and the worker goes live; routers load those tenants on demand, as they do
  without --warm-on-join. Without it a join with a hung store took ~10 s (the store's timeouts,
  modelfleet.store_s3) per 8 placements: ~20 minutes for 1000.
- A store that is evidently down: STORE_DOWN_AFTER warm-ups in a row failed because the worker
  could not reach its store (UNAVAILABLE with the model-failure mark): the rest would fail the
  same way, so they are skipped at once.
Failures never block the join: a cold load later is better than a worker that never goes live.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from typing import Callable

from modelfleet import tls
from modelfleet.log import event
from modelfleet.rebalance import WarmupResult, active_models, run_warmups, warmups_for
from version_service.etcd_client import EtcdClient
from version_service.membership import published_shard_sizes, read_fleet
from version_service.registry import Registry
from version_service.schema import Keys, WorkerRecord, live_members

log = logging.getLogger("modelfleet.worker")

STORE_DOWN_AFTER = 3  # warm-ups in a row that could not reach the store before the rest are skipped
STATS_TIMEOUT_S = 5.0  # for each other worker's Stats (who is active), within the budget


def store_down_after(failures: int) -> Callable[[WarmupResult], str | None]:
    """A `stop_when` for run_warmups: "store_unavailable" once `failures` warm-ups in a row (in
    the order they finished) failed because the worker could not reach its store. A success in
    between starts the count again: artifacts on the worker's disk load without the store."""
    in_a_row = seen = 0

    def check(result: WarmupResult) -> str | None:
        nonlocal in_a_row, seen
        in_a_row = in_a_row + 1 if result.store_unreachable > seen else 0
        seen = result.store_unreachable
        return "store_unavailable" if in_a_row >= failures else None

    return check


def warm_before_going_live(client: EtcdClient, keys: Keys, me: WorkerRecord, args: argparse.Namespace) -> None:
    """Loads the active tenants `me` is about to own, within args.warm_join_budget seconds, and
    logs one `worker.warmed_before_join` event (what was loaded, failed and skipped, and why it
    stopped early, if it did). Never raises: the join goes on whatever happens here."""
    started = time.monotonic()
    deadline = started + args.warm_join_budget
    try:
        workers, drains = read_fleet(client, keys)
        if me.worker_id in drains:
            return
        others = {w: r for w, r in workers.items() if w != me.worker_id}
        before = live_members(others, drains)
        after = live_members({**others, me.worker_id: dataclasses.replace(me, joining=False)}, drains)
        credentials = tls.channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
        stats_timeout = min(STATS_TIMEOUT_S, max(0.1, deadline - time.monotonic()))
        active = active_models(others.values(), args.warm_active_minutes * 60, timeout=stats_timeout,
                               credentials=credentials)
        if not active:
            return
        tenants, sizes = Registry(client, keys).shard_sizes()
        routed = set(published_shard_sizes(client, keys).values())  # what the routers will route with
        default_k = routed.pop() if len(routed) == 1 else args.shard_size
        mine = [w for w in warmups_for(active, set(tenants), sizes, before, after, default_k)
                if w.worker_id == me.worker_id]
        result = run_warmups(mine, {me.worker_id: me.address}, credentials=credentials, deadline=deadline,
                             stop_when=store_down_after(STORE_DOWN_AFTER))
        event(log, "worker.warmed_before_join", worker=me.worker_id, active_tenants=len(active),
              placements=len(mine), loaded=result.loaded, already_warm=result.already_warm,
              failed=len(result.failed), skipped=len(result.skipped), stopped=result.stopped,
              seconds=round(time.monotonic() - started, 3))
    except Exception as exc:  # noqa: BLE001 - never block a join on warm-up
        event(log, "worker.warm_before_join_failed", level=logging.WARNING, worker=me.worker_id, error=str(exc))
