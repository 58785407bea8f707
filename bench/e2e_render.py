"""The tables and plots of `python -m bench.e2e` (bench/results/e2e.json, e2e_scaling.json), rendered by
the benchmark itself and again by `python -m bench.report` into BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def e2e_table(result: dict[str, Any]) -> list[str]:
    out = ["", "End to end, side by side (bench/results/e2e.json, `python -m bench.e2e`): whole runs of `python -m "
           "pipeline train` and of TRL's `GRPOTrainer` (bench/trl_reference.py), one after the other, steady steps "
           "(not the first; not the pipeline's last with staleness 1); "
           "ratio = the fastest TRL configuration's s/step / the pipeline's", ""]
    for workload, entry in result.get("workloads", {}).items():
        m, cmp = entry["machine"], entry.get("comparison") or {}
        out += [f"**{workload}**: measured {m['date_utc']} UTC, commit {m['git_commit'][:7]}"
                f"{' (uncommitted changes)' if m.get('git_tree_dirty') else ''}, {m['cpu_model']}, {m['cores']} cores, "
                f"bf16 units {'yes' if m['bf16_units'] else 'no'}"
                + (f", {entry['rounds']} rounds in rotation (figures over every round's steps)"
                   if entry.get("rounds", 1) > 1 else "")
                + (f", load average {m['load_average_at_start'][0]:.1f} at the start (other jobs: noisier figures)"
                   if m.get("load_average_at_start", [0])[0] > 1.5 * m["cores"] else ""), "",
                "| side | configuration | s/step (median, range) | completions/s | tokens/s | CPU util | "
                "vs fastest TRL | learn s | rollout wait s | first step s (start-up included) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for name, run in sorted(entry["runs"].items(), key=lambda kv: (kv[1]["side"] != "pipeline", kv[0])):
            st, (low, high) = run["stages_s_mean"], run["s_per_step_range"]
            ratio = cmp.get("ratios", {}).get(name)
            mark = "fastest TRL" if name == cmp.get("fastest_trl") else (f"**{ratio:.2f}x**" if ratio else "")
            if name in cmp.get("ratios_per_round", {}):
                mark += " (rounds " + ", ".join(f"{r:.2f}" for r in cmp["ratios_per_round"][name]) + ")"
            stages = [f"{st[k]:.2f}" if k in st else "" for k in ("time/learn_s", "time/rollout_wait_s")]
            out.append(f"| {run['side']} | {run['configuration']} | {run['s_per_step_median']:.2f} ({low:.2f}-"
                       f"{high:.2f}) | {run['completions_per_s']:.2f} | {run['tokens_per_s']:.0f} | "
                       f"{100 * run['cpu_utilisation']:.0f}% | {mark} | {' | '.join(stages)} | "
                       f"{_seconds(run.get('first_step_s'))} |")
        out.append("")
    return out


def _seconds(value: float | None) -> str:
    return "" if value is None or value != value else f"{value:.1f}"  # older entries: none recorded


def e2e_plot(result: dict[str, Any], path: Path) -> Path | None:
    """s/step per workload: every TRL configuration beside the pipeline, the ratio over each pipeline bar."""
    workloads = result.get("workloads", {})
    if not workloads:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(workloads), figsize=(4.6 * len(workloads), 3.4), squeeze=False)
    for ax, (workload, entry) in zip(axes[0], workloads.items()):
        runs = sorted(entry["runs"].items(), key=lambda kv: (kv[1]["side"] != "trl", kv[0]))
        ratios = (entry.get("comparison") or {}).get("ratios", {})
        labels = [run.get("trl_config", f"pipeline\nstaleness {run.get('max_staleness')}"
                          + (f"\n{run['variant']}" if run.get("variant") else "")) for _, run in runs]
        values = [run["s_per_step_median"] for _, run in runs]
        ax.bar(range(len(values)), values, color=["grey" if r["side"] == "trl" else "tab:blue" for _, r in runs])
        for x, (name, _) in enumerate(runs):
            if name in ratios:
                ax.annotate(f"{ratios[name]:.2f}x", (x, values[x]), ha="center", va="bottom", fontsize=8)
        ax.set(xticks=range(len(values)), ylabel="seconds per step (median)",
               title=f"{workload}, {entry['machine']['date_utc'][:10]}: TRL (grey) vs pipeline")
        ax.set_xticklabels(labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling_table(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    out = ["", f"Scaling (bench/results/e2e_scaling.json, `python -m bench.e2e --scaling`): {result['workload']}, "
           f"measured {m['date_utc']} UTC, commit {m['git_commit'][:7]}, {m['cpu_model']}, {m['cores']} cores", "",
           "| pairs/step | listeners | max_staleness | s/step (median) | completions/s | CPU util | learn s |",
           "|---|---|---|---|---|---|---|"]
    for run in result["runs"].values():
        out.append(f"| {run['pairs']} | {run['listeners']} | {run['max_staleness']} | {run['s_per_step_median']:.2f} | "
                   f"{run['completions_per_s']:.2f} | {100 * run['cpu_utilisation']:.0f}% | "
                   f"{run['stages_s_mean'].get('time/learn_s', float('nan')):.2f} |")
    return out
