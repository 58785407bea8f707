"""bench/e2e.py's arithmetic on a run's metric rows and CPU samples, the side-by-side ratio, and the TRL
reference's reward and settings (no run here: the numbers are by hand)."""

from __future__ import annotations

import pytest

from bench.e2e import PIPELINE_VARIANTS, WORKLOADS, comparison, step_rows, summarise, trl_configs_here
from bench.e2e_render import e2e_table


class Samples:
    """A sampler stand-in holding fixed samples: (time, busy core-seconds so far)."""

    def __init__(self, samples):
        from bench.e2e import TreeSampler

        self.samples = samples
        self.busy_between = TreeSampler.busy_between.__get__(self)
        self.peak_rss_by_kind = {"rollout": 2 * 2**30, "learner": 2**29}


def _row(step: int, at: float, step_s: float, completions: int, rollout_s: float, tokens: int) -> dict:
    return {"step": step, "timestamp_ms": at * 1000, "time/step_s": step_s, "time/rollout_s": rollout_s,
            "throughput/samples_per_s": completions / step_s, "throughput/rollout_tokens_per_s": tokens / rollout_s,
            "time/learn_s": 1.0, "sync/bytes": 10.0, "loss": 0.5, "learn/skipped": 0.0, "policy/staleness": 1.0}


def _machine() -> dict:
    return {"date_utc": "2026-12-05 04:00", "git_commit": "abcdef0123", "git_tree_dirty": False,
            "cpu_model": "AMD EPYC", "cores": 2, "bf16_units": False}


def test_per_step_seconds_rates_and_cpu_utilisation(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    # Busy core-seconds: 0 at t=100, 3 at t=110, 5 at t=112, 8 at t=114 (linear in between).
    sampler = Samples([(100.0, 0.0), (110.0, 3.0), (112.0, 5.0), (114.0, 8.0)])
    rows = [_row(0, 110.0, 9.0, 32, 4.0, 1000), _row(1, 112.0, 1.9, 32, 1.0, 640), _row(2, 114.0, 1.9, 32, 1.0, 1280)]
    steps = step_rows(rows, start=100.0, sampler=sampler)
    assert [s["seconds"] for s in steps] == [10.0, 2.0, 2.0]
    assert [s["completions_per_s"] for s in steps] == pytest.approx([3.2, 16.0, 16.0])
    assert [s["tokens_per_s"] for s in steps] == pytest.approx([100.0, 320.0, 640.0])
    assert [s["cpu_utilisation"] for s in steps] == pytest.approx([3 / 20, 2 / 4, 3 / 4])
    assert steps[1]["stages_s"] == {"time/step_s": 1.9, "time/rollout_s": 1.0, "time/learn_s": 1.0, "sync/bytes": 10.0}
    run = summarise("tiny", ["python", "-m", "pipeline", "train"], steps, sampler, 15.0)
    assert run["steps_counted"] == [1, 2]  # the first step is the warm-up
    assert run["s_per_step_median"] == 2.0 and run["s_per_step_range"] == [2.0, 2.0]
    assert run["completions_per_s"] == pytest.approx(64 / 4) and run["tokens_per_s"] == pytest.approx(1920 / 4)
    assert run["cpu_utilisation"] == pytest.approx((0.5 + 0.75) / 2)
    assert run["peak_rss_mib_by_kind"] == {"learner": 512, "rollout": 2048}
    assert run["first_step_s"] == 10.0  # from the process start: the start-up is in it


def test_with_staleness_1_the_pipelines_last_step_is_not_steady_and_not_counted(monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    sampler = Samples([(100.0, 0.0), (130.0, 60.0)])
    # Steady steps of 3 s, and a last one of 1.5 s: the learner alone, no next rollout beside it.
    ends = [110.0, 113.0, 116.0, 119.0, 120.5]
    rows = [_row(i, at, 2.5, 32, 2.0, 640) for i, at in enumerate(ends)]
    steps = step_rows(rows, start=100.0, sampler=sampler)
    run = summarise("mid", ["python", "-m", "pipeline", "train"], steps, sampler, 21.0, drain_steps=1)
    assert run["steps_counted"] == [1, 2, 3]
    assert run["s_per_step_median"] == 3.0 and run["s_per_step_range"] == [3.0, 3.0]
    assert run["completions_per_s"] == pytest.approx(96 / 9.0)
    counted_all = summarise("mid", ["python", "-m", "pipeline", "train"], steps, sampler, 21.0)
    assert counted_all["steps_counted"] == [1, 2, 3, 4] and counted_all["s_per_step_range"] == [1.5, 3.0]


def _run(side: str, s_per_step: float, **extra) -> dict:
    return {"side": side, "s_per_step_median": s_per_step, "s_per_step_range": [s_per_step, s_per_step],
            "completions_per_s": 32 / s_per_step, "tokens_per_s": 1000.0, "cpu_utilisation": 0.5,
            "stages_s_mean": {"time/learn_s": 0.25} if side == "pipeline" else {}, "configuration": side, **extra}


def test_the_ratio_is_against_the_fastest_trl_configuration_of_the_same_invocation() -> None:
    runs = {"tiny-s1": _run("pipeline", 0.5, max_staleness=1), "tiny-s0": _run("pipeline", 0.8, max_staleness=0),
            "tiny-trl-defaults": _run("trl", 0.9, trl_config="defaults"),
            "tiny-trl-no_gc": _run("trl", 0.6, trl_config="no_gc")}
    cmp = comparison(runs)
    assert cmp["fastest_trl"] == "tiny-trl-no_gc" and cmp["fastest_trl_s_per_step"] == 0.6
    assert cmp["ratios"] == pytest.approx({"tiny-s1": 0.6 / 0.5, "tiny-s0": 0.6 / 0.8})
    assert comparison({"tiny-s1": runs["tiny-s1"]}) is None  # no TRL run: no ratio at all
    table = "\n".join(e2e_table({"workloads": {"tiny": {"machine": _machine(), "runs": runs, "comparison": cmp}}}))
    assert "**tiny**: measured 2026-12-05 04:00 UTC, commit abcdef0, AMD EPYC, 2 cores, bf16 units no" in table
    assert "| pipeline | pipeline | 0.50 (0.50-0.50) | 64.00 | 1000 | 50% | **1.20x** | 0.25 |  |" in table
    assert "| trl | trl | 0.60 (0.60-0.60) | 53.33 | 1000 | 50% | fastest TRL |  |  |" in table


def test_a_variant_gets_its_own_ratio_and_each_run_shows_its_first_step() -> None:
    runs = {"tiny-s1": _run("pipeline", 0.5, first_step_s=30.0),
            "tiny-s1-compiled": _run("pipeline", 0.4, variant="compiled", first_step_s=47.5,
                                     configuration="max_staleness 1, rollout.engine.enforce_eager=false"),
            "tiny-trl-no_gc": _run("trl", 0.6, trl_config="no_gc")}
    cmp = comparison(runs)
    assert cmp["ratios"] == pytest.approx({"tiny-s1": 1.2, "tiny-s1-compiled": 1.5})
    table = "\n".join(e2e_table({"workloads": {"tiny": {"machine": _machine(), "runs": runs, "comparison": cmp}}}))
    assert "| pipeline | pipeline | 0.50 (0.50-0.50) | 64.00 | 1000 | 50% | **1.20x** | 0.25 |  | 30.0 |" in table
    assert ("| pipeline | max_staleness 1, rollout.engine.enforce_eager=false | 0.40 (0.40-0.40) | 80.00 | 1000 | 50% "
            "| **1.50x** | 0.25 |  | 47.5 |") in table
    assert "| trl | trl | 0.60 (0.60-0.60) | 53.33 | 1000 | 50% | fastest TRL |  |  |  |" in table  # none recorded


def test_every_variant_is_overrides_the_config_accepts() -> None:
    from pipeline.config import load_config

    cfg = load_config("configs/tiny_cpu.yaml", PIPELINE_VARIANTS["compiled"])
    assert cfg.rollout.engine.enforce_eager is False and cfg.listener.engine.enforce_eager is False
    assert load_config("configs/tiny_cpu.yaml").rollout.engine.enforce_eager is True  # the default it departs from


def test_bf16_configurations_run_only_on_cpus_with_bf16_units() -> None:
    assert trl_configs_here(["defaults", "no_gc", "bf16"], bf16_units=False) == (["defaults", "no_gc"], ["bf16"])
    assert trl_configs_here(["defaults", "no_gc", "bf16"], bf16_units=True) == (["defaults", "no_gc", "bf16"], [])


def test_the_trl_reward_is_the_pipelines_without_the_listener() -> None:
    from bench.trl_reference import reward_without_listener

    good = "<think>Image 1 shows a red circle.</think><answer>2</answer>"
    completions = [[{"role": "assistant", "content": good}], [{"role": "assistant", "content": good}],
                   [{"role": "assistant", "content": "no format"}]]
    assert reward_without_listener(completions, preferred=[2, 1, 2]) == [1.5, 1.0, 0.0]


def test_the_workloads_are_the_issues() -> None:
    mid, tiny = WORKLOADS["mid"]["overrides"], WORKLOADS["tiny"]["overrides"]
    for key in ("data.pairs_per_step=16", "rollout.group_size=8", "rollout.max_new_tokens=128", "data.image_size=64",
                "trainer.steps=6", "trainer.checkpoint_every=1000", "learner.lr=1e-5",
                "reward.drop_zero_variance=false"):
        assert key in mid
    for key in ("data.pairs_per_step=8", "rollout.group_size=4", "rollout.max_new_tokens=64",
                "rollout.engine.dtype=float32", "listener.engine.dtype=float32"):
        assert key in tiny
    for name, w in WORKLOADS.items():  # TRL's side reads the same figures
        assert f"data.pairs_per_step={w['pairs']}" in w["overrides"]
        assert f"rollout.group_size={w['group_size']}" in w["overrides"]
        assert f"rollout.max_new_tokens={w['max_new_tokens']}" in w["overrides"]
        assert f"trainer.steps={w['steps']}" in w["overrides"]


def test_the_scaling_sweep_renders_one_table_and_one_plot(tmp_path) -> None:
    from bench.e2e_render import scaling_table
    from bench.report import scaling_plot

    runs = {f"mid-p{p}-l{L}-s{s}": {**_run("pipeline", 10.0 * p / 16 + L - s), "pairs": p, "listeners": L,
                                    "max_staleness": s}
            for p, L, s in [(8, 1, 1), (16, 1, 1), (32, 1, 1), (16, 1, 0), (16, 2, 0), (16, 2, 1)]}
    result = {"workload": "mid", "machine": _machine(), "runs": runs}
    table = "\n".join(scaling_table(result))
    assert "| 32 | 1 | 1 | 20.00 | 1.60 | 50% | 0.25 |" in table and "| 16 | 2 | 0 | 12.00 |" in table
    path = scaling_plot(result, tmp_path / "scaling.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trl_steps_run_from_one_step_end_to_the_next(monkeypatch) -> None:
    from bench.e2e import trl_step_rows

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    sampler = Samples([(100.0, 0.0), (104.0, 6.0), (106.0, 10.0), (108.0, 12.0)])
    trl = {"train_start": 100.0, "steps": [{"step": 1, "end": 104.0, "completions": 32, "tokens": 2000},
                                           {"step": 2, "end": 106.0, "completions": 32, "tokens": 1900},
                                           {"step": 3, "end": 108.0, "completions": 32, "tokens": 1800}]}
    steps = trl_step_rows(trl, sampler)
    assert [s["seconds"] for s in steps] == [4.0, 2.0, 2.0]
    assert [s["cpu_utilisation"] for s in steps] == pytest.approx([6 / 8, 4 / 4, 2 / 4])
    assert [s["tokens_per_s"] for s in steps] == pytest.approx([500.0, 950.0, 900.0])
    run = summarise("tiny", ["python", "-m", "bench.trl_reference"], steps, sampler, 10.0)
    assert run["s_per_step_median"] == 2.0 and run["completions_per_s"] == pytest.approx(16.0)


def test_trls_first_step_counts_from_its_process_start_like_the_pipelines(monkeypatch, tmp_path) -> None:
    import json

    import bench.e2e as e2e

    trl = {"train_start": 130.0, "steps": [{"step": 1, "end": 134.0, "completions": 32, "tokens": 2000},
                                           {"step": 2, "end": 136.0, "completions": 32, "tokens": 1900}],
           "settings": {"bf16": False, "gradient_checkpointing": False}, "versions": {}, "threads": 2}

    def process_started_at_100(command, log_path, env=None):  # no subprocess: the run's JSON is written here
        (tmp_path / "tiny-trl-no_gc.json").write_text(json.dumps(trl))
        return Samples([(100.0, 0.0), (136.0, 60.0)]), 100.0

    monkeypatch.setattr(e2e, "sampled_run", process_started_at_100)
    monkeypatch.setattr(e2e, "checkpoints", lambda size, models: (models / "reasoner", models / "listener"))
    run = e2e.run_trl("tiny", "no_gc", tmp_path, tmp_path)
    assert run["first_step_s"] == 34.0  # imports and model loading (30 s before train()) included
    assert [s["seconds"] for s in run["steps"]] == [4.0, 2.0]  # the steps themselves still from train()


def test_the_allocator_each_side_ran_on_is_named() -> None:
    from bench.e2e import allocator_name

    assert allocator_name({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}) == "tcmalloc"
    assert allocator_name({}) == "glibc malloc"
    assert allocator_name({"LD_PRELOAD": "/opt/libjemalloc.so.2"}) == "LD_PRELOAD=/opt/libjemalloc.so.2"


def _steps(first: float, seconds: list[float]) -> list[dict]:
    return [{"step": i, "seconds": s, "completions": 32, "tokens": 640, "cpu_utilisation": 0.5, "stages_s": {}}
            for i, s in enumerate([first, *seconds])]


def test_rounds_run_every_configuration_in_rotation_and_pool_each_ones_steps(monkeypatch, tmp_path) -> None:
    import importlib.util

    import bench.e2e as e2e

    calls: list[tuple[str, str]] = []
    pipeline_rounds = iter([[1.0, 1.2], [1.4, 1.6]])  # the machine slows down between the rounds
    trl_rounds = iter([[2.0, 2.0], [3.0, 3.0]])

    def pipeline(workload, staleness, workdir, models, extra=(), name=None):  # no run: its steps by hand
        calls.append((workdir.name, name))
        run = summarise(workload, ["python", "-m", "pipeline"], _steps(30.0, next(pipeline_rounds)), Samples([]), 40.0)
        return {**run, "side": "pipeline", "max_staleness": staleness, "configuration": "defaults"}

    def trl(workload, config, workdir, models):
        calls.append((workdir.name, f"{workload}-trl-{config}"))
        run = summarise(workload, ["python", "-m", "bench.trl_reference"], _steps(10.0, next(trl_rounds)),
                        Samples([]), 20.0)
        return {**run, "side": "trl", "trl_config": config, "configuration": config}

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "trl" else find_spec(name, *a))
    monkeypatch.setattr(e2e, "run_pipeline", pipeline)
    monkeypatch.setattr(e2e, "run_trl", trl)
    monkeypatch.setattr(e2e, "e2e_plot", lambda result, path: None)
    result = e2e.main(["--workloads", "tiny", "--trl-configs", "no_gc", "--repeats", "2", "--out",
                       str(tmp_path / "e2e.json")])
    assert calls == [("r0", "tiny-s1"), ("r0", "tiny-trl-no_gc"), ("r1", "tiny-s1"), ("r1", "tiny-trl-no_gc")]
    entry = result["workloads"]["tiny"]
    ours, theirs = entry["runs"]["tiny-s1"], entry["runs"]["tiny-trl-no_gc"]
    assert ours["s_per_step_median"] == pytest.approx(1.3) and ours["s_per_step_range"] == [1.0, 1.6]
    assert [r["s_per_step_median"] for r in ours["repeats"]] == pytest.approx([1.1, 1.5])
    assert ours["completions_per_s"] == pytest.approx(4 * 32 / 5.2) and ours["first_step_s"] == 30.0
    assert theirs["s_per_step_median"] == 2.5
    assert entry["rounds"] == 2 and entry["comparison"]["ratios"] == pytest.approx({"tiny-s1": 2.5 / 1.3})
    assert entry["comparison"]["ratios_per_round"]["tiny-s1"] == pytest.approx([2.0 / 1.1, 3.0 / 1.5])
    table = "\n".join(e2e_table(result))
    assert "2 rounds in rotation" in table and "**1.92x** (rounds 1.82, 2.00)" in table


def test_one_round_is_the_run_itself() -> None:
    from bench.e2e import pooled

    run = summarise("tiny", ["python"], _steps(30.0, [1.0, 2.0]), Samples([]), 40.0)
    assert pooled([run]) is run
