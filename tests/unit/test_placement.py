"""pipeline/placement.py without a cluster: what a run needs, and the refusal of a run the cluster cannot hold.

`check_cluster_fits(cfg, available)` is pure (the driver passes it `ray.cluster_resources()`); the
refusal is one line naming the resource, what the run needs and what the cluster has. The CLI end of it
(a GPU asked for on this GPU-less machine): tests/e2e/test_cli_refusals.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.placement import check_cluster_fits, local_cluster_resources, required_resources

REPO = Path(__file__).resolve().parents[2]
CPU_CLUSTER = {"CPU": 8.0, "rollout": 8.0, "listener": 8.0, "learner": 8.0}  # like tests/conftest.py's ray_local


def test_required_resources_add_up_per_actor_kind_by_hand() -> None:
    cfg = load_config(None, ["rollout.num_workers=2", "rollout.num_cpus=1.5", "rollout.num_gpus=0.5",
                             "listener.num_workers=3", "listener.num_gpus=0.25", "learner.num_ranks=2",
                             "learner.num_gpus=1", "learner.resource=trainer"])
    # CPU: 2 x 1.5 + 3 x 1 + 2 x 1 = 8; GPU: 2 x 0.5 + 3 x 0.25 + 2 x 1 = 3.75; one custom unit per actor.
    assert required_resources(cfg) == {"CPU": 8.0, "GPU": 3.75, "rollout": 2.0, "listener": 3.0, "trainer": 2.0}


def test_the_default_run_fits_a_cpu_cluster() -> None:
    check_cluster_fits(load_config(), CPU_CLUSTER)


def test_a_run_that_fits_exactly_is_accepted() -> None:
    cfg = load_config(None, ["rollout.num_gpus=0.5", "rollout.num_workers=2"])
    check_cluster_fits(cfg, {**CPU_CLUSTER, "GPU": 1.0})  # 2 x 0.5 GPUs == 1: fits, no float slack needed


@pytest.mark.parametrize("overrides, available, message", [
    (["rollout.num_gpus=1"], CPU_CLUSTER, "the run needs 1 GPU but the Ray cluster has 0"),
    (["learner.num_gpus=1", "learner.num_ranks=4"], {**CPU_CLUSTER, "GPU": 2.0},
     "needs 4 GPU but the Ray cluster has 2"),
    (["rollout.num_workers=3", "rollout.num_cpus=4"], CPU_CLUSTER, "needs 14 CPU but the Ray cluster has 8"),
    (["listener.num_workers=9"], {**CPU_CLUSTER, "CPU": 64.0}, "needs 9 listener but the Ray cluster has 8"),
    (["learner.resource=tpu-pod"], CPU_CLUSTER, "needs 1 tpu-pod but the Ray cluster has 0"),
])
def test_a_run_the_cluster_cannot_hold_is_refused_in_one_line(overrides, available, message) -> None:
    with pytest.raises(ConfigError) as info:
        check_cluster_fits(load_config(None, overrides), available)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_local_cluster_the_driver_starts_holds_every_cpu_config(path: Path) -> None:
    cfg = load_config(path)
    if required_resources(cfg)["GPU"] > 0:
        pytest.skip("a GPU config: the local cluster gets the machine's GPUs from Ray, not from this function")
    local = local_cluster_resources(cfg)
    check_cluster_fits(cfg, {"CPU": local["num_cpus"], "GPU": 0.0, **local["resources"]})


def test_the_local_cluster_leaves_room_for_the_listener_pool_to_autoscale() -> None:
    fixed = local_cluster_resources(load_config(None, ["listener.num_workers=1"]))
    scaling = local_cluster_resources(load_config(None, [
        "listener.num_workers=1", "listener.autoscale.enabled=true", "listener.autoscale.min_workers=1",
        "listener.autoscale.max_workers=3", "listener.num_cpus=1"]))
    # The pool may add 2 engines: 2 more listener units and 2 more CPUs than the same run without autoscaling.
    assert fixed["resources"]["listener"] == 1 and scaling["resources"]["listener"] == 3
    assert scaling["num_cpus"] == fixed["num_cpus"] + 2


def test_a_local_clusters_openmp_threads_sleep_when_idle_unless_the_user_chose() -> None:
    from pipeline.placement import local_cluster_env

    assert local_cluster_env({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert local_cluster_env({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}


def test_a_cpu_run_preloads_tcmalloc_where_found_and_a_gpu_run_or_the_opt_out_does_not() -> None:
    from pipeline.placement import local_cluster_env

    tc = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    assert local_cluster_env({}, tcmalloc=tc)["LD_PRELOAD"] == tc
    assert local_cluster_env({"LD_PRELOAD": "/opt/libfoo.so"}, tcmalloc=tc)["LD_PRELOAD"] == f"{tc}:/opt/libfoo.so"
    assert "LD_PRELOAD" not in local_cluster_env({}, uses_gpu=True, tcmalloc=tc)
    assert "LD_PRELOAD" not in local_cluster_env({"LISTENER_GRPO_TCMALLOC": "0"}, tcmalloc=tc)
    assert "LD_PRELOAD" not in local_cluster_env({}, tcmalloc=None)  # not installed: glibc's malloc


def test_a_user_preloaded_allocator_is_kept() -> None:
    from pipeline.placement import with_preloaded

    assert with_preloaded("/usr/lib/libjemalloc.so.2", "/tc.so") == "/usr/lib/libjemalloc.so.2"
    assert with_preloaded("/a.so /usr/lib/libtcmalloc.so.4", "/tc.so") == "/a.so /usr/lib/libtcmalloc.so.4"
    assert with_preloaded("", "/tc.so") == "/tc.so"
    assert with_preloaded("/a.so /b.so", "/tc.so") == "/tc.so:/a.so:/b.so"  # either separator is read


def test_tcmalloc_is_the_first_candidate_present(tmp_path) -> None:
    from pipeline.placement import tcmalloc_path

    second = tmp_path / "lib64" / "libtcmalloc_minimal.so.4"
    second.parent.mkdir()
    second.write_bytes(b"")
    assert tcmalloc_path((str(tmp_path / "missing.so.4"), str(second))) == str(second)
    assert tcmalloc_path((str(tmp_path / "missing.so.4"),)) is None
