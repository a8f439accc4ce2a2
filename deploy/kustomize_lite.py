"""An offline renderer for the small kustomize subset that deploy/k8s uses.

    python deploy/kustomize_lite.py deploy/k8s/overlays/self-contained    # prints the manifests

Real clusters use `kubectl apply -k DIR` (kubectl's built-in kustomize); this module exists so
the test suite can render and validate every overlay without a kustomize binary or network.
It implements exactly what the kustomizations here use, the way kustomize v5 does it, and
refuses everything else (an unknown kustomization field, a patch with a target, a list field
whose strategic-merge rule it does not know) instead of silently rendering something different:

- `resources`: YAML files (multi-document) and directories holding a kustomization;
- `configMapGenerator`: `name`, `literals`, `behavior` (create, merge, replace); the name gets
  kustomize's content-hash suffix (same hash function as kustomize's api/hasher), and references
  to it from pod templates (envFrom, env valueFrom, volumes, projected volumes) are rewritten;
- `patches` with a `path` to a strategic-merge patch (the patch names its own apiVersion, kind and
  metadata.name): maps merge, `key: null` deletes, lists merge by their Kubernetes patch merge key
  for the fields in MERGE_KEYS, replace for the fields in REPLACED_LISTS, and fail otherwise.
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator", "patches"}
GENERATOR_KEYS = {"name", "literals", "behavior"}
PATCH_KEYS = {"path"}

# Strategic merge: list fields merged element-wise by their Kubernetes patchMergeKey ...
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}
# ... and list fields that have no merge key, which a patch replaces whole.
REPLACED_LISTS = {"args", "command"}


class KustomizeError(Exception):
    """The kustomization uses something this renderer does not implement, or is invalid."""


@dataclass
class Resource:
    doc: dict[str, Any]
    generated: bool = False  # a configMapGenerator output: gets the hash suffix at the end

    @property
    def id(self) -> tuple[str, str, str, str]:
        meta = self.doc.get("metadata") or {}
        return (self.doc.get("apiVersion", ""), self.doc.get("kind", ""), meta.get("namespace", ""),
                meta.get("name", ""))


@dataclass
class _Build:
    resources: list[Resource] = field(default_factory=list)

    def find(self, api_version: str, kind: str, name: str) -> Resource | None:
        matches = [r for r in self.resources if r.id[0] == api_version and r.id[1] == kind and r.id[3] == name]
        if len(matches) > 1:
            raise KustomizeError(f"{kind}/{name} is ambiguous")
        return matches[0] if matches else None

    def add(self, resource: Resource, origin: Path) -> None:
        if any(r.id == resource.id for r in self.resources):
            raise KustomizeError(f"{origin}: may not add resource with an already registered id {resource.id}")
        self.resources.append(resource)


def render(directory: str | Path) -> list[dict[str, Any]]:
    """The manifests `kustomize build DIRECTORY` prints, as dicts (in resource order)."""
    build = _build(Path(directory))
    renames: dict[str, str] = {}
    for resource in build.resources:
        if resource.generated:
            old = resource.doc["metadata"]["name"]
            new = f"{old}-{configmap_hash(resource.doc)}"
            resource.doc["metadata"]["name"] = new
            renames[old] = new
    docs = [r.doc for r in build.resources]
    for doc in docs:
        for pod_spec in pod_specs(doc):
            _rename_configmap_refs(pod_spec, renames)
    return docs


def _build(directory: Path) -> _Build:
    kustomization = _read_kustomization(directory)
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    if unknown:
        raise KustomizeError(f"{directory}: kustomization fields not implemented here: {sorted(unknown)}")
    build = _Build()
    for entry in kustomization.get("resources") or []:
        path = (directory / entry).resolve()
        if path.is_dir():
            for resource in _build(path).resources:
                build.add(resource, path)
        elif path.is_file():
            for doc in yaml.safe_load_all(path.read_text()):
                if doc is not None:
                    build.add(Resource(doc), path)
        else:
            raise KustomizeError(f"{directory}: resource {entry!r} not found")
    for generator in kustomization.get("configMapGenerator") or []:
        _generate_configmap(build, generator, directory)
    for patch in kustomization.get("patches") or []:
        _apply_patch_file(build, patch, directory)
    return build


def _read_kustomization(directory: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            data = yaml.safe_load(path.read_text()) or {}
            if data.get("kind", "Kustomization") != "Kustomization":
                raise KustomizeError(f"{path}: kind must be Kustomization")
            return data
    raise KustomizeError(f"{directory}: no kustomization file")


def _generate_configmap(build: _Build, generator: dict[str, Any], directory: Path) -> None:
    unknown = set(generator) - GENERATOR_KEYS
    if unknown:
        raise KustomizeError(f"{directory}: configMapGenerator fields not implemented here: {sorted(unknown)}")
    name = generator["name"]
    data: dict[str, str] = {}
    for literal in generator.get("literals") or []:
        key, sep, value = str(literal).partition("=")
        if not sep or not key:
            raise KustomizeError(f"{directory}: literal {literal!r} is not KEY=VALUE")
        data[key] = value
    behavior = generator.get("behavior", "create")
    existing = build.find("v1", "ConfigMap", name)
    if behavior == "create":
        if existing is not None:
            raise KustomizeError(f"{directory}: ConfigMap {name} already exists (use behavior: merge or replace)")
        build.add(Resource({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data},
                           generated=True), directory)
    elif behavior in ("merge", "replace"):
        if existing is None:
            raise KustomizeError(f"{directory}: ConfigMap {name} to {behavior} does not exist")
        existing.doc["data"] = {**(existing.doc.get("data") or {}), **data} if behavior == "merge" else data
    else:
        raise KustomizeError(f"{directory}: unknown generator behavior {behavior!r}")


def _apply_patch_file(build: _Build, patch: dict[str, Any], directory: Path) -> None:
    unknown = set(patch) - PATCH_KEYS
    if unknown:
        raise KustomizeError(f"{directory}: patch fields not implemented here: {sorted(unknown)}")
    path = directory / patch["path"]
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise KustomizeError(f"{path}: only strategic-merge patches (a YAML map) are implemented")
        api_version, kind, name = doc.get("apiVersion"), doc.get("kind"), (doc.get("metadata") or {}).get("name")
        target = build.find(api_version, kind, name)
        if target is None:
            raise KustomizeError(f"{path}: patch target {api_version} {kind}/{name} not found")
        target.doc = strategic_merge(target.doc, doc)


def strategic_merge(base: Any, patch: Any, field_name: str = "") -> Any:
    """The strategic-merge of patch into base (a new object; neither argument is changed)."""
    if isinstance(patch, dict):
        if any(str(k).startswith("$") for k in patch):
            raise KustomizeError(f"patch directives ($patch, $setElementOrder, ...) not implemented: {field_name}")
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = strategic_merge(None, value, key)
        return merged
    if isinstance(patch, list):
        if field_name in MERGE_KEYS:
            return _merge_list(base if isinstance(base, list) else [], patch, MERGE_KEYS[field_name], field_name)
        if field_name in REPLACED_LISTS:
            return copy.deepcopy(patch)
        raise KustomizeError(f"strategic merge of list field {field_name!r} is not implemented here")
    return copy.deepcopy(patch)


def _merge_list(base: list, patch: list, key: str, field_name: str) -> list:
    merged = copy.deepcopy(base)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            raise KustomizeError(f"every {field_name} element of a patch needs its merge key {key!r}")
        for i, existing in enumerate(merged):
            if isinstance(existing, dict) and existing.get(key) == item[key]:
                merged[i] = strategic_merge(existing, item, field_name)
                break
        else:
            merged.append(strategic_merge(None, item, field_name))
    return merged


def configmap_hash(doc: dict[str, Any]) -> str:
    """kustomize's name suffix for a ConfigMap (api/hasher: sha256 of an encoding of kind, name,
    data and, when present, binaryData; first 10 hex digits with 0,1,3,a,e re-lettered)."""
    meta = doc.get("metadata") or {}
    encoded: dict[str, Any] = {"kind": "ConfigMap", "name": meta.get("name", ""),
                               "data": doc["data"] if isinstance(doc.get("data"), dict) else ""}
    if isinstance(doc.get("binaryData"), dict):
        encoded["binaryData"] = doc["binaryData"]
    return _encode(hashlib.sha256(_go_json(encoded).encode()).hexdigest())


def _go_json(value: Any) -> str:
    """json.Marshal of Go: sorted keys, no spaces, HTML-safe escapes, UTF-8 kept."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def _encode(hex_digest: str) -> str:
    return hex_digest[:10].translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs inside a workload document (none for other kinds)."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "Pod":
        return [spec]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [spec.get("template", {}).get("spec", {})]
    if kind == "CronJob":
        return [spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})]
    return []


def _rename_configmap_refs(pod_spec: dict[str, Any], renames: dict[str, str]) -> None:
    def rename(ref: dict[str, Any] | None) -> None:
        if ref and ref.get("name") in renames:
            ref["name"] = renames[ref["name"]]

    for container in [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]:
        for source in container.get("envFrom", []):
            rename(source.get("configMapRef"))
        for var in container.get("env", []):
            rename((var.get("valueFrom") or {}).get("configMapKeyRef"))
    for volume in pod_spec.get("volumes", []):
        rename(volume.get("configMap"))
        for source in (volume.get("projected") or {}).get("sources", []):
            rename(source.get("configMap"))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python deploy/kustomize_lite.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    try:
        docs = render(argv[0])
    except KustomizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
