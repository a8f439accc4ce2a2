"""`shards plan | apply | report` and `workers drain | undrain`: rebalancing the fleet safely.

plan   : what a proposed change moves (read-only, from etcd's current state).
apply  : warm the new placements of recently active tenants (make-before-break), then commit
         the whole change in one etcd transaction that fails if anything it read has changed;
         not at all when a warm-up could not reach its worker (unless --force).
report : how well shuffle sharding isolates tenants, live or for a hypothetical fleet.
"""
from __future__ import annotations

import argparse
import getpass
import json
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from modelfleet import config
from modelfleet.cli.client import channel_credentials
from modelfleet.errors import Conflict, FailedPrecondition, InvalidArgument, NotFound
from modelfleet.rebalance import WarmupResult, active_models, run_warmups, warmups_for
from sharding import MAX_SHARD_SIZE, Member
from sharding.plan import FleetChange, ShardPlan, plan_change
from sharding.report import isolation_report, simulated_fleet
from version_service.etcd_client import connect_args, etcd_errors
from version_service.membership import published_shard_sizes, read_fleet
from version_service.registry import Registry
from version_service.schema import DrainRecord, Keys, RouteRecord, WorkerRecord, live_members, utc_stamp, validate_id

console = Console(highlight=False)


@dataclass
class FleetState:
    registry: Registry
    workers: dict[str, WorkerRecord]
    drains: set[str]
    tenants: list[str]
    sizes: dict[str, int]  # shard-size overrides

    @property
    def members(self) -> list[Member]:
        """Registered, non-joining workers (drained ones included), as plans see them."""
        return sorted((Member(w.worker_id, w.zone) for w in self.workers.values() if not w.joining),
                      key=lambda m: m.worker_id)


def read_state(args: argparse.Namespace) -> FleetState:
    registry = Registry(connect_args(args), Keys(args.prefix))
    workers, drains = read_fleet(registry.client, registry.keys)
    tenants, sizes = registry.shard_sizes()
    return FleetState(registry, workers, set(drains) & set(workers), tenants, sizes)


def change_from_args(args: argparse.Namespace) -> FleetChange:
    try:
        sizes = tuple((validate_id("tenant id", t), k) for t, k in (args.set_size or ()))
        return FleetChange(add=tuple(FleetChange.parse_worker(s) for s in args.add_worker or ()),
                           remove=tuple(args.remove_worker or ()), drain=tuple(args.drain or ()),
                           undrain=tuple(args.undrain or ()), set_size=sizes)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def fleet_shard_size(client, keys: Keys, given: int | None) -> int:
    """The shard size of tenants whose route names none, as the live routers route them (each
    publishes its --shard-size): a plan or a warm-up with another size would move other members
    than the routers do. `given` (--shard-size) must agree with them; routers that disagree
    among themselves are an error to fix first."""
    published = published_shard_sizes(client, keys)
    sizes = sorted(set(published.values()))
    if len(sizes) > 1:
        raise FailedPrecondition("the routers run with different --shard-size values ("
                                 + ", ".join(f"{r}: {k}" for r, k in sorted(published.items()))
                                 + "): give them one before planning shards")
    if given is not None and sizes and sizes != [given]:
        raise FailedPrecondition(f"the routers run with --shard-size {sizes[0]}; planning with {given} would "
                                 f"not be their shards (leave --shard-size out)")
    return given if given is not None else sizes[0] if sizes else config.SHARD_SIZE.default


def make_plan(state: FleetState, change: FleetChange, default_k: int) -> ShardPlan:
    try:
        return plan_change(state.tenants, state.members, state.drains, state.sizes, default_k, change)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def add_change_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--add-worker", action="append", metavar="ID[@ZONE]", help="a worker that will join")
    parser.add_argument("--remove-worker", action="append", metavar="ID", help="a worker that will leave")
    parser.add_argument("--drain", action="append", metavar="ID", help="take a worker out of every shard")
    parser.add_argument("--undrain", action="append", metavar="ID", help="put a drained worker back")
    parser.add_argument("--set-size", action=SizeOverride, nargs=2, metavar=("TENANT", "K"),
                        help=f"a tenant's shard size (1 to {MAX_SHARD_SIZE})")
    parser.add_argument("--json", action="store_true", help="print JSON")


def add_commit_arguments(parser: argparse.ArgumentParser, drains: bool) -> None:
    """The flags of the commands that warm, then commit (apply, drain, undrain); `drains`: it
    may drain a worker, so it takes the --reason kept in the drain record."""
    parser.add_argument("--force", action="store_true",
                        help="commit even when warm-ups could not reach a worker (an incident): traffic moves onto "
                             "workers that were not warmed")
    if drains:
        parser.add_argument("--reason", type=REASON_TYPE, default=None, metavar="TEXT",
                            help=f"why the worker is drained, kept in its drain record and shown by `workers` "
                                 f"(printable, one line, at most {REASON_CHARS} characters)")


SHARD_SIZE_TYPE = config.whole(1, MAX_SHARD_SIZE)
WARMUP_FAILURES_SHOWN = 100  # of a change's failed warm-ups, in its output (text and --json)
REASON_CHARS = 200  # a drain's --reason: a note for the `workers` table, not a document
REASON_TYPE = config.one_line(REASON_CHARS)


def shard_size_or_default(text: str) -> int | None:
    """A flag type: a shard size, or None for 'default' (the routers' --shard-size)."""
    if text == "default":
        return None
    try:
        return SHARD_SIZE_TYPE(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, or 'default'") from None


class SizeOverride(argparse.Action):
    """`--set-size TENANT K`, appended as (tenant, K); a K that is no shard size is a usage error."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        tenant, size = values
        try:
            pair = (tenant, SHARD_SIZE_TYPE(size))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(self, f"{tenant}: {exc}") from None
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), pair])


# -- plan ---------------------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> int:
    state = read_state(args)
    change = change_from_args(args)
    result = make_plan(state, change, fleet_shard_size(state.registry.client, state.registry.keys, args.shard_size))
    no_live_worker = not live_after(state, change)
    if args.json:
        print(json.dumps({**result.to_json(), "leaves_no_live_worker": no_live_worker}))
        return 0
    print_plan(result)
    if no_live_worker:
        console.print("[red]this change leaves no live worker: every tenant would fail, and apply refuses it[/red]")
    return 0


def live_after(state: FleetState, change: FleetChange) -> list[Member]:
    """The workers left live once `change` is applied (a removed worker leaves, as a drained one)."""
    return live_members(state.workers, (state.drains | set(change.drain) | set(change.remove)) - set(change.undrain))


def print_plan(result: ShardPlan) -> None:
    table = Table(title="tenants per worker")
    for column in ("worker", "before", "after", "change"):
        table.add_column(column, justify="right" if column != "worker" else "left")
    for worker_id, (before, after) in sorted(result.per_worker.items()):
        delta = after - before
        table.add_row(worker_id, str(before), str(after), f"{delta:+d}" if delta else "")
    console.print(table)
    console.print(f"{result.tenants} tenants, {result.placements_before} placements before, "
                  f"{result.placements_after} after")
    console.print(f"moved placements: {result.moved_placements} ({result.moved_fraction:.2%}); "
                  f"tenants whose shard changes: {result.tenants_changed}")
    console.print(f"to warm before traffic shifts (apply warms those of the tenants active then): "
                  f"{len(result.to_warm)} ({len(result.warmups)} new placements, {len(result.promoted)} new first "
                  f"members)")
    if result.short_shard_tenants:
        console.print(f"[yellow]{result.short_shard_tenants} tenants ask for more workers than are live: "
                      f"their shard is every live worker[/yellow]")


# -- apply --------------------------------------------------------------------------------------
def apply(args: argparse.Namespace) -> int:
    change = change_from_args(args)
    if change.add:
        raise FailedPrecondition(
            "a worker joins by starting it (`modelfleet worker --worker-id ID --zone Z`): it warms the active "
            "tenants it will own before it takes traffic; use `shards plan --add-worker` to preview")
    if change.empty:
        raise InvalidArgument("nothing to apply: give --drain, --undrain, --remove-worker or --set-size")
    state = read_state(args)
    if change.remove:  # leaving the fleet for good = drained now (if not yet), stopped by its orchestrator later
        change = FleetChange(drain=change.drain + tuple(w for w in change.remove if w not in state.drains),
                             undrain=change.undrain, set_size=change.set_size)
    return apply_change(args, change, state, reason=args.reason or "shards apply")


def apply_change(args: argparse.Namespace, change: FleetChange, state: FleetState | None = None,
                 reason: str = "") -> int:
    """Warm, then commit `change`; `state`: the fleet as the caller already read it (else read
    here); `reason`: kept in the record of each drain the change makes.

    Not committed (FailedPrecondition) when a warm-up could not reach its worker, unless
    --force: make-before-break must not move traffic onto a worker it could not warm, which may
    well be down. A warm-up that failed for the model's sake would fail on any worker: it is
    reported and does not stop the change."""
    state = state if state is not None else read_state(args)
    default_k = fleet_shard_size(state.registry.client, state.registry.keys, args.shard_size)
    result = make_plan(state, change, default_k)
    before = live_members(state.workers, state.drains)
    after = live_after(state, change)
    if not after:
        raise FailedPrecondition(f"this change leaves no live worker (live now: "
                                 f"{', '.join(m.worker_id for m in before) or 'none'}): every tenant would fail; "
                                 f"start or undrain a worker first")
    sizes_after = dict(change.set_size)
    credentials = channel_credentials(args)
    # what the tenants use now: asked of the live workers, or of the drained ones when none is live
    asked = before or [m for m in state.members if m.worker_id in state.drains]
    active = active_models([state.workers[m.worker_id] for m in asked], args.warm_active_minutes * 60,
                           credentials=credentials)
    warmups = warmups_for(active, set(state.tenants), state.sizes, before, after, default_k, sizes_after)
    warm = warm_with_progress(warmups, {w: r.address for w, r in state.workers.items()}, args.json, credentials,
                              args.warm_timeout)
    refused = bool(warm.unreachable) and not args.force
    summary = {"applied": not refused, "forced": bool(warm.unreachable) and args.force,
               "moved_placements": result.moved_placements, "tenants_changed": result.tenants_changed,
               "active_tenants": len(active), "warmups": len(warmups), "loaded": warm.loaded,
               "already_warm": warm.already_warm, "warmup_failures": len(warm.failed),
               "unreachable_workers": dict(sorted(warm.unreachable.items())),
               "warmup_failed": [{"tenant": wu.tenant, "version": wu.version, "worker": wu.worker_id, "why": why}
                                 for wu, why in warm.failed[:WARMUP_FAILURES_SHOWN]]}
    if not refused:
        commit(state, change, after, reason)
    if args.json:  # a refusal too: the summary on stdout, the one-line error on stderr, exit 1
        print(json.dumps(summary))
    else:
        print_applied(summary, warm)
    if refused:
        raise FailedPrecondition(refusal(warm.unreachable, len(warmups)))
    return 0


def unreachable_text(unreachable: dict[str, int]) -> str:
    return ", ".join(f"{worker_id}: {count}" for worker_id, count in sorted(unreachable.items()))


def refusal(unreachable: dict[str, int], warmups: int) -> str:
    """The one line a change not committed for unreachable workers ends with: which, how many, what now."""
    return (f"not applied: {sum(unreachable.values())} of {warmups} warm-ups could not reach their worker "
            f"({unreachable_text(unreachable)}), and make-before-break does not move traffic onto a worker it "
            f"could not warm; check it (`modelfleet status --once`), give slow loads a longer --warm-timeout, or "
            f"re-run with --force to commit anyway")


def print_applied(summary: dict, warm: WarmupResult) -> None:
    if summary["applied"]:
        console.print(f"applied{' with --force' if summary['forced'] else ''}: {summary['moved_placements']} "
                      f"placements moved, {summary['warmups']} warm-ups for {summary['active_tenants']} active tenants "
                      f"({warm.loaded} loaded, {warm.already_warm} already warm, {len(warm.failed)} failed)")
    if summary["forced"]:
        console.print(f"[yellow]committed although {sum(warm.unreachable.values())} warm-ups could not reach their "
                      f"worker ({unreachable_text(warm.unreachable)}): their tenants load cold there, or fail over "
                      f"while it is down[/yellow]")
    for wu, why in warm.failed[:WARMUP_FAILURES_SHOWN]:
        console.print(f"  [yellow]warm-up failed[/yellow] {wu.tenant} {wu.version} on {wu.worker_id}: {escape(why)}")


def warm_with_progress(warmups, addresses, quiet: bool, credentials, timeout: float) -> WarmupResult:
    if quiet or not warmups:
        return run_warmups(warmups, addresses, timeout=timeout, credentials=credentials)
    columns = (TextColumn("warming"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("warm", total=len(warmups))
        return run_warmups(warmups, addresses, timeout=timeout, credentials=credentials,
                           on_progress=lambda r, total: progress.update(task, completed=r.done))


def commit(state: FleetState, change: FleetChange, after: list[Member], reason: str = "shards apply") -> None:
    """One transaction: every drain, undrain and size change, or none (Conflict if etcd moved on).

    It also fails when a worker meant to stay live was drained or left meanwhile: two drains
    planned side by side must not together take out workers each of them counted on."""
    client, keys = state.registry.client, state.registry.keys
    txn = client.transactions
    compare, success = [], []
    for member in after:
        if member.worker_id not in change.undrain:
            compare.append(txn.version(keys.drain(member.worker_id)) == 0)
        compare.append(txn.version(keys.worker(member.worker_id)) > 0)
    record = DrainRecord(since=utc_stamp("seconds"), actor=getpass.getuser(), reason=reason)
    for worker_id in change.drain:
        compare.append(txn.version(keys.drain(worker_id)) == 0)
        success.append(txn.put(keys.drain(worker_id), record.to_json()))
    for worker_id in change.undrain:
        compare.append(txn.version(keys.drain(worker_id)) > 0)
        success.append(txn.delete(keys.drain(worker_id)))
    for tenant, k in change.set_size:
        route, mod_revision = state.registry.route(tenant)
        compare.append(txn.mod(keys.route(tenant)) == mod_revision)
        new = route.with_changes(shard_size=k)  # the rollout, limits and digest stay
        success.append(txn.put(keys.route(tenant), new.to_json()))
    with etcd_errors(client, "applying the shard change"):
        ok, _ = client.transaction(compare=compare, success=success, failure=[])
    if not ok:
        raise Conflict("the fleet changed while applying (a drain, undrain, worker or route changed concurrently); "
                       "re-run plan and apply")


def drain(args: argparse.Namespace) -> int:
    return apply_change(args, FleetChange(drain=(validate_id("worker id", args.worker_id),)),
                        reason=args.reason or "workers drain")


def undrain(args: argparse.Namespace) -> int:
    worker_id = validate_id("worker id", args.worker_id)
    state = read_state(args)
    if worker_id not in state.workers:  # not running: no shard holds it, nothing to warm
        keys = state.registry.keys
        with etcd_errors(state.registry.client, f"undraining {worker_id}"):
            lifted = state.registry.client.delete(keys.drain(worker_id))
        if not lifted:
            raise NotFound(f"cannot undrain worker {worker_id!r}: no such worker, and no drain of it")
        _print(args, {"applied": True, "undrained_not_running": worker_id},
               f"{worker_id} is not running: its drain is lifted, and it takes traffic when it starts")
        return 0
    return apply_change(args, FleetChange(undrain=(worker_id,)), state)


def _print(args: argparse.Namespace, doc: dict, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(doc))
    else:
        console.print(text)


# -- report -------------------------------------------------------------------------------------
def report(args: argparse.Namespace) -> int:
    if args.simulate_workers:
        if args.tenants < 2 or args.simulate_workers < 1 or args.zones < 1:
            raise InvalidArgument("--simulate-workers >= 1, --tenants >= 2 and --zones >= 1 please")
        tenants, members = simulated_fleet(args.simulate_workers, args.tenants, args.zones)
        k = args.shard_size or config.SHARD_SIZE.default
        source = f"simulated: {args.simulate_workers} workers, {args.tenants} tenants, {args.zones} zones"
    else:
        state = read_state(args)
        tenants = state.tenants
        members = live_members(state.workers, state.drains)
        if len(tenants) < 2 or not members:
            raise FailedPrecondition(f"the live fleet has {len(tenants)} tenants and {len(members)} live workers: "
                                     "nothing to report (try --simulate-workers N --tenants T)")
        import numpy as np

        default_k = fleet_shard_size(state.registry.client, state.registry.keys, args.shard_size)
        k = np.array([state.sizes.get(t, default_k) for t in tenants])
        source = f"live fleet at {args.etcd}{args.prefix}"
    result = isolation_report(tenants, members, k)
    if args.json:
        print(json.dumps(result))
        return 0
    print_report(result, source)
    return 0


def print_report(result: dict, source: str) -> None:
    table = Table(title=f"shuffle-sharding isolation ({source})")
    for column in ("measure", "measured", "uniform random k-subsets"):
        table.add_column(column)
    for key in ("identical_shard_fraction", "tenants_per_worker_max_over_mean", "moved_fraction_add_one",
                "moved_placement_fraction_add_one"):
        if key in result:
            theory = result.get(f"{key}_theory")
            table.add_row(key, f"{result[key]:.6g}", "" if theory is None else f"{theory:.6g}")
    for j, (measured, theory) in enumerate(zip(result["overlap_distribution"], result["overlap_distribution_theory"])):
        table.add_row(f"pairs sharing {j} workers", f"{measured:.6g}", f"{theory:.6g}")
    console.print(table)
    if result.get("short_shards"):
        console.print(f"[yellow]{result['short_shard_tenants']} tenants ask for more workers than are live[/yellow]")
