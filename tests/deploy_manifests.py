"""The Kubernetes manifests in deploy/, loaded and validated without a cluster: shared by
tests/unit/test_deploy.py (schemas, agreement with the code) and tests/unit/test_deploy_operations.py (what a
first deployment needs: images, storage, placement, retries, shared memory, operations).

RayCluster/RayJob are validated against KubeRay v1.5.1's released CRDs (tests/data/kuberay-crds/), made strict
the way `kubectl apply` (field validation Strict) treats them, plus the checks the operator makes on a spec
(kuberay_errors()).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jsonschema
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
README = DEPLOY / "README.md"
GPU_CONFIG = ROOT / "configs" / "qwen25vl_7b.yaml"
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests must apply to
KINDS = ("rollout", "listener", "learner")
GPU = "nvidia.com/gpu"

CRDS = ROOT / "tests" / "data" / "kuberay-crds"
CRD_FILES = {"RayCluster": CRDS / "ray.io_rayclusters.yaml", "RayJob": CRDS / "ray.io_rayjobs.yaml"}
# Group-level `resources` keys KubeRay maps to `ray start` flags; every other key is a custom Ray resource.
RAY_BUILTIN = {"cpu", "memory", "gpu", "nvidia.com/gpu"}


def strict(node):
    """A CRD's structural schema as `kubectl apply` enforces it: unknown fields are errors (except under
    x-kubernetes-preserve-unknown-fields), and int-or-string accepts either."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@functools.cache
def crd_schema(kind: str) -> dict:
    crd = yaml.load(CRD_FILES[kind].read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    schema = strict(served["v1"]["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/v1"}
    schema["properties"]["kind"] = {"const": kind}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return schema


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def operator_errors(cluster: dict) -> list[str]:
    """What KubeRay 1.5's ValidateRayClusterSpec (and its replica clamping) rejects or silently changes."""
    errors = []
    groups_ = [("head", cluster.get("headGroupSpec", {}))] + [(g.get("groupName"), g)
                                                              for g in cluster.get("workerGroupSpecs", [])]
    names = [name for name, _ in groups_[1:]]
    if len(names) != len(set(names)):
        errors.append(f"duplicate worker group names {names}")
    for name, group in groups_:
        params = group.get("rayStartParams", {})
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errors.append(f"group {name}: resources set in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"group {name}: rayStartParams labels is not supported")
    for group in cluster.get("workerGroupSpecs", []):
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1)
        replicas = group.get("replicas", lo)
        if not lo <= replicas <= hi:
            errors.append(f"group {group.get('groupName')}: replicas {replicas} outside [{lo}, {hi}]")
    if cluster.get("authOptions", {}).get("mode") == "token" and \
            _version(str(cluster.get("rayVersion", "0"))) < (2, 52, 0):
        errors.append("authOptions.mode token needs rayVersion >= 2.52.0")
    return errors


def kuberay_errors(doc: dict) -> list[str]:
    """Errors against the released CRD schema plus the operator's own spec checks."""
    if doc.get("kind") not in CRD_FILES:
        return [f"not a KubeRay kind: {doc.get('kind')}"]
    validator = jsonschema.Draft202012Validator(crd_schema(doc["kind"]))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return errors + operator_errors(spec)
    if not spec.get("clusterSelector") and not spec.get("rayClusterSpec"):
        errors.append("one of rayClusterSpec or clusterSelector must be set")
    if spec.get("clusterSelector") is not None and not spec["clusterSelector"].get("ray.io/cluster"):
        errors.append("cluster name in clusterSelector should not be empty")
    if spec.get("clusterSelector") and spec.get("shutdownAfterJobFinishes"):
        errors.append("shutdownAfterJobFinishes cannot be used with clusterSelector")
    if spec.get("backoffLimit", 0) < 0 or spec.get("submitterConfig", {}).get("backoffLimit", 0) < 0:
        errors.append("backoffLimit must be a non-negative integer")
    if spec.get("submissionMode") == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
        errors.append("BackoffLimit is incompatible with InteractiveMode")
    return errors + operator_errors(spec.get("rayClusterSpec") or {})


# ---------------------------------------------------------------------------------------------------
RUNTIME_ENV = DEPLOY / "runtime_env.yaml"  # a Ray runtime_env for `ray job submit`, not a Kubernetes object


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml" and p != RUNTIME_ENV)


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_LOADER) if d is not None]


@functools.cache
def all_docs() -> tuple[tuple[Path, dict], ...]:
    """Parsed once per session: tests read these; any test that changes one works on a deepcopy."""
    return tuple((path, doc) for path in manifest_files() for doc in load_docs(path))


def one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in all_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def ray_cluster() -> dict:
    return one("RayCluster")


def groups() -> dict[str, dict]:
    return {g["groupName"]: g for g in ray_cluster()["spec"]["workerGroupSpecs"]}


def ray_resources(group: dict) -> dict[str, float]:
    """The custom resources a group's pods advertise: the non-CPU/GPU/memory keys of the group-level
    `resources` field (KubeRay >= 1.5), which the operator and the autoscaler both read. Quoted JSON in
    rayStartParams (the older way) is refused: only the operator would see it."""
    assert "resources" not in group.get("rayStartParams", {}), "custom resources belong in the group's `resources`"
    return {name: float(amount) for name, amount in group.get("resources", {}).items()
            if name.lower() not in RAY_BUILTIN}


def pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) for every pod the manifests create, the Ray clusters a RayJob creates included."""
    out = []
    for path, doc in all_docs():
        where = f"{path.parent.name}/{path.name}:{doc['kind']}/{doc['metadata']['name']}"
        spec = doc.get("spec", {})
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((where, spec["template"]))
        elif doc["kind"] == "CronJob":
            out.append((where, spec["jobTemplate"]["spec"]["template"]))
        elif doc["kind"] in ("RayCluster", "RayJob"):
            cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec")
            if cluster:
                out.append((f"{where}:head", cluster["headGroupSpec"]["template"]))
                out += [(f"{where}:{g['groupName']}", g["template"]) for g in cluster["workerGroupSpecs"]]
            if "submitterPodTemplate" in spec:
                out.append((f"{where}:submitter", spec["submitterPodTemplate"]))
    return out


def cluster_specs() -> list[tuple[str, dict]]:
    """Every Ray cluster the manifests define: the standing RayCluster and each RayJob's rayClusterSpec."""
    out = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for _, d in all_docs() if d["kind"] == "RayCluster"]
    out += [(f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for _, d in all_docs()
            if d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"]]
    return out


STANDING_JOB = "listener-grpo-qwen25vl-7b"  # deploy/job: runs on the standing cluster
OWN_CLUSTER_JOB = "listener-grpo-qwen25vl-7b-run"  # deploy/job-own-cluster: brings up its own cluster


def ray_jobs() -> list[dict]:
    return [d for _, d in all_docs() if d["kind"] == "RayJob"]


def all_containers() -> list[tuple[str, dict]]:
    out = []
    for where, template in pod_templates():
        for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            out.append((f"{where}:{c['name']}", c))
    return out


def kustomizations() -> dict[Path, dict]:
    """Every kustomization.yaml under deploy/ (Kustomizations and the Component deploy/images)."""
    return {p: yaml.safe_load(p.read_text()) for p in sorted(DEPLOY.rglob("kustomization.yaml"))}


def kustomization_docs(directory: Path) -> list[dict]:
    """The objects a kustomization's own `resources` hold (before its transformers run)."""
    k = kustomizations()[directory / "kustomization.yaml"]
    return [doc for resource in k.get("resources", []) for doc in load_docs(directory / resource)]


def ray_containers() -> list[dict]:
    cluster = ray_cluster()["spec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    # KubeRay runs Ray in the first container of each pod.
    return [t["spec"]["containers"][0] for t in templates]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def gpu_config():
    return load_config(GPU_CONFIG)

