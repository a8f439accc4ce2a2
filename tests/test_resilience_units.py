"""The resilience parts on their own, with a fake clock: ejection, hedging, quotas, failure caching."""
from __future__ import annotations

import asyncio
import functools
import threading

import pytest
from hypothesis import given, settings, strategies as st

from modelfleet.demo_models import train_model_text
from modelfleet.errors import FailedPrecondition, ModelfleetError, NotFound, ResourceExhausted, Unavailable
from router.counters import RouterCounters
from router.ejection import PROBE_TIMEOUT_S, OutlierEjector
from router.hedging import AUTO_MAX_S, AUTO_MIN_S, MIN_SAMPLES, RECOMPUTE_EVERY, HedgePolicy
from router.quotas import TenantQuotas
from router.settings import ResilienceSettings
from version_service.schema import RouteRecord
from worker.model_cache import Fetch, ModelCache
from worker.negative_cache import NegativeCache
from worker.overload import RetryLater
from worker.predictor import LoadedModel


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- ejection ---------------------------------------------------------------------------------

def test_three_failures_eject_to_the_end_then_a_probe_goes_first_and_success_restores():
    clock, counters = Clock(), RouterCounters()
    ej = OutlierEjector(3, 1.0, 30.0, counters, clock)
    members = ["a", "b", "c"]
    for _ in range(2):
        ej.failure("a", "UNAVAILABLE")
    assert ej.order(members) == members and not ej.active
    ej.failure("a", "UNAVAILABLE")
    assert ej.active and counters.ejections == 1
    assert ej.order(members) == ["b", "c", "a"]  # moved to the end, not removed
    clock.now += 1.0
    assert ej.order(members) == ["a", "b", "c"]  # the probe keeps its place
    assert ej.order(members) == ["b", "c", "a"]  # one probe at a time
    assert counters.probes == 1
    ej.success("a")
    assert not ej.active and ej.order(members) == members and counters.restored == 1


def test_failed_probes_double_the_backoff_up_to_the_cap():
    clock = Clock()
    ej = OutlierEjector(1, 1.0, 4.0, RouterCounters(), clock)
    ej.failure("a", "x")
    backoffs = []
    for _ in range(5):
        start = clock.now
        while ej.order(["a", "b"])[0] != "a":
            clock.now += 0.25
        backoffs.append(clock.now - start)
        ej.failure("a", "attempt timeout")  # the probe failed
    assert backoffs == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_every_member_ejected_is_still_tried():
    ej = OutlierEjector(1, 10.0, 30.0, RouterCounters(), Clock())
    ej.failure("a", "x")
    ej.failure("b", "x")
    assert sorted(ej.order(["a", "b"])) == ["a", "b"]


def test_an_abandoned_or_lost_probe_frees_the_slot():
    clock = Clock()
    ej = OutlierEjector(1, 1.0, 30.0, RouterCounters(), clock)
    ej.failure("a", "x")
    clock.now += 1.0
    assert ej.order(["a", "b"])[0] == "a"
    assert ej.order(["a", "b"])[0] == "b"
    ej.abandoned("a")  # cancelled because b answered first
    assert ej.order(["a", "b"])[0] == "a"
    clock.now += PROBE_TIMEOUT_S  # never heard of again
    assert ej.order(["a", "b"])[0] == "a"


def test_failures_while_ejected_do_not_extend_and_forget_drops_state():
    clock = Clock()
    ej = OutlierEjector(1, 1.0, 30.0, RouterCounters(), clock)
    ej.failure("a", "x")
    for _ in range(10):  # late failures of requests sent before the ejection
        ej.failure("a", "x")
    clock.now += 1.0
    assert ej.order(["a", "b"])[0] == "a"
    ej.forget("a")
    assert not ej.active and ej.ejected() == []


def test_zero_threshold_never_ejects():
    ej = OutlierEjector(0, 1.0, 30.0, RouterCounters(), Clock())
    for _ in range(100):
        ej.failure("a", "x")
    assert not ej.active


# -- hedging ----------------------------------------------------------------------------------

def test_hedging_off_fixed_and_auto():
    assert HedgePolicy(0.0).delay() is None and not HedgePolicy(0).enabled
    assert HedgePolicy(25.0).delay() == pytest.approx(0.025)
    auto = HedgePolicy("auto")
    assert auto.delay() == AUTO_MAX_S  # nothing learned yet
    for i in range(max(MIN_SAMPLES, RECOMPUTE_EVERY)):
        auto.observe(0.010 if i % 20 else 0.5)  # 5 % slow
    assert 0.010 <= auto.delay() <= 0.5
    fast = HedgePolicy("auto")
    for _ in range(RECOMPUTE_EVERY):
        fast.observe(0.0001)
    assert fast.delay() == AUTO_MIN_S  # bounded below


def test_hedges_are_budgeted_to_about_a_tenth_of_requests():
    policy = HedgePolicy(1.0)
    sent = 0
    for _ in range(10_000):
        policy.delay()
        sent += policy.take()
    assert sent <= 0.1 * 10_000 + 21


# -- quotas -----------------------------------------------------------------------------------

ROUTE = RouteRecord(serving="v1", newest="v1")


def test_token_bucket_admits_burst_then_rate_with_a_retry_hint():
    clock, counters = Clock(), RouterCounters()
    q = TenantQuotas(rate=10.0, burst=5.0, max_inflight=0, counters=counters, clock=clock)
    for _ in range(5):
        q.admit("t", ROUTE)
        q.release("t")
    with pytest.raises(RetryLater) as info:
        q.admit("t", ROUTE)
    assert info.value.retry_after_ms == 100 and "rate limit" in str(info.value) and "'t'" in str(info.value)
    assert isinstance(info.value, ResourceExhausted) and counters.shed_rate == 1
    clock.now += 0.1
    q.admit("t", ROUTE)
    q.release("t")
    q.admit("other", ROUTE)  # tenants do not share a bucket


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(1, 1000), burst=st.floats(1, 100),
       gaps=st.lists(st.floats(0, 0.05), min_size=1, max_size=300))
def test_admitted_never_exceeds_burst_plus_rate_times_elapsed(rate, burst, gaps):
    clock = Clock()
    q = TenantQuotas(rate=rate, burst=burst, max_inflight=0, clock=clock)
    start, admitted = clock.now, 0
    for gap in gaps:
        clock.now += gap
        try:
            q.admit("t", ROUTE)
            q.release("t")
            admitted += 1
        except RetryLater:
            pass
    assert admitted <= burst + rate * (clock.now - start) + 1e-6


def test_inflight_cap_and_route_overrides():
    q = TenantQuotas(rate=0, burst=0, max_inflight=2, clock=Clock())
    q.admit("t", ROUTE)
    q.admit("t", ROUTE)
    with pytest.raises(RetryLater, match="2 requests in flight"):
        q.admit("t", ROUTE)
    q.release("t")
    q.admit("t", ROUTE)
    own = ROUTE.with_changes(rate_limit=1.0, max_inflight=5)
    assert q.limits(own) == (1.0, 1.0, 5)  # burst defaults to one second of the tenant's rate
    assert q.limits(ROUTE.with_changes(burst=7.0)) == (0, 7.0, 2)
    q.release("t"), q.release("t")
    assert q.inflight == {}


def test_full_buckets_are_swept_when_the_map_grows():
    clock = Clock()
    q = TenantQuotas(rate=100.0, burst=10.0, max_inflight=0, clock=clock)
    for i in range(25_000):
        q.admit(f"t{i}", ROUTE)
        q.release(f"t{i}")
        clock.now += 0.001
    assert len(q._buckets) < 25_000


def test_route_record_round_trips_limits_and_stays_short_without_them():
    route = ROUTE.with_changes(rate_limit=50.0, burst=10.0, max_inflight=4)
    assert RouteRecord.from_json(route.to_json()) == route
    assert "rate_limit" not in ROUTE.to_json()


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("MODELFLEET_HEDGE_AFTER_MS", "auto")
    monkeypatch.setenv("MODELFLEET_TENANT_RATE_LIMIT", "5")
    s = ResilienceSettings.from_args(None)
    assert s.hedge_after_ms == "auto" and s.tenant_rate_limit == 5.0 and s.eject_after_failures == 3

    class Args:
        hedge_after_ms = 12.0

    assert ResilienceSettings.from_args(Args()).hedge_after_ms == 12.0  # a flag beats the variable


# -- failure caching --------------------------------------------------------------------------

def test_negative_cache_backoff_policy():
    clock = Clock()
    nc = NegativeCache(1.0, 60.0, clock)
    key = ("acme", "v1")
    nc.check(key)
    backoffs = [nc.record(key, FailedPrecondition("tenant 'acme' version 'v1': artifact is corrupt"))
                for _ in range(8)]
    assert backoffs == [1, 2, 4, 8, 16, 32, 60, 60]
    with pytest.raises(FailedPrecondition, match="acme.*v1.*corrupt.*remembered"):
        nc.check(key)
    clock.now += 61
    nc.check(key)  # expired: the next request loads again
    nc.forget(key)
    assert nc.record(key, FailedPrecondition("x")) == 1.0  # success reset the back-off
    assert nc.record(("a", "v9"), NotFound("tenant 'a' has no version 'v9'")) == 1.0
    assert nc.record(("a", "v9"), NotFound("again")) == 1.0  # never escalates
    for _ in range(5):
        assert nc.record(("b", "v1"), Unavailable("etcd down")) <= 1.0
    with pytest.raises(Unavailable, match="'b'.*'v1'.*etcd down"):
        nc.check(("b", "v1"))  # named even when the cause did not name them


def test_negative_cache_repeats_a_bug_as_internal_without_a_traceback():
    nc = NegativeCache(clock=Clock())
    nc.record(("t", "v"), ValueError("boom"))
    with pytest.raises(ModelfleetError) as info:
        nc.check(("t", "v"))
    assert type(info.value) is ModelfleetError and "ValueError: boom" in str(info.value)


def test_model_cache_loads_a_failing_model_once_per_backoff_and_bounds_waiters():
    calls = []

    def loader(tenant, version):
        calls.append((tenant, version))
        raise FailedPrecondition(f"tenant {tenant!r} version {version!r}: artifact is corrupt")

    async def scenario():
        cache = ModelCache(loader, 1 << 20, load_threads=1, max_queued_loads=4)
        results = await asyncio.gather(*(cache.get("acme", "v1") for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, FailedPrecondition) for r in results)
        for _ in range(50):
            with pytest.raises(FailedPrecondition, match="corrupt"):
                await cache.get("acme", "v1")
        assert calls == [("acme", "v1")] and cache.counters.load_failures == 1 and cache.failures.hits == 50
        cache.close()

        gate = asyncio.Event()

        def slow(tenant, version):
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result()  # hold the load thread
            raise NotFound("no")

        loop = asyncio.get_running_loop()
        cache = ModelCache(slow, 1 << 20, load_threads=1, max_queued_loads=4)
        waiting = [asyncio.ensure_future(cache.get(f"t{i}", "v1")) for i in range(4)]
        await asyncio.sleep(0)
        assert cache.waiting == 4
        with pytest.raises(RetryLater) as info:
            await cache.get("t9", "v1")
        assert info.value.retry_after_ms >= 10 and cache.counters.shed == 1
        gate.set()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert cache.waiting == 0
        cache.close()

    asyncio.run(scenario())


def test_downloads_wait_on_fetch_threads_of_their_own_and_a_local_load_passes_them():
    """A loader's Fetch downloads on the fetch threads, at most fetch_threads at once (each holds
    its slot until its bytes are parsed); the load thread stays free for a model already on disk."""
    text = train_model_text(1).encode()
    gate, started = threading.Event(), threading.Semaphore(0)
    fetching, most = [0], [0]
    lock = threading.Lock()

    def fetch() -> bytes:
        with lock:
            fetching[0] += 1
            most[0] = max(most[0], fetching[0])
        started.release()
        gate.wait(10)  # a hung store
        with lock:
            fetching[0] -= 1
        return text

    def loader(tenant, version):
        if tenant == "local":
            return LoadedModel.from_model_text(text)
        return Fetch(fetch, LoadedModel.from_model_text, f"artifact-of-{tenant}")

    async def scenario():
        loop = asyncio.get_running_loop()
        cache = ModelCache(loader, 64 << 20, load_threads=1, fetch_threads=2)
        try:
            remote = [asyncio.ensure_future(cache.get(f"remote-{i}", "v1")) for i in range(4)]
            for _ in range(2):
                assert await loop.run_in_executor(None, started.acquire, True, 5)
            model, loaded = await asyncio.wait_for(cache.get("local", "v1"), 2)
            assert loaded and model.num_features == 8 and not any(f.done() for f in remote)
            gate.set()
            assert all(loaded for _, loaded in await asyncio.wait_for(asyncio.gather(*remote), 10))
            assert most[0] == 2 and cache.counters.loads == 5
        finally:
            gate.set()  # a failed check must not leave fetch threads waiting 10 s
            cache.close()

    asyncio.run(scenario())


def test_loads_of_one_artifact_share_one_fetch_and_leave_the_other_fetch_threads_free():
    """Tenants often share an artifact (fleets from templates). Each of their cold loads took a fetch
    thread to wait on the one download: six of them held both fetch threads of this cache while the
    store hung on that artifact, and another artifact's download waited behind them. Now one fetch
    per artifact runs at once; the others wait for its bytes without a thread."""
    text = train_model_text(1).encode()
    hung, calls = threading.Event(), {"shared": 0, "other": 0}
    lock = threading.Lock()

    def fetch(artifact: str) -> bytes:
        with lock:
            calls[artifact] += 1
        if artifact == "shared":
            hung.wait(10)  # the store hangs on this one
        return text

    def loader(tenant, version):
        artifact = "other" if tenant == "alone" else "shared"
        return Fetch(functools.partial(fetch, artifact), LoadedModel.from_model_text, artifact)

    async def scenario():
        cache = ModelCache(loader, 64 << 20, load_threads=1, fetch_threads=2)
        try:
            sharing = [asyncio.ensure_future(cache.get(f"template-{i}", "v1")) for i in range(6)]
            deadline = asyncio.get_running_loop().time() + 5
            while calls["shared"] == 0:  # the six loads are under way (queued ahead of the next) first
                assert asyncio.get_running_loop().time() < deadline, "the shared fetch never started"
                await asyncio.sleep(0.005)
            model, loaded = await asyncio.wait_for(cache.get("alone", "v1"), 5)
            assert loaded and model.num_features == 8 and not any(f.done() for f in sharing)
            hung.set()
            assert all(loaded for _, loaded in await asyncio.wait_for(asyncio.gather(*sharing), 10))
            assert calls == {"shared": 1, "other": 1} and cache.counters.loads == 7
        finally:
            hung.set()
            cache.close()

    asyncio.run(scenario())
