"""The Kubernetes manifests in deploy/, checked without a cluster.

- Core objects (Deployment, StatefulSet, Service, PVC, NetworkPolicy) and every pod template inside the
  Ray objects are validated, strictly, against the Kubernetes OpenAPI schemas that kubernetes-validate
  ships. RayCluster/RayJob are validated against the KubeRay operator's released CRDs (v1.5.1, kept
  unchanged in tests/data/kuberay-crds/), made strict the way `kubectl apply` (field validation Strict)
  treats them, plus the checks the operator makes on a spec before acting on it (kuberay_errors()).
- The cluster works as an operator would run it: token auth through `authOptions` (the operator's own
  dashboard client needs it), no pinned `replicas` a re-apply could reset, custom resources in the
  group-level `resources` field, a pull secret in every pod, one shared Hugging Face cache.
- The manifests agree with the code: entrypoints parse with the real CLI parser and name existing
  configs; each worker group advertises the custom Ray resource that configs/qwen25vl_7b.yaml asks for,
  with matching GPUs; MLflow's URI reaches the job; containers run as non-root; nothing is public.
- Kustomizations: every manifest belongs to one, all share the image Component deploy/images, and
  kubectl's offline kustomize renders each (where kubectl is installed).

The loader and the KubeRay checks live in tests/deploy_manifests.py; what a first deployment needs beyond
valid objects (images, storage, placement, retries, shared memory, operations) is in
tests/unit/test_deploy_operations.py.

    .venv/bin/python -m pytest tests/unit/test_deploy.py
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the manifest loader
from deploy_manifests import (CRD_FILES, DEPLOY, GPU, GPU_CONFIG, K8S_VERSION, KINDS, OWN_CLUSTER_JOB,  # noqa: E402
                              README, ROOT, RUNTIME_ENV, STANDING_JOB, _LOADER, all_containers, all_docs,
                              cluster_specs, crd_schema, env_of, gpu_config, groups, kuberay_errors,
                              kustomizations, load_docs, manifest_files, one, pod_templates, ray_cluster,
                              ray_containers, ray_jobs, ray_resources)


# --- every manifest parses and is well formed ------------------------------------------------------
def test_manifests_exist_and_parse():
    kinds = sorted(d["kind"] for _, d in all_docs())
    assert kinds == sorted(["RayCluster", "RayJob", "RayJob", "PersistentVolumeClaim", "PersistentVolumeClaim",
                            "PersistentVolumeClaim", "PersistentVolumeClaim", "Service", "Service", "Deployment",
                            "StatefulSet", "NetworkPolicy", "NetworkPolicy", "Job", "CronJob", "ConfigMap",
                            "PriorityClass", "PriorityClass", "PriorityClass"])
    for path, doc in all_docs():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), path
        assert "namespace" not in doc["metadata"], f"{path}: namespace comes from the kustomization"


@pytest.mark.parametrize("path,doc", [(p, d) for p, d in all_docs() if not d["apiVersion"].startswith("ray.io")],
                         ids=lambda x: x.name if isinstance(x, Path) else x["kind"])
def test_core_objects_match_kubernetes_schema(path, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("template", [pytest.param(t, id=where) for where, t in pod_templates()])
def test_pod_templates_match_kubernetes_schema(template):
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)


def test_crds_are_the_released_ones_with_the_fields_we_use():
    cluster = crd_schema("RayCluster")["properties"]["spec"]["properties"]
    assert cluster["authOptions"]["properties"]["mode"]["enum"] == ["disabled", "token"]
    worker = cluster["workerGroupSpecs"]["items"]["properties"]
    assert worker["resources"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert "resources" in cluster["headGroupSpec"]["properties"]
    job = crd_schema("RayJob")["properties"]["spec"]["properties"]
    assert "authOptions" in job["rayClusterSpec"]["properties"]
    for path in CRD_FILES.values():
        assert "controller-gen.kubebuilder.io/version" in path.read_text()[:2000], path


@pytest.mark.parametrize("doc", [d for _, d in all_docs() if d["kind"] in CRD_FILES],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_ray_objects_match_kuberay_schema(doc):
    assert kuberay_errors(doc) == []


@pytest.mark.parametrize("breakage", [
    lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"),
    lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplica=1),  # typo
    lambda d: d["spec"]["workerGroupSpecs"][1].update(replicas=99),
    lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"),
    lambda d: d["spec"]["headGroupSpec"].pop("template"),
    lambda d: d["spec"]["workerGroupSpecs"].append(copy.deepcopy(d["spec"]["workerGroupSpecs"][0])),
    lambda d: d.update(apiVersion="ray.io/v1alpha1"),
    lambda d: d["spec"].update(authOptions={"mode": "bearer"}),
    lambda d: d["spec"].update(rayVersion="2.50.0"),
    lambda d: d["spec"]["workerGroupSpecs"][0]["rayStartParams"].update({"num-cpus": "4"}),
    lambda d: d["spec"]["workerGroupSpecs"][0].update(resources={"rollout": 1}),  # a number, not a string
], ids=["no-group-name", "typo", "replicas-over-max", "bad-enum", "no-head-template", "dup-group", "old-api",
        "bad-auth-mode", "auth-on-old-ray", "resources-twice", "resource-not-string"])
def test_kuberay_schema_rejects_broken_clusters(breakage):
    doc = copy.deepcopy(ray_cluster())
    breakage(doc)
    assert kuberay_errors(doc)


@pytest.mark.parametrize("breakage", [
    lambda s: s.pop("clusterSelector"),
    lambda s: s.update(clusterSelector={"ray.io/cluster": ""}),
    lambda s: s.update(entrypoint=["python"]),
    lambda s: s["submitterPodTemplate"]["spec"].update(restartPolicyy="Never"),  # typo
    lambda s: s.update(authOptions={"mode": "token"}),  # belongs to the cluster, not the job
    lambda s: s["submitterConfig"].update(backoffLimit=-1),
    lambda s: s.update(submissionMode="InteractiveMode", backoffLimit=2),
], ids=["no-cluster", "empty-cluster-name", "entrypoint-list", "pod-typo", "auth-on-job", "negative-backoff",
        "interactive-retries"])
def test_kuberay_schema_rejects_broken_jobs(breakage):
    job = copy.deepcopy(one("RayJob", STANDING_JOB))
    breakage(job["spec"])
    assert kuberay_errors(job)


def test_core_schema_rejects_a_typo():
    deployment = copy.deepcopy(one("Deployment", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "Sometimes"
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_rayjob_runs_on_the_standing_cluster():
    """KubeRay reads the RayCluster's name from clusterSelector's `ray.io/cluster` key."""
    job = one("RayJob", STANDING_JOB)["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": ray_cluster()["metadata"]["name"]}
    assert "rayClusterSpec" not in job and not job.get("shutdownAfterJobFinishes")


def test_ray_version_matches_the_image():
    gpu_lock = (ROOT / "requirements" / "gpu.lock").read_text()
    ray_pin = re.search(r"^ray==(\S+)$", gpu_lock, re.M).group(1)
    assert ray_cluster()["spec"]["rayVersion"] == ray_pin


# --- the manifests agree with the code --------------------------------------------------------------
@pytest.mark.parametrize("job", ray_jobs(), ids=lambda d: d["metadata"]["name"])
def test_rayjob_entrypoint_is_a_real_training_command(job):
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "pipeline"]
    args = build_parser().parse_args(words[3:])
    assert args.command == "train"
    assert args.config is not None and (ROOT / args.config).resolve() == GPU_CONFIG.resolve()
    load_config(ROOT / args.config, args.overrides)
    # The entrypoint's relative config path resolves in the working_dir the job uploads (the image's /app,
    # where docker/Dockerfile copies the repo).
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/app"
    assert "WORKDIR /app" in (ROOT / "docker" / "Dockerfile").read_text()


def test_rayjob_and_ray_job_submit_share_the_runtime_env():
    """deploy/runtime_env.yaml (for `ray job submit`) and the RayJob differ only in working_dir; the
    excludes keep local outputs from being uploaded, and .rayignore repeats them."""
    local = yaml.safe_load(RUNTIME_ENV.read_text())
    for doc in ray_jobs():
        job = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        assert local["working_dir"] == "." and job["working_dir"] == "/app"
        assert {k: v for k, v in local.items() if k != "working_dir"} == \
            {k: v for k, v in job.items() if k != "working_dir"}
    assert {".git", ".venv", "runs", "mlflow.db", "models"} <= set(local["excludes"])
    rayignore = {line.strip().rstrip("/") for line in (ROOT / ".rayignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "mlflow.db", "models"} <= rayignore
    assert "--runtime-env deploy/runtime_env.yaml" in README.read_text()
    assert "--runtime-env deploy/runtime_env.yaml" in (ROOT / "README.md").read_text()


def readme_pipeline_commands() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            match = re.search(r"python -m pipeline (.*)$", line)
            if match:
                commands.append(match.group(1).strip())
    return commands


@pytest.mark.parametrize("command", readme_pipeline_commands())
def test_readme_commands_parse_with_the_cli(command):
    words = shlex.split(command)
    parser = build_parser()
    args = parser.parse_args(words)
    config = getattr(args, "config", None)
    if config is not None:
        load_config(ROOT / config, getattr(args, "overrides", []))


def test_readme_documents_the_training_and_scaling_commands():
    commands = readme_pipeline_commands()
    assert "train --config configs/qwen25vl_7b.yaml" in commands
    assert any(c.startswith("scale-listeners ") and "--replicas" in c and "--address" in c for c in commands)
    text = README.read_text()
    assert ("ray job submit --address http://127.0.0.1:8265 --runtime-env deploy/runtime_env.yaml -- "
            "python -m pipeline train --config configs/qwen25vl_7b.yaml") in text


def test_each_worker_group_advertises_its_own_config_resource():
    cfg = gpu_config()
    wanted = {kind: getattr(cfg, kind).resource for kind in KINDS}
    advertised = {name: ray_resources(g) for name, g in groups().items()}
    assert set(groups()) == set(KINDS)
    for kind in KINDS:
        # exactly one custom resource per group, the one the driver asks for for that kind
        assert set(advertised[kind]) == {wanted[kind]}, (kind, advertised[kind])
    assert sorted(r for res in advertised.values() for r in res) == sorted(wanted.values())
    head = ray_cluster()["spec"]["headGroupSpec"]
    assert not set(ray_resources(head)) & set(wanted.values()), "an engine could land on the head"


def _units(kind: str) -> float:
    return ray_resources(groups()[kind])[getattr(gpu_config(), kind).resource]


def test_gpu_requests_match_the_config():
    cfg = gpu_config()
    for kind in KINDS:
        container = groups()[kind]["template"]["spec"]["containers"][0]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        expected = _units(kind) * getattr(cfg, kind).num_gpus
        assert float(limits.get(GPU, 0)) == expected, (kind, limits)
        assert requests.get(GPU) == limits.get(GPU), kind  # extended resources: request == limit
    head = ray_cluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert GPU not in head["resources"].get("limits", {})


def test_cpus_cover_the_actors_on_each_pod():
    cfg = gpu_config()
    for kind in KINDS:
        limits = groups()[kind]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(limits["cpu"]) >= _units(kind) * getattr(cfg, kind).num_cpus, kind


def test_group_sizes_cover_the_config_and_nothing_holds_gpus_without_a_run():
    cfg = gpu_config()
    demand = {"rollout": cfg.rollout.num_workers, "listener": cfg.listener.num_workers,
              "learner": cfg.learner.num_ranks}
    for kind in KINDS:
        group = groups()[kind]
        # No `replicas`: the operator clamps the live value to [min, max] and the autoscaler owns it, so a
        # re-apply of this file cannot reset a pool that grew.
        assert "replicas" not in group, kind
        assert group["maxReplicas"] * _units(kind) >= demand[kind], kind
        # minReplicas 0: with no run, no pod of a GPU group exists; the run's actors bring them up.
        assert group["minReplicas"] == 0, kind
    # Rollout workers are not pinned to exactly the config's count: a config with more can run.
    assert groups()["rollout"]["maxReplicas"] > demand["rollout"]
    # The listener pool grows and shrinks at run time, through the autoscaler; the learner is one pod.
    assert groups()["listener"]["maxReplicas"] > demand["listener"]
    assert groups()["learner"]["maxReplicas"] * _units("learner") == demand["learner"]
    assert ray_cluster()["spec"]["enableInTreeAutoscaling"] is True


def _ray_capacity(group: dict, replicas: int) -> dict[str, float]:
    """What `replicas` pods of a group give Ray: CPUs (num-cpus, else the CPU limit), GPUs, custom units."""
    limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    cpus = float(group["rayStartParams"].get("num-cpus", limits.get("cpu", 0)))
    per_pod = {"CPU": cpus, "GPU": float(limits.get(GPU, 0)), **ray_resources(group)}
    return {name: amount * replicas for name, amount in per_pod.items()}


def test_cluster_holds_what_the_driver_placement_asks_for():
    """pipeline.placement (the driver's one placement function) against what the autoscaler can reach
    (fixed groups at their size, the listener group at most maxReplicas): every resource it needs exists,
    and the custom ones are exactly those the worker groups advertise."""
    from pipeline.placement import required_resources

    need = required_resources(gpu_config())
    have: dict[str, float] = {}
    spec = ray_cluster()["spec"]
    parts = [_ray_capacity(spec["headGroupSpec"], 1)] + [_ray_capacity(g, g["maxReplicas"]) for g in groups().values()]
    for part in parts:
        for name, amount in part.items():
            have[name] = have.get(name, 0.0) + amount
    for name, amount in need.items():
        assert have.get(name, 0.0) >= amount, f"{name}: the run needs {amount}, the cluster has {have.get(name)}"
    assert set(need) - {"CPU", "GPU"} == set(have) - {"CPU", "GPU"}
    assert _ray_capacity(spec["headGroupSpec"], 1) == {"CPU": 0.0, "GPU": 0.0}


def test_run_directory_is_shared_by_driver_and_learner():
    output_dir = Path(gpu_config().trainer.output_dir)
    claims = {d["metadata"]["name"] for _, d in all_docs() if d["kind"] == "PersistentVolumeClaim"}
    cluster = ray_cluster()["spec"]
    for template in (cluster["headGroupSpec"]["template"], groups()["learner"]["template"]):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        mounts = template["spec"]["containers"][0].get("volumeMounts", [])
        covering = [m for m in mounts if output_dir.is_relative_to(m["mountPath"])]
        assert covering, f"{output_dir} is on no volume"
        claim = volumes[covering[0]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim in claims
    runs = one("PersistentVolumeClaim", "listener-grpo-runs")
    assert runs["spec"]["accessModes"] == ["ReadWriteMany"]  # head and learner may be on two nodes


def test_mlflow_uri_reaches_the_job_and_the_cluster():
    service = one("Service", "mlflow")
    port = service["spec"]["ports"][0]
    uri = f"http://{service['metadata']['name']}:{port['port']}"
    for job in ray_jobs():
        assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"] == uri
    for container in ray_containers():  # also for `ray job submit`, which sets no env of its own
        assert env_of(container)["MLFLOW_TRACKING_URI"]["value"] == uri
    # The Service reaches the server: selector matches the pod, target port is the container's port.
    deployment = one("Deployment", "mlflow")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port["targetPort"] in ports and "--port" in container["args"]
    assert str(ports[port["targetPort"]]) == container["args"][container["args"].index("--port") + 1]
    # The server accepts the Host header the job sends.
    allowed = env_of(container)["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert f"{service['metadata']['name']}:{port['port']}" in allowed


def test_mlflow_uses_the_database_and_the_artifact_volume():
    container = one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    db = one("Service", "mlflow-postgres")
    backend = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    host = f"//{db['metadata']['name']}:{db['spec']['ports'][0]['port']}/"
    assert backend.startswith("postgresql") and host in backend
    assert "@" not in backend  # no login in the URI: libpq reads PGUSER/PGPASSWORD from the Secret
    for var, key in (("PGUSER", "username"), ("PGPASSWORD", "password")):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": key}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"] in mounts
    assert "--serve-artifacts" in container["args"]


SECRETISH = re.compile(r"PASSWORD|TOKEN|SECRET|KEY", re.I)


def test_credentials_come_from_secrets_only():
    assert not [d for _, d in all_docs() if d["kind"] == "Secret"], "Secrets are created by hand, not committed"
    containers = all_containers() + [("autoscaler", ray_cluster()["spec"]["autoscalerOptions"])]
    referenced = set()
    for where, container in containers:
        for env in container.get("env", []):
            if SECRETISH.search(env["name"]):
                assert "value" not in env, f"{where}: {env['name']} is inline"
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                referenced.add(ref["name"])
    # the Ray token Secret is the operator's (authOptions)
    assert referenced == {"mlflow-postgres", "mlflow-auth"}
    # ... and the README creates them, with the keys the manifests read.
    text = README.read_text()
    assert re.search(r"create secret generic mlflow-postgres\b.*--from-literal=username=.*--from-literal=password=",
                     text, re.S)
    assert re.search(r"create secret generic mlflow-auth\b.*--from-literal=username=.*--from-literal=password=.*"
                     r"--from-literal=flask-secret-key=", text, re.S)


def test_ray_auth_is_the_operators():
    """Ray 2.60's job server demands token auth (docs/design.md). With `authOptions: {mode: token}` the
    operator creates the Secret named after the cluster, gives the token to head, workers, autoscaler and
    submitter, and sends it on its own job-status calls; hand-written RAY_AUTH_* env would leave the
    operator out (its calls get 401: the RayJob never finishes and cannot be stopped)."""
    spec = ray_cluster()["spec"]
    for _, cluster in cluster_specs():
        assert cluster["authOptions"] == {"mode": "token"}
    holders = ray_containers() + [spec["autoscalerOptions"]] + \
        [job["spec"]["submitterPodTemplate"]["spec"]["containers"][0] for job in ray_jobs()]
    for container in holders:
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env_of(container)), container.get("name")
    text = README.read_text()
    name = ray_cluster()["metadata"]["name"]
    assert f"get secret {name} -o jsonpath='{{.data.auth_token}}'" in text


def test_every_pod_can_pull_from_a_private_registry():
    """The pull secret is in each pod template: the head pod (and its autoscaler sidecar) runs under the
    operator's own service account, so a secret on the namespace's `default` account would not reach it."""
    for where, template in pod_templates():
        assert {"name": "listener-grpo-registry"} in template["spec"].get("imagePullSecrets", []), where
    assert "create secret docker-registry listener-grpo-registry" in README.read_text()


def test_every_ray_pod_shares_one_hugging_face_cache():
    claim = one("PersistentVolumeClaim", "listener-grpo-hf-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    templates = [(w, t) for w, t in pod_templates()
                 if ("RayCluster" in w or "RayJob" in w) and not w.endswith(":submitter") or w.endswith("prestage")]
    assert len(templates) == 9  # head and three worker groups, twice (standing, per run), the pre-staging job
    for where, template in templates:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        container = template["spec"]["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        env = env_of(container)
        for var in ("HF_HOME", "HF_DATASETS_CACHE"):
            path = Path(env[var]["value"])
            mount = [m for m in mounts if path.is_relative_to(m)]
            assert mount, f"{where}: {var}={path} is on no volume"
            assert volumes[mounts[mount[0]]]["persistentVolumeClaim"]["claimName"] == "listener-grpo-hf-cache", where


def test_prestage_job_reads_the_run_config():
    args = one("Job", "listener-grpo-prestage")["spec"]["template"]["spec"]["containers"][0]["args"][0]
    config = re.search(r'load_config\("([^"]+)"\)', args).group(1)
    assert (ROOT / config).resolve() == GPU_CONFIG.resolve()
    compile(args, "prestage", "exec")


def test_readme_never_scales_by_editing_and_reapplying():
    text = README.read_text()
    assert "kubectl apply -k deploy` again" not in text and "replicas:" not in text
    assert "kubectl -n listener-grpo patch raycluster listener-grpo --type=json" in text


def _effective(pod_spec: dict, container: dict, key: str):
    return container.get("securityContext", {}).get(key, pod_spec.get("securityContext", {}).get(key))


def test_every_container_runs_as_non_root():
    checked = 0
    for where, template in pod_templates():
        spec = template["spec"]
        for container in spec["containers"] + spec.get("initContainers", []):
            assert _effective(spec, container, "runAsNonRoot") is True, where
            uid = _effective(spec, container, "runAsUser")
            assert isinstance(uid, int) and uid != 0, where
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, where
            assert container["securityContext"].get("privileged") is not True, where
            checked += 1
    autoscaler = ray_cluster()["spec"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["runAsNonRoot"] is True and autoscaler["runAsUser"] != 0
    # postgres, its backup, mlflow and its db-upgrade, the pre-staging job, and twice (standing cluster,
    # per-run cluster) the ray head, three worker groups and a job submitter
    assert checked == 15


def test_images_run_as_the_uid_the_pods_ask_for():
    """runAsUser 1000 matches the USER the project's images switch to."""
    for dockerfile in ("Dockerfile", "Dockerfile.cpu", "Dockerfile.mlflow"):
        text = (ROOT / "docker" / dockerfile).read_text()
        assert re.findall(r"^USER (\S+)", text, re.M)[-1] == "1000:1000", dockerfile
    for where, container in all_containers():
        if container["image"].startswith("listener-grpo"):
            assert container["securityContext"]["runAsUser"] == 1000, where


def test_nothing_is_exposed_outside_the_cluster():
    head = ray_cluster()["spec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head.get("enableIngress") is False
    for _, doc in all_docs():
        assert doc["kind"] != "Ingress"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
    text = README.read_text()
    assert "port-forward svc/listener-grpo-head-svc 8265:8265" in text
    assert "port-forward svc/mlflow 5000:5000" in text


def test_postgres_accepts_only_mlflow_and_its_backup():
    policy = one("NetworkPolicy", "mlflow-postgres")
    db_labels = one("StatefulSet", "mlflow-postgres")["spec"]["template"]["metadata"]["labels"]
    mlflow_labels = one("Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= db_labels.items()
    backup_labels = one("CronJob", "mlflow-postgres-backup")["spec"]["jobTemplate"]["spec"]["template"]["metadata"][
        "labels"]
    sources = [f["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for f in rule["from"]]
    assert sources and all(s and (s.items() <= mlflow_labels.items() or s.items() <= backup_labels.items())
                           for s in sources)
    # Ray pods (which run user code) are not among them.
    ray_labels = ray_cluster()["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert not any(s.items() <= ray_labels.items() for s in sources)


# --- kustomizations --------------------------------------------------------------------------------
IMAGES = DEPLOY / "images"  # the Component every kustomization includes
APPLIED = ["deploy", "deploy/storage", "deploy/job", "deploy/job-own-cluster", "deploy/prestage"]


def test_kustomizations_cover_every_manifest_and_share_one_image_component():
    covered = set()
    for path, k in kustomizations().items():
        if path.parent == IMAGES:
            assert k["kind"] == "Component" and "resources" not in k
            continue
        assert k["namespace"] == "listener-grpo" and "images" not in k, path
        for resource in k["resources"]:
            assert (path.parent / resource).is_file(), f"{path}: missing {resource}"
            covered.add((path.parent / resource).resolve())
        # One place names the images (deploy/images), so no two parts of a deployment run different builds.
        if any("image: listener-grpo" in (path.parent / r).read_text() for r in k["resources"]):
            assert [(path.parent / c).resolve() for c in k["components"]] == [IMAGES.resolve()], path
    assert covered == {p.resolve() for p in manifest_files()}
    assert sorted(str(p.parent.relative_to(ROOT)) for p in kustomizations() if p.parent != IMAGES) == sorted(APPLIED)


def test_every_project_image_is_rewritten_by_the_image_component():
    mapped = {i["name"] for i in kustomizations()[IMAGES / "kustomization.yaml"]["images"]}
    for path in manifest_files():
        for doc in load_docs(path):
            for image in re.findall(r"image: (listener-grpo\S*)", yaml.safe_dump(doc)):
                assert image in mapped, f"{path.name}: {image} would reach the cluster unmapped"


def _mapped_images() -> set[str]:
    out = set()
    for i in kustomizations()[IMAGES / "kustomization.yaml"]["images"]:
        out.add(f"{i['newName']}@{i['digest']}" if "digest" in i else f"{i['newName']}:{i['newTag']}")
    return out


def kubectl_kustomize(directory: str) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(ROOT / directory)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.load_all(result.stdout, Loader=_LOADER) if d]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (the machine image has it)")
@pytest.mark.parametrize("directory", APPLIED)
def test_kustomize_renders_what_kubectl_apply_will_send(directory):
    """kubectl's own kustomize (offline): images rewritten inside the Ray CRDs too, one namespace for the
    namespaced objects (PriorityClasses are cluster-scoped)."""
    docs = kubectl_kustomize(directory)
    assert docs
    for d in docs:
        if d["kind"] == "PriorityClass":
            assert "namespace" not in d["metadata"]
        else:
            assert d["metadata"]["namespace"] == "listener-grpo", d["metadata"]["name"]
    images = re.findall(r"^\s*(?:- )?image: (\S+)$", yaml.safe_dump_all(docs, width=1000), re.M)
    project = [i for i in images if not i.startswith("postgres:")]
    assert set(project) <= _mapped_images(), images
    assert bool(project) == (directory != "deploy/storage")
