"""The listener experiment's report (bench/learning.py runs it): per arm the spread over seeds of each
endpoint figure and the pooled agreement splits, the paired contrasts, the plot, the printed table and the
markdown for docs/listener.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.learning_stats import experiment_verdict, paired_difference

CONTRASTS = (("on", "off"), ("on", "placebo"), ("on", "oracle"))  # the first two are primary
SPLITS = {"heldout": "eval", "ood": "eval_ood"}


def as_float(value: Any) -> float:
    return float("nan") if value is None else float(value)



def spread(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], dtype=float)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
            "n": int(v.size)}


def pooled_split(splits: list[dict]) -> dict[str, float]:
    """Agreement splits of several runs summed (their counts), rates recomputed."""
    keys = ("judged", "agree", "contradict")
    total = {k: sum(s[k] for s in splits) for k in keys}
    right_agree = sum(s["accuracy_when_agree"] * s["agree"] for s in splits if s["agree"])
    right_contra = sum(s["accuracy_when_contradict"] * s["contradict"] for s in splits if s["contradict"])
    nan = float("nan")
    return {**total, "agree_rate": total["agree"] / total["judged"] if total["judged"] else nan,
            "contradiction_rate": total["contradict"] / total["judged"] if total["judged"] else nan,
            "accuracy_when_agree": right_agree / total["agree"] if total["agree"] else nan,
            "accuracy_when_contradict": right_contra / total["contradict"] if total["contradict"] else nan}


def summarise(runs: dict[str, dict], arms: list[str]) -> tuple[dict, dict]:
    """Per arm: spread over seeds of each endpoint figure and the pooled agreement splits; the contrasts."""
    by_arm = {arm: {r["seed"]: r for k, r in runs.items() if k.startswith(f"{arm}/")} for arm in arms}
    summary = {}
    for arm, seeds in by_arm.items():
        if not seeds:
            continue
        keys = next(iter(seeds.values()))["endpoint"]
        summary[arm] = {"seeds": sorted(seeds), "endpoint": {k: spread([r["endpoint"][k] for r in seeds.values()])
                                                             for k in keys},
                        "agreement": {who: {split: pooled_split([r[who][split] for r in seeds.values() if who in r])
                                            for split in SPLITS}
                                      for who in ("agreement_listener1", "agreement_listener2")}}
    primary = "ood/accuracy"
    contrasts = {f"{a} - {b}": paired_difference({s: r["endpoint"][primary] for s, r in by_arm[a].items()},
                                                 {s: r["endpoint"][primary] for s, r in by_arm[b].items()})
                 for a, b in CONTRASTS if a in by_arm and b in by_arm}
    return summary, contrasts


def plot(runs: dict[str, dict], arms: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("curve", "ood/accuracy", "OOD accuracy (render-white): the endpoint"),
              ("curve", "heldout/accuracy", "held-out accuracy (render-saturated)"),
              ("train", "faithful", "faithful descriptions (training samples)"),
              ("train", "contradiction_rate", "contradiction rate (training, listener 1)")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (part, key, title) in zip(axes.flat, panels):
        for arm in arms:
            members = [r for k, r in runs.items() if k.startswith(f"{arm}/")]
            if not members:
                continue
            steps = sorted({p["step"] for r in members for p in r[part]})
            by_step = [[as_float(p[key]) for r in members for p in r[part] if p["step"] == s] for s in steps]
            mean = [np.nanmean(v) if not all(np.isnan(v)) else np.nan for v in by_step]
            line, = ax.plot(steps, mean, label=f"{arm} ({len(members)} seeds)", marker="o" if part == "curve" else None,
                            markersize=3)
            ax.fill_between(steps, [np.nanmin(v) for v in by_step], [np.nanmax(v) for v in by_step],
                            color=line.get_color(), alpha=0.12, linewidth=0)
        ax.set(title=title, ylim=(0.0, 1.02))
    for ax in axes[1]:
        ax.set_xlabel("GRPO updates")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle("listener experiment (docs/listener.md): mean over seeds, band = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def print_table(summary: dict, contrasts: dict) -> None:
    def fmt(s: dict) -> str:
        return f"{s['mean']:.3f}+-{s['std']:.3f}"

    print(f"\n{'arm':8} {'OOD acc':>13} {'OOD format':>13} {'OOD acc wf':>13} {'held-out':>13} {'faithful':>13}")
    for arm, s in summary.items():
        e = s["endpoint"]
        print(f"{arm:8} {fmt(e['ood/accuracy']):>13} {fmt(e['ood/format_rate']):>13} "
              f"{fmt(e['ood/accuracy_well_formed']):>13} {fmt(e['heldout/accuracy']):>13} "
              f"{fmt(e['heldout/faithful']):>13}")
    for name, c in contrasts.items():
        print(f"{name:18} {c['mean']:+.3f}  95% CI [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]  {c['verdict']}")
    print(f"verdict (docs/listener.md, on - off and on - placebo): {experiment_verdict(contrasts)}")


def _timing(report: dict) -> str:
    runs = f"the runs' own times sum to {report['runs_wall_s'] / 60:.1f} min"
    if not report.get("parallel"):  # --report-only, or a report from before runs went side by side
        return runs
    return (f"the invocation took {report['wall_s'] / 60:.1f} min ({report['parallel']} runs at a time on "
            f"{report['cores_per_run']} core(s) each; warm starts {report['warm_start_build_s'] / 60:.1f} min; {runs})")


def markdown(report: dict) -> str:
    """The endpoint, the contrasts and the agreement splits as markdown tables (for docs/listener.md)."""
    def f(s: dict) -> str:
        return f"{s['mean']:.3f} +- {s['std']:.3f}" if s["n"] else "n/a"

    lines = [f"{report['endpoint']}; {len(report['runs'])} runs, {report['steps']} updates, "
             f"{report['eval_pairs']} pairs per split; {_timing(report)}; bench/results/learning.json", "",
             "| arm | seeds | OOD accuracy (endpoint) | OOD format rate | OOD accuracy, well-formed | held-out accuracy "
             "| faithful (held-out eval) |", "|---|---|---|---|---|---|---|"]
    for arm, s in report["arms_summary"].items():
        e = s["endpoint"]
        lines.append(f"| {arm} | {len(s['seeds'])} | {f(e['ood/accuracy'])} | {f(e['ood/format_rate'])} | "
                     f"{f(e['ood/accuracy_well_formed'])} | {f(e['heldout/accuracy'])} | {f(e['heldout/faithful'])} |")
    lines += ["", "| contrast (OOD endpoint, paired by seed) | per seed | mean | 95% bootstrap CI | verdict "
              "| 95% t interval (sensitivity) |", "|---|---|---|---|---|---|"]
    for name, c in report["contrasts"].items():
        per_seed = ", ".join(f"{d:+.3f}" for d in c["per_seed"])
        t_low, t_high = c.get("t_ci95", [float("nan")] * 2)
        lines.append(f"| {name} | {per_seed} | {c['mean']:+.3f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | "
                     f"{c['verdict']} | [{t_low:+.3f}, {t_high:+.3f}] |")
    lines += ["", f"Verdict by the design's rule (both primary contrasts, on - off and on - placebo): "
              f"**{report.get('verdict', experiment_verdict(report['contrasts']))}**."]
    lines += ["", "| arm | listener | split | judged | agree rate | accuracy when agree | accuracy when contradict |",
              "|---|---|---|---|---|---|---|"]
    for arm, s in report["arms_summary"].items():
        for who, label in (("agreement_listener1", "training (last 4 evals)"), ("agreement_listener2",
                                                                                 "second (last eval)")):
            for split, a in s["agreement"].get(who, {}).items():
                lines.append(f"| {arm} | {label} | {split} | {a['judged']} | {a['agree_rate']:.3f} | "
                             f"{a['accuracy_when_agree']:.3f} | {a['accuracy_when_contradict']:.3f} |")
    lines += ["", "| listener | task | faithful: p(preferred) / toward the text | swapped: p / toward the text "
              "| empty: p / right |", "|---|---|---|---|---|"]
    for name, tasks in report.get("listener_checks", {}).items():
        for task, r in tasks.items():
            lines.append(f"| {name} | {task} | " + " | ".join(
                f"{r[k]['p_preferred_mean']:.3f} / {100 * r[k]['accuracy']:.0f}%" for k in ("faithful", "swapped", "empty"))
                + " |")
    return "\n".join(lines) + "\n"
