"""What a first deployment of deploy/ needs beyond valid objects (issue 28): each test names the defect it
would have caught. No cluster: the manifests (tests/deploy_manifests.py), kubectl's offline kustomize where
installed, and deploy/pin-images.sh run against a stand-in `docker` (a mock: no Docker engine here).

- Images: every project container pulls Always, or the image component pins digests (stale code after a
  rebuild); pin-images.sh writes digests.
- Storage: both ReadWriteMany claims name a storage class (set by a kustomize patch); the checkpoint
  volumes live outside `kubectl delete -k deploy`.
- Placement: GPU groups ask for 80 GB GPUs by node label, the learner for a node with its GPUs, every
  pod has a PriorityClass, the learner's above the engines'.
- Retries: submitters retry (KubeRay's submitter is idempotent); the per-run cluster variant retries
  the run, which resumes from trainer.output_dir on the run volume.
- Shared memory: every Ray group sizes its object store below its /dev/shm.
- Operations: no GPU held without a run, MLflow behind authentication and a NetworkPolicy, a database
  backup, `mlflow db upgrade` before the server starts; NCCL settings for the cross-pod weight sync.

    .venv/bin/python -m pytest tests/unit/test_deploy_operations.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the manifest loader
from deploy_manifests import (DEPLOY, GPU, OWN_CLUSTER_JOB, README, ROOT, STANDING_JOB,  # noqa: E402
                              all_containers, all_docs, cluster_specs, env_of, gpu_config, kustomization_docs,
                              kustomizations, one, pod_templates, ray_cluster, ray_jobs)

PROJECT_IMAGES = ("listener-grpo-gpu", "listener-grpo-mlflow")
IMAGES = DEPLOY / "images" / "kustomization.yaml"
RWX_CLAIMS = ("listener-grpo-runs", "listener-grpo-hf-cache")
KEPT_CLAIMS = RWX_CLAIMS + ("mlflow-artifacts", "mlflow-postgres-backups")
GPU_GROUPS = ("rollout", "listener", "learner")
NODE_GPUS = 8  # GPUs per node of the clusters deploy/README.md is written for (8 x 80 GB)


def quantity(text: str | int) -> int:
    """A Kubernetes memory quantity (Gi, Mi, G, plain bytes) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", str(text))
    assert match, text
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def readme_block(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end > 0 else len(text)]


# --- 1. images ---------------------------------------------------------------------------------------
def test_project_images_are_pulled_always_or_pinned_by_digest():
    """A fixed tag with IfNotPresent runs whatever copy a node already holds after a rebuild."""
    pinned = {i["name"] for i in yaml.safe_load(IMAGES.read_text())["images"] if "digest" in i}
    checked = 0
    for where, container in all_containers():
        if container["image"] in PROJECT_IMAGES:
            checked += 1
            assert container["image"] in pinned or container.get("imagePullPolicy") == "Always", where
    autoscaler = ray_cluster()["spec"]["autoscalerOptions"]  # runs the head's image
    assert "listener-grpo-gpu" in pinned or autoscaler.get("imagePullPolicy") == "Always"
    assert checked == 13  # mlflow + db-upgrade, the pre-staging job, 2 x (head, 3 groups, submitter)


def test_pin_images_writes_digests_that_kustomize_applies(tmp_path):
    """deploy/pin-images.sh against a stand-in `docker` (mock: no Docker engine here) that reports the
    digests a push would have recorded."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text('#!/bin/sh\n# docker inspect --format ... IMAGE\nimage="$4"\n'
                                 'echo "other.example/x@sha256:$(printf 0%.0s $(seq 64))"\n'
                                 'echo "${image%:*}@sha256:$(echo "$image" | sha256sum | cut -c1-64)"\n')
    (fake / "docker").chmod(0o755)
    out = tmp_path / "images.yaml"
    env = {"PATH": f"{fake}:/usr/bin:/bin", "OUT": str(out)}
    result = subprocess.run(["bash", str(DEPLOY / "pin-images.sh"), "reg.example/ml", "abc123"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    written = yaml.safe_load(out.read_text())
    assert written["kind"] == "Component"
    images = {i["name"]: i for i in written["images"]}
    assert set(images) == set(PROJECT_IMAGES)
    assert images["listener-grpo-gpu"]["newName"] == "reg.example/ml/listener-grpo"
    for image in images.values():
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", image["digest"]) and "newTag" not in image
        assert image["digest"] != "sha256:" + "0" * 64  # the other repository's digest is not taken
    # An image that was never pushed (no digest from its repository) is an error, not a silent tag.
    (fake / "docker").write_text("#!/bin/sh\necho other.example/x@sha256:" + "0" * 64 + "\n")
    result = subprocess.run(["bash", str(DEPLOY / "pin-images.sh"), "reg.example/ml", "abc123"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "push it first" in result.stderr


# --- 2. storage ----------------------------------------------------------------------------------------
def _storage_patch() -> tuple[dict, str]:
    """(target, storage class) of deploy/storage's patch that sets the RWX claims' class."""
    k = kustomizations()[DEPLOY / "storage" / "kustomization.yaml"]
    found = []
    for patch in k.get("patches", []):
        for op in yaml.safe_load(patch["patch"]):
            if op["path"] == "/spec/storageClassName" and op["op"] in ("add", "replace"):
                found.append((patch["target"], op["value"]))
    assert len(found) == 1, found
    return found[0]


def _selected(target: dict, doc: dict) -> bool:
    labels = doc["metadata"].get("labels", {})
    wanted = dict(kv.split("=", 1) for kv in target.get("labelSelector", "").split(",") if kv)
    return doc["kind"] == target.get("kind", doc["kind"]) and wanted.items() <= labels.items() and \
        re.fullmatch(target.get("name", ".*"), doc["metadata"]["name"]) is not None


def test_read_write_many_claims_name_a_storage_class():
    """No class means the cluster's default, ReadWriteOnce on EKS/GKE/AKS: the claims and the head stay Pending."""
    target, storage_class = _storage_patch()
    assert storage_class
    claims = [d for d in kustomization_docs(DEPLOY / "storage") if d["kind"] == "PersistentVolumeClaim"]
    rwx = {d["metadata"]["name"] for d in claims if "ReadWriteMany" in d["spec"]["accessModes"]}
    assert rwx == set(RWX_CLAIMS)
    assert {d["metadata"]["name"] for d in claims if _selected(target, d)} == rwx
    # The checklist tells the user to set it, where, and how to check that the class exists.
    checklist = readme_block("## First-run checklist")
    assert "deploy/storage/kustomization.yaml" in checklist and "kubectl get storageclass" in checklist
    assert f"value: {storage_class}" in (DEPLOY / "storage" / "kustomization.yaml").read_text()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (the machine image has it)")
def test_rendered_claims_carry_the_storage_class():
    result = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "storage")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    claims = {d["metadata"]["name"]: d for d in yaml.safe_load_all(result.stdout) if d}
    for name in RWX_CLAIMS:
        assert claims[name]["spec"]["storageClassName"] == _storage_patch()[1], name


def test_checkpoint_volumes_survive_deleting_the_deployment():
    """`kubectl delete -k deploy` deletes what deploy/kustomization.yaml lists (kubectl honours no keep
    annotation), so the volumes live in deploy/storage; every pod's claims exist there."""
    root = {(d["kind"], d["metadata"]["name"]) for d in kustomization_docs(DEPLOY)}
    assert not any(kind == "PersistentVolumeClaim" for kind, _ in root)
    storage = {d["metadata"]["name"] for d in kustomization_docs(DEPLOY / "storage")}
    assert storage == set(KEPT_CLAIMS)
    for where, template in pod_templates():
        for volume in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in storage, where
    # The database's own volume comes from a volumeClaimTemplate, which a StatefulSet delete keeps.
    policy = one("StatefulSet", "mlflow-postgres")["spec"].get("persistentVolumeClaimRetentionPolicy", {})
    assert policy.get("whenDeleted", "Retain") == "Retain"
    teardown = readme_block("## Tear down")
    assert "kubectl delete -k deploy\n" in teardown and "persistentVolumeReclaimPolicy" in README.read_text()


# --- 3. placement --------------------------------------------------------------------------------------
def _required_terms(template: dict) -> list[dict]:
    affinity = template["spec"].get("affinity", {}).get("nodeAffinity", {})
    terms = affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])
    assert len(terms) == 1, terms  # one term: every expression in it must hold
    return terms[0]["matchExpressions"]


def _gt(expressions: list[dict], key: str) -> int:
    found = [int(e["values"][0]) for e in expressions if e["key"] == key and e["operator"] == "Gt"]
    assert len(found) == 1, (key, expressions)
    return found[0]


@pytest.mark.parametrize("where,cluster", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_gpu_groups_ask_for_80gb_gpus_and_the_learner_for_a_whole_node_share(where, cluster):
    """Without it, 40-48 GB cards (which cannot hold the 7B engines) qualify, and single-GPU pods can leave
    no node with the learner's GPUs free."""
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    for name in GPU_GROUPS:
        template = groups[name]["template"]
        # nvidia.com/gpu.memory is in MiB (GPU feature discovery): A100 80GB 81920, H100 81559, L40S 46068.
        threshold = _gt(_required_terms(template), "nvidia.com/gpu.memory")
        assert 49152 <= threshold < 81559, name
    learner = groups["learner"]["template"]
    gpus = int(learner["spec"]["containers"][0]["resources"]["limits"][GPU])
    assert gpus == gpu_config().learner.num_ranks * gpu_config().learner.num_gpus <= NODE_GPUS
    assert _gt(_required_terms(learner), "nvidia.com/gpu.count") == gpus - 1  # a node with >= gpus GPUs
    assert "8 GPUs per node" in readme_block("## 0. What you need")


def test_every_pod_of_the_run_has_a_priority_class_that_exists():
    classes = {d["metadata"]["name"]: d for _, d in all_docs() if d["kind"] == "PriorityClass"}
    assert not any(c.get("globalDefault") for c in classes.values())
    for where, cluster in cluster_specs():
        head = cluster["headGroupSpec"]["template"]["spec"]["priorityClassName"]
        by_group = {g["groupName"]: g["template"]["spec"]["priorityClassName"] for g in cluster["workerGroupSpecs"]}
        assert {head, *by_group.values()} <= set(classes), where
        learner, engines = classes[by_group["learner"]], {classes[by_group[k]]["metadata"]["name"]
                                                          for k in ("rollout", "listener")}
        assert len(engines) == 1
        engine = classes[engines.pop()]
        # The learner may preempt engines to fit its GPUs on one node; engines never preempt anything.
        assert learner["value"] > engine["value"] and engine["preemptionPolicy"] == "Never"
        assert classes[head]["value"] > learner["value"]


# --- 4 and the per-run cluster: retries ----------------------------------------------------------------
@pytest.mark.parametrize("job", ray_jobs(), ids=lambda d: d["metadata"]["name"])
def test_submitters_retry(job):
    """backoffLimit 0 failed the RayJob on a dropped log stream while training kept its GPUs. KubeRay's
    K8sJobMode submitter checks `ray job status <id>` before submitting, so a retry only follows the logs."""
    spec = job["spec"]
    assert spec["submitterConfig"]["backoffLimit"] > 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and "jobId" not in spec
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_per_run_cluster_job_is_the_standing_cluster_and_retries_from_the_checkpoint():
    job = one("RayJob", OWN_CLUSTER_JOB)["spec"]
    # The same cluster as deploy/raycluster.yaml, field for field.
    assert job["rayClusterSpec"] == ray_cluster()["spec"] and "clusterSelector" not in job
    assert job["shutdownAfterJobFinishes"] is True and 0 < job["ttlSecondsAfterFinished"] <= 3600
    assert job["backoffLimit"] > 0  # each retry: a new cluster, the same run volume
    standing = one("RayJob", STANDING_JOB)["spec"]
    for key in ("entrypoint", "runtimeEnvYAML", "submitterPodTemplate", "submitterConfig", "submissionMode"):
        assert job[key] == standing[key], key
    # A retry resumes (pipeline.driver: train() continues from the last checkpoint under
    # trainer.output_dir) only if that directory outlives the cluster: on a claim kept by deploy/storage,
    # mounted by the head (driver) and the learner, and not overridden per attempt.
    assert "output_dir" not in job["entrypoint"] and "--resume" not in job["entrypoint"]
    output_dir = Path(gpu_config().trainer.output_dir)
    groups = {g["groupName"]: g for g in job["rayClusterSpec"]["workerGroupSpecs"]}
    for template in (job["rayClusterSpec"]["headGroupSpec"]["template"], groups["learner"]["template"]):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mount = next(m for m in template["spec"]["containers"][0]["volumeMounts"]
                     if output_dir.is_relative_to(m["mountPath"]))
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "listener-grpo-runs"


def test_a_retried_run_restores_the_last_complete_checkpoint_of_output_dir(tmp_path):
    """What a RayJob retry relies on: the same entrypoint on a run directory with checkpoints restores the
    newest complete one (pipeline.driver._restore), not step 0, and skips one a killed attempt left half
    written. The learner is a stand-in (a mock: the real one needs the 7B model on GPUs) that records what
    it was asked to load; the integration tests (test_faults_learner) restore a real one."""
    from types import SimpleNamespace

    from actors.checkpoint import MANIFEST, step_dir_name
    from pipeline.config import load_config
    from pipeline.driver import _restore
    from pipeline.types import CheckpointInfo

    cfg = load_config(ROOT / "configs" / "qwen25vl_7b.yaml", [f"trainer.output_dir={tmp_path}"])
    checkpoints = Path(cfg.trainer.output_dir) / "checkpoints"
    for step in (50, 100):
        (checkpoints / step_dir_name(step)).mkdir(parents=True)
        (checkpoints / step_dir_name(step) / MANIFEST).write_text("{}")
    (checkpoints / step_dir_name(150)).mkdir()  # killed mid-write: no manifest
    calls = []
    learner = SimpleNamespace(
        load_checkpoint=lambda path: calls.append(("load", path)) or CheckpointInfo(path, int(path[-8:]), {"i": 1}),
        sync_weights=lambda rollout, step, sync: calls.append(("sync", step)))
    step, position = _restore(SimpleNamespace(learner=learner, rollout=[]), cfg, Path(cfg.trainer.output_dir))
    assert (step, position) == (100, {"i": 1})
    assert calls == [("load", str(checkpoints / step_dir_name(100))), ("sync", 100)]


# --- 7. shared memory ------------------------------------------------------------------------------------
@pytest.mark.parametrize("where,cluster", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_object_store_fits_in_dev_shm(where, cluster):
    """Ray's default store (30% of memory) is larger than /dev/shm; Ray then moves it to /tmp (disk)."""
    for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        name = group.get("groupName", "head")
        spec = group["template"]["spec"]
        container = spec["containers"][0]
        shm_mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        shm = next(v for v in spec["volumes"] if v["name"] == shm_mount["name"])["emptyDir"]
        assert shm["medium"] == "Memory", name
        store = int(group["rayStartParams"]["object-store-memory"])
        assert store <= 0.8 * quantity(shm["sizeLimit"]), name  # room for vLLM's and NCCL's own segments
        # tmpfs pages count against the container's memory limit.
        assert quantity(shm["sizeLimit"]) <= quantity(container["resources"]["limits"]["memory"]) // 2, name


# --- 9. operations -----------------------------------------------------------------------------------------
def test_mlflow_requires_a_login_and_the_driver_has_one():
    mlflow = one("Deployment", "mlflow")["spec"]["template"]["spec"]
    server = mlflow["containers"][0]
    args = server["args"]
    assert args[args.index("--app-name") + 1] == "basic-auth"
    env = env_of(server)
    admin = {k: env[f"MLFLOW_AUTH_ADMIN_{k.upper()}"]["valueFrom"]["secretKeyRef"] for k in ("username", "password")}
    assert {ref["name"] for ref in admin.values()} == {"mlflow-auth"}
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    # The auth config the server reads is mounted from the ConfigMap, and its store is the database.
    path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mount = next(m for m in server["volumeMounts"] if path.is_relative_to(m["mountPath"]))
    volume = next(v for v in mlflow["volumes"] if v["name"] == mount["name"])
    ini = one("ConfigMap", volume["configMap"]["name"])["data"][path.name]
    uri = re.search(r"^database_uri = (\S+)$", ini, re.M).group(1)
    assert uri.startswith("postgresql") and "@" not in uri and "admin_password" not in ini  # no secret in it
    assert "PGPASSWORD" in env and "valueFrom" in env["PGPASSWORD"]  # libpq's login for that URI
    # The driver (on the head, in both clusters) logs in with the same user.
    for where, cluster in cluster_specs():
        head = env_of(cluster["headGroupSpec"]["template"]["spec"]["containers"][0])
        for key in ("username", "password"):
            assert head[f"MLFLOW_TRACKING_{key.upper()}"]["valueFrom"]["secretKeyRef"] == admin[key], where


def test_only_the_ray_pods_reach_mlflow():
    policy = one("NetworkPolicy", "mlflow")["spec"]
    mlflow_labels = one("Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= mlflow_labels.items() and policy["policyTypes"] == ["Ingress"]
    sources = [f["podSelector"]["matchLabels"] for rule in policy["ingress"] for f in rule["from"]]
    assert sources and all(s for s in sources)  # {} would admit every pod
    for where, cluster in cluster_specs():
        head_labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]
        assert any(s.items() <= head_labels.items() for s in sources), where
    ports = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert ports == {one("Service", "mlflow")["spec"]["ports"][0]["port"]}


def test_mlflow_upgrades_its_schema_before_serving():
    spec = one("Deployment", "mlflow")["spec"]
    init = {c["name"]: c for c in spec["template"]["spec"]["initContainers"]}["db-upgrade"]
    server = spec["template"]["spec"]["containers"][0]
    script = " ".join(init["args"])
    assert 'mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"' in script
    assert "mlflow.server.auth db upgrade" in script
    assert init["image"] == server["image"]  # the schema of the MLflow that will serve it
    assert env_of(init)["MLFLOW_BACKEND_STORE_URI"] == env_of(server)["MLFLOW_BACKEND_STORE_URI"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"  # no old server on the new schema


def test_the_database_is_backed_up():
    cron = one("CronJob", "mlflow-postgres-backup")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    script = " ".join(container["args"])
    db = one("Service", "mlflow-postgres")["metadata"]["name"]
    assert f"pg_dump -h {db} -d mlflow -Fc" in script
    statefulset = one("StatefulSet", "mlflow-postgres")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == statefulset["image"]  # pg_dump of the server's major version
    mount = next(m for m in container["volumeMounts"] if script.count(m["mountPath"]) >= 2)
    claim = next(v for v in pod["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
    assert claim in KEPT_CLAIMS
    assert "pg_restore" in README.read_text()


@pytest.mark.parametrize("where,cluster", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_listener_group_is_ready_for_autoscaling(where, cluster):
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert 60 <= options["idleTimeoutSeconds"] <= 900 and options["upscalingMode"] in ("Default", "Aggressive")
    listener = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}["listener"]
    cfg = gpu_config().listener
    assert listener["minReplicas"] == 0 < cfg.num_workers < listener["maxReplicas"]
    # The pool's own bound: engines past the group's maxReplicas would never get a pod.
    assert cfg.autoscale.max_workers <= listener["maxReplicas"]
    assert "idleTimeoutSeconds" in readme_block("## 6.")


# --- issue 25: NCCL across pods ---------------------------------------------------------------------------
@pytest.mark.parametrize("where,cluster", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_weight_sync_pods_set_the_nccl_environment(where, cluster):
    """The learner's rank 0 broadcasts to the rollout engines across pods: both ends need the same NCCL
    settings (interface, logging, socket parallelism, a watchdog that outlasts a long generate)."""
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    wanted = None
    for name in ("rollout", "learner"):
        env = {k: v["value"] for k, v in env_of(groups[name]["template"]["spec"]["containers"][0]).items()
               if k.startswith(("NCCL_", "TORCH_NCCL_", "GLOO_"))}
        assert env["NCCL_DEBUG"] == "WARN" and env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"]
        assert int(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]) >= 1800
        assert int(env["NCCL_SOCKET_NTHREADS"]) * int(env["NCCL_NSOCKS_PERTHREAD"]) <= 64  # NCCL's limit
        assert wanted in (None, env), name
        wanted = env


def test_first_run_checklist_gives_a_verifying_command_for_each_item():
    checklist = readme_block("## First-run checklist")
    items = re.split(r"\n\d\. \*\*", checklist)[1:]
    titles = [item.split("**", 1)[0] for item in items]
    assert titles == ["Storage class.", "GPU node labels.", "Image.", "Secrets."]
    expected = {"Storage class.": "kubectl get storageclass", "GPU node labels.": "nvidia.com/gpu.memory>",
                "Image.": "kubectl kustomize deploy", "Secrets.": "describe secret mlflow-auth"}
    for title, item in zip(titles, items):
        blocks = re.findall(r"```bash\n(.*?)```", item, re.S)
        assert blocks and expected[title] in "".join(blocks), title
