"""The deployment files: Dockerfile, .dockerignore and the kustomize tree under deploy/k8s.

Offline: each kustomization is rendered by deploy/kustomize_lite.py (the subset of kustomize the
tree uses; its own behaviour is tested here too) and every document is validated against the
Kubernetes OpenAPI schemas shipped in the kubernetes-validate wheel, strictly (unknown fields are
errors). Then the properties the fleet depends on are checked on the rendered objects.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import sys
import tomllib
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from modelfleet import config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("self-contained", "external-etcd")
KUSTOMIZATIONS = ("base", *(f"overlays/{o}" for o in OVERLAYS))
# Validate against the newest schemas the wheel ships, and against an older release still in
# wide use, so that nothing here needs a brand-new cluster.
K8S_VERSIONS = (kubernetes_validate.latest_version(), "1.30.0")
# MODELFLEET_* variables that are documented (README "Configuration") but are no config.Option.
DOCUMENTED_EXTRA_ENV = {"MODELFLEET_HOME", "MODELFLEET_ETCD_BIN"}
# A worker's RSS with an empty cache (loadtest/bench_worker_memory: ~80 MB; boto3 and the s3
# client add some), and the allocator slack the same benchmark shows on a full cache (~19 %).
WORKER_BASELINE_BYTES = 256 << 20
ALLOCATOR_SLACK = 0.20
IMAGE_UID = 10001


def _load_renderer():
    spec = importlib.util.spec_from_file_location("kustomize_lite", REPO / "deploy" / "kustomize_lite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kustomize_lite", module)
    spec.loader.exec_module(module)
    return module


kl = _load_renderer()


@cache
def rendered(kustomization: str) -> tuple[dict, ...]:
    return tuple(kl.render(K8S / kustomization))


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def configmap(docs) -> dict[str, str]:
    return one(docs, "ConfigMap")["data"]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict, name: str | None = None) -> dict:
    containers = pod_spec(workload)["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def env_of(c: dict) -> dict[str, dict]:
    return {var["name"]: var for var in c.get("env", [])}


def setting(docs, c: dict, name: str) -> str:
    """The value a container sees for a MODELFLEET_* variable: its own env, else the ConfigMap."""
    var = env_of(c).get(name)
    if var is not None:
        assert "value" in var, f"{name} is not a literal"
        return var["value"]
    return configmap(docs)[name]


def matches(selector: dict, labels: dict) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are used here"
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def quantity_bytes(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, scale in units.items():
        if str(text).endswith(suffix):
            return int(float(str(text)[: -len(suffix)]) * scale)
    return int(text)


@cache
def command_envs() -> dict[str, frozenset[str]]:
    """For each `modelfleet` subcommand, the MODELFLEET_* variables its flags fall back to."""
    import argparse

    from modelfleet.cli.main import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: frozenset(env for action in sub._actions
                            for env in re.findall(r"\[env (MODELFLEET_\w+)\]", action.help or ""))
            for name, sub in subparsers.choices.items()}


def known_env_names() -> set[str]:
    return {opt.env for opt in config.ALL_OPTIONS} | DOCUMENTED_EXTRA_ENV


def modelfleet_workloads(docs) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
            and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") in ("router", "worker")]


# -- the renderer --------------------------------------------------------------------------------

@pytest.mark.parametrize("data, expected", [
    (None, "6ct58987ht"),
    ({"one": ""}, "9g67k2htb6"),
    ({"two": 2, "one": "", "three": 3}, "7757f9kkct"),
])
def test_configmap_hash_matches_kustomize(data, expected):
    # The vectors of TestConfigMapHash in kustomize's api/hasher/hasher_test.go.
    doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": ""}}
    if data is not None:
        doc["data"] = data
    assert kl.configmap_hash(doc) == expected


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_renderer_generator_merge_renames_references(tmp_path):
    _write(tmp_path / "base/kustomization.yaml",
           "resources: [deploy.yaml]\nconfigMapGenerator:\n- name: cfg\n  literals: [A=1, B=x=y]\n")
    _write(tmp_path / "base/deploy.yaml", """
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec:
  template:
    spec:
      containers:
      - name: c
        envFrom: [{configMapRef: {name: cfg}}]
        env: [{name: K, valueFrom: {configMapKeyRef: {name: cfg, key: A}}}]
      volumes: [{name: v, configMap: {name: cfg}}, {name: p, projected: {sources: [{configMap: {name: cfg}}]}}]
""")
    _write(tmp_path / "overlay/kustomization.yaml",
           "resources: [../base]\nconfigMapGenerator:\n- name: cfg\n  behavior: merge\n  literals: [A=2]\n")
    base, overlay = kl.render(tmp_path / "base"), kl.render(tmp_path / "overlay")
    base_cm, overlay_cm = one(base, "ConfigMap"), one(overlay, "ConfigMap")
    assert base_cm["data"] == {"A": "1", "B": "x=y"} and overlay_cm["data"] == {"A": "2", "B": "x=y"}
    assert base_cm["metadata"]["name"] != overlay_cm["metadata"]["name"]
    assert re.fullmatch(r"cfg-[0-9a-z]{10}", overlay_cm["metadata"]["name"])
    spec = pod_spec(one(overlay, "Deployment"))
    c = spec["containers"][0]
    names = {c["envFrom"][0]["configMapRef"]["name"], c["env"][0]["valueFrom"]["configMapKeyRef"]["name"],
             spec["volumes"][0]["configMap"]["name"], spec["volumes"][1]["projected"]["sources"][0]["configMap"]["name"]}
    assert names == {overlay_cm["metadata"]["name"]}


def test_strategic_merge_by_patch_merge_keys():
    base = {"spec": {"containers": [{"name": "a", "image": "x", "args": ["1", "2"],
                                     "env": [{"name": "E", "value": "1"}],
                                     "volumeMounts": [{"name": "v", "mountPath": "/v"}]},
                                    {"name": "b", "image": "y"}],
                     "drop": 1}}
    patch = {"spec": {"containers": [{"name": "a", "args": ["3"], "env": [{"name": "F", "value": "2"}],
                                      "volumeMounts": [{"name": "w", "mountPath": "/w"}]}],
                      "drop": None}}
    merged = kl.strategic_merge(base, patch)
    a, b = merged["spec"]["containers"]
    assert a["image"] == "x" and a["args"] == ["3"] and b == {"name": "b", "image": "y"}
    assert [e["name"] for e in a["env"]] == ["E", "F"]
    assert [m["mountPath"] for m in a["volumeMounts"]] == ["/v", "/w"]
    assert "drop" not in merged["spec"] and base["spec"]["drop"] == 1  # inputs untouched


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    with pytest.raises(kl.KustomizeError, match="not implemented"):
        kl.strategic_merge({"ports": [{"containerPort": 1}]}, {"ports": [{"containerPort": 2}]})
    with pytest.raises(kl.KustomizeError, match="not implemented"):
        kl.strategic_merge({"a": 1}, {"$patch": "delete"})
    _write(tmp_path / "k/kustomization.yaml", "resources: []\nnamePrefix: x-\n")
    with pytest.raises(kl.KustomizeError, match="namePrefix"):
        kl.render(tmp_path / "k")
    _write(tmp_path / "dup/kustomization.yaml", "resources: [a.yaml, a.yaml]\n")
    _write(tmp_path / "dup/a.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n")
    with pytest.raises(kl.KustomizeError, match="already registered"):
        kl.render(tmp_path / "dup")


# -- every rendered document is a valid Kubernetes object ------------------------------------------

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_documents_validate_against_kubernetes_schemas(kustomization, version):
    docs = rendered(kustomization)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{kustomization}: {doc['kind']}/{doc['metadata']['name']}: "
                                 f"{'.'.join(map(str, exc.path))}: {exc.message}") from None


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_references_resolve(kustomization):
    docs = rendered(kustomization)
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for w in workloads:
        spec = pod_spec(w)
        assert matches(w["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
        for c in spec["containers"]:
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
            volumes = {v["name"] for v in spec.get("volumes", [])}
            templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes | templates, f"{w['metadata']['name']}: volume {mount['name']}"
        for constraint in spec.get("topologySpreadConstraints", []):
            assert matches(constraint["labelSelector"], w["spec"]["template"]["metadata"]["labels"])
    # Every Service and PodDisruptionBudget selects exactly one workload's pods.
    for doc in docs:
        if doc["kind"] in ("Service", "PodDisruptionBudget"):
            selector = doc["spec"]["selector"]
            selector = selector if "matchLabels" in selector else {"matchLabels": selector}
            selected = [w for w in workloads if matches(selector, w["spec"]["template"]["metadata"]["labels"])]
            assert len(selected) == 1, f"{doc['kind']}/{doc['metadata']['name']} selects {len(selected)} workloads"
            if doc["kind"] == "Service":
                ports = {p["name"] for c in pod_spec(selected[0])["containers"] for p in c.get("ports", [])}
                for port in doc["spec"]["ports"]:
                    assert port["targetPort"] in ports


# -- routers and workers -----------------------------------------------------------------------------

@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_modelfleet_env_names_are_real_settings(kustomization):
    docs = rendered(kustomization)
    known, commands = known_env_names(), command_envs()
    for key, value in configmap(docs).items():
        assert key in known, f"ConfigMap key {key} is no modelfleet setting"
        assert any(key in envs for envs in commands.values()), f"{key}: no command reads it"
        option = next((o for o in config.ALL_OPTIONS if o.env == key), None)
        if option is not None:
            option.type(value)  # parses as the option does
    for workload in modelfleet_workloads(docs):
        c = container(workload)
        reads = commands[c["args"][0]]
        for name in env_of(c):
            if name.startswith("MODELFLEET_"):
                assert name in known, f"{workload['metadata']['name']}: {name} is no modelfleet setting"
                assert name in reads, f"{workload['metadata']['name']}: `modelfleet {c['args'][0]}` ignores {name}"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_router_and_worker_expose_metrics_where_prometheus_looks(kustomization):
    docs = rendered(kustomization)
    port = int(configmap(docs)["MODELFLEET_METRICS_PORT"])
    for workload in modelfleet_workloads(docs):
        pod = workload["spec"]["template"]
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == port
        ports = {p["name"]: p["containerPort"] for p in container(workload)["ports"]}
        assert ports["metrics"] == port and ports["grpc"] != port


def test_worker_statefulset():
    docs = rendered("base")
    worker = one(docs, "StatefulSet", "modelfleet-worker")
    spec, c = pod_spec(worker), container(worker, "worker")
    assert c["args"] == ["worker"]
    headless = one(docs, "Service", worker["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"

    port = int(setting(docs, c, "MODELFLEET_WORKER_PORT"))
    assert any(p["containerPort"] == port for p in c["ports"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port, probe  # grpc.health.v1, service ""
        assert "service" not in c[probe]["grpc"]

    env = env_of(c)
    assert env["MODELFLEET_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["MODELFLEET_ADVERTISE_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["MODELFLEET_ZONE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['topology.kubernetes.io/zone']"
    assert configmap(docs)["MODELFLEET_HOST"] == "0.0.0.0"

    # Memory: the model LRU budget plus the process baseline plus allocator slack fit the limit.
    cache_bytes = config.byte_size(setting(docs, c, "MODELFLEET_CACHE_BYTES"))
    limit = quantity_bytes(c["resources"]["limits"]["memory"])
    assert limit >= cache_bytes * (1 + ALLOCATOR_SLACK) + WORKER_BASELINE_BYTES
    assert quantity_bytes(c["resources"]["requests"]["memory"]) == limit  # not overcommitted

    # The artifact disk cache lives on a volume larger than its bound.
    cache_dir = setting(docs, c, "MODELFLEET_STORE_CACHE_DIR")
    mount = next(m for m in c["volumeMounts"] if cache_dir.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert quantity_bytes(volume["emptyDir"]["sizeLimit"]) > config.byte_size(
        setting(docs, c, "MODELFLEET_STORE_CACHE_BYTES"))

    # Draining: the server's 10 s grace for in-flight requests, leaving etcd, freeing models.
    assert spec["terminationGracePeriodSeconds"] >= 30
    # Spread over zones and nodes.
    keys = {t["topologyKey"] for t in spec["topologySpreadConstraints"]}
    assert {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys
    assert spec["affinity"]["podAntiAffinity"]


def test_missing_zone_label_falls_back_to_the_default_zone(monkeypatch):
    # Without PodTopologyLabels the downward-API zone is an empty string: modelfleet must read
    # that as unset, not as a zone named "".
    monkeypatch.setenv("MODELFLEET_ZONE", "")
    assert config.ZONE.resolve_default() == config.ZONE.default


def test_router_deployment_and_hpa():
    docs = rendered("base")
    router = one(docs, "Deployment", "modelfleet-router")
    spec, c = pod_spec(router), container(router, "router")
    assert c["args"] == ["router"]
    port = int(setting(docs, c, "MODELFLEET_ROUTER_PORT"))
    assert any(p["containerPort"] == port for p in c["ports"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port
    assert env_of(c)["MODELFLEET_ROUTER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    service = one(docs, "Service", "modelfleet-router")
    assert service["spec"]["ports"][0]["port"] == port
    assert configmap(docs)["MODELFLEET_ROUTER"] == f"modelfleet-router:{port}"
    # preStop + the server's 10 s grace fit in the grace period.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) + 10 < spec["terminationGracePeriodSeconds"]

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "modelfleet-router"}
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in c["resources"]["requests"]  # utilisation is relative to the request
    assert "replicas" not in router["spec"]  # the HPA owns it


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_disruption_budgets(kustomization):
    docs = rendered(kustomization)
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for workload in [*modelfleet_workloads(docs),
                     *[d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "etcd"]]:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        budget = [p for p in pdbs if matches(p["spec"]["selector"], labels)]
        assert len(budget) == 1, f"{workload['metadata']['name']} needs one PodDisruptionBudget"
        assert budget[0]["spec"].get("maxUnavailable") == 1


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pods_run_as_the_image_user_on_a_read_only_root(kustomization):
    docs = rendered(kustomization)
    for workload in modelfleet_workloads(docs):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == IMAGE_UID
        assert spec["automountServiceAccountToken"] is False
        # Service links would define MODELFLEET_ROUTER_PORT=tcp://... (Service modelfleet-router).
        assert spec["enableServiceLinks"] is False
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}
            assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]


# -- the overlays ------------------------------------------------------------------------------------

def etcd_endpoints_of(docs) -> list[tuple[str, int]]:
    return config.etcd_endpoints(configmap(docs)["MODELFLEET_ETCD"])


def test_self_contained_runs_a_three_member_etcd():
    docs = rendered("overlays/self-contained")
    etcd = one(docs, "StatefulSet", "etcd")
    assert etcd["spec"]["replicas"] == 3
    assert etcd["spec"]["podManagementPolicy"] == "Parallel"
    service = one(docs, "Service", etcd["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert etcd["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in {
        m["name"] for m in container(etcd)["volumeMounts"]}

    c = container(etcd, "etcd")
    image, _, tag = c["image"].rpartition(":")
    assert image in ("quay.io/coreos/etcd", "registry.k8s.io/etcd") and tag not in ("", "latest")
    assert re.fullmatch(r"v?3\.5\.\d+(-\d+)?", tag)
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"])
    env = {v["name"]: v["valueFrom"]["fieldRef"]["fieldPath"] for v in c["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    members = [f"{etcd['metadata']['name']}-{i}" for i in range(3)]
    svc = service["metadata"]["name"]
    assert args["name"] == "$(POD_NAME)"
    assert args["initial-cluster"] == ",".join(
        f"{m}=http://{m}.{svc}.$(POD_NAMESPACE).svc:2380" for m in members)
    assert args["initial-advertise-peer-urls"] == f"http://$(POD_NAME).{svc}.$(POD_NAMESPACE).svc:2380"
    assert args["data-dir"].startswith(c["volumeMounts"][0]["mountPath"])

    # The fleet's ConfigMap lists every member, by its stable DNS name, at the client port.
    assert sorted(etcd_endpoints_of(docs)) == [(f"{m}.{svc}", 2379) for m in members]
    client_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "client")
    assert client_port == 2379


def test_external_etcd_points_elsewhere_over_tls():
    base, docs = rendered("base"), rendered("overlays/external-etcd")
    assert configmap(docs)["MODELFLEET_ETCD"] != configmap(base)["MODELFLEET_ETCD"]
    hosts = [host for host, _ in etcd_endpoints_of(docs)]
    assert len(hosts) >= 3 and not any(h.startswith("etcd-") and h.count(".") == 1 for h in hosts)
    assert not [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "etcd"]
    assert {k: v for k, v in configmap(docs).items() if k != "MODELFLEET_ETCD"} == \
        {k: v for k, v in configmap(base).items() if k != "MODELFLEET_ETCD"}
    for workload in modelfleet_workloads(docs):
        spec, c = pod_spec(workload), container(workload)
        volume = next(v for v in spec["volumes"] if v["name"] == "etcd-tls")
        mount = next(m for m in c["volumeMounts"] if m["name"] == "etcd-tls")
        assert volume["secret"]["secretName"] == "modelfleet-etcd-tls" and mount["readOnly"] is True
        env = env_of(c)
        for name, key in (("MODELFLEET_ETCD_CA", "ca.crt"), ("MODELFLEET_ETCD_CERT", "tls.crt"),
                          ("MODELFLEET_ETCD_KEY", "tls.key")):
            assert env[name]["value"] == f"{mount['mountPath']}/{key}"
        # The base's settings survive the patch.
        assert "MODELFLEET_ADVERTISE_HOST" in env and c["envFrom"]


def test_base_alone_names_no_real_etcd():
    # The base is not meant to be applied: its placeholder endpoint fails fast and visibly.
    host, _ = etcd_endpoints_of(rendered("base"))[0]
    assert host.endswith(".invalid")


# -- the image ---------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in (raw.strip() for raw in logical.splitlines()) if line]


def test_dockerfile_installs_runtime_dependencies_only_and_runs_as_non_root():
    instructions = dockerfile_instructions()
    bases = [args.split()[0] for op, args in instructions if op == "FROM"]
    assert bases and all(b == "python:3.11-slim" for b in bases)
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert not [args for op, args in instructions if "[dev" in args or ".[" in args]
    installs = [cmd for cmd in runs.split("&&") if "pip install" in cmd]
    assert installs and all(shlex.split(cmd)[-1] == "." for cmd in installs), installs
    assert "libgomp1" in runs  # LightGBM's OpenMP runtime
    assert "libjemalloc2" in runs  # the malloc routers and workers run on (modelfleet.allocator)
    build_stage = instructions[:max(i for i, (op, _) in enumerate(instructions) if op == "FROM")]
    assert "gcc" in " ".join(args for op, args in build_stage if op == "RUN")  # worker/_row_predict.c

    final_stage = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    users = [args for op, args in final_stage if op == "USER"]
    assert users and users[-1].split(":")[0] == str(IMAGE_UID)
    assert f"--uid {IMAGE_UID}" in runs
    assert dict(final_stage)["ENTRYPOINT"] == '["modelfleet"]'
    exposed = {int(p.split("/")[0]) for op, args in final_stage if op == "EXPOSE" for p in args.split()}
    docs = rendered("base")
    assert {int(configmap(docs)["MODELFLEET_ROUTER_PORT"]), int(configmap(docs)["MODELFLEET_WORKER_PORT"])} <= exposed
    env_line = " ".join(args for op, args in final_stage if op == "ENV")
    for name in re.findall(r"\b(MODELFLEET_\w+)=", env_line):
        assert name in known_env_names()
    assert "MODELFLEET_WORKER_PORT=50061" in env_line and "MODELFLEET_HOST=0.0.0.0" in env_line


def test_dockerfile_copies_every_package_and_dockerignore_keeps_them():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = set()
    for op, args in dockerfile_instructions():
        if op == "COPY" and not args.startswith("--from"):
            copied.update(p.rstrip("/") for p in args.split()[:-1])
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    top_level = {p.rstrip("*") for p in patterns}
    assert top_level <= copied, f"not copied: {top_level - copied}"
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert {".venv", ".git"} <= set(ignored)
    for path in copied:
        assert path not in ignored, f".dockerignore drops {path}, which the Dockerfile copies"
    # The runtime dependencies come from pyproject alone: nothing from the dev extra is needed.
    assert "dev" in pyproject["project"]["optional-dependencies"]
