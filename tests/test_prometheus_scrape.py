"""A real Prometheus server (Debian's `prometheus` package, which `.ci/run` installs) scrapes a
running fleet on loopback; its query API must return the router's and the worker's series with
the values the traffic implies. Where no Prometheus binary exists the test is skipped, and
tests/test_metrics.py still parses the exposition itself.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from modelfleet import processes
from modelfleet.demo_models import sample_features
from tests.fleet import predict, predictor

PROMETHEUS = shutil.which("prometheus")


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        doc = json.loads(urllib.request.urlopen(url, timeout=5).read())
    except OSError:
        return []  # not up yet
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def by_job(results: list[dict]) -> dict[str, float]:
    return {r["metric"]["job"]: float(r["value"][1]) for r in results}


@pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (Debian package 'prometheus'; .ci/run "
                                               "installs it); test_metrics.py parses the exposition instead")
def test_a_real_prometheus_scrapes_router_and_worker(fleet, tmp_path: Path):
    fleet.register("a", "v1", seed=1)
    worker_port, router_port, prom_port = (processes.free_port() for _ in range(3))
    fleet.start_worker("w1", extra=("--metrics-port", str(worker_port)))
    router = fleet.start_router(shard_size=1, extra=("--metrics-port", str(router_port)))
    stub = predictor(router.address)
    x = sample_features(1, 1)[0]
    for _ in range(7):
        predict(stub, "a", x)

    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {"job_name": "modelfleet-router", "static_configs": [{"targets": [f"127.0.0.1:{router_port}"]}]},
            {"job_name": "modelfleet-worker", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]},
        ]}))
    log = open(tmp_path / "prometheus.log", "wb")
    server = processes.spawn([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                              f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        up = fleet.wait_for(lambda: (lambda j: j if j == {"modelfleet-router": 1.0, "modelfleet-worker": 1.0}
                                     else None)(by_job(query(prom_port, "up"))),
                            timeout=30, what="prometheus to scrape both targets")
        assert up
        requests = fleet.wait_for(lambda: by_job(query(
            prom_port, 'sum by (job) (modelfleet_rpc_requests_total{method="Predict",code="OK"})')) or None,
            timeout=10, what="request counts in prometheus")
        assert requests == {"modelfleet-router": 7.0, "modelfleet-worker": 7.0}
        loads = by_job(query(prom_port, 'modelfleet_worker_cache_events_total{kind="load"}'))
        assert loads == {"modelfleet-worker": 1.0}
        tenants = query(prom_port, "modelfleet_tenant_requests_total")
        assert sorted((t["metric"]["job"], t["metric"]["tenant"], float(t["value"][1])) for t in tenants) == \
            [("modelfleet-router", "a", 7.0), ("modelfleet-worker", "a", 7.0)]
        # A histogram Prometheus can take quantiles of: the router's Predict latency.
        p99 = query(prom_port, 'histogram_quantile(0.99, sum by (le) '
                               '(modelfleet_rpc_seconds_bucket{job="modelfleet-router",method="Predict"}))')
        assert len(p99) == 1 and 0 < float(p99[0]["value"][1]) < 10
    finally:
        processes.stop(server)
        log.close()
