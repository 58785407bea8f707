"""The listener pool autoscaling on real tiny vLLM listeners: its size, backlog and scoring latency over time.

    LISTENER_AUTOSCALE_TIMELINE=/tmp/autoscale.json \
        .venv/bin/python -m pytest -m integration tests/integration/test_listener_autoscale.py -k autoscaling
    .venv/bin/python -m bench.autoscale /tmp/autoscale.json   # -> bench/results/autoscale.{json,png}

The timeline is the pool's `metrics()` (the `listener/*` figures the driver logs to MLflow every step),
read every 0.25 s by the integration test while it drives load up, stops it, then resizes by hand. This
script only draws it (no measuring here) and prints a few figures for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def summary(data: dict) -> dict[str, float]:
    """When the pool reached its max and came back to its min, and the latency at 1 and 2 workers."""
    rows = data["timeline"]
    grown = next((r["t_s"] for r in rows if r["listener/ready_workers"] >= data["rule"]["max_workers"]), math.nan)
    shrunk = next((r["t_s"] for r in rows if r["t_s"] > grown and r["listener/num_workers"] <= 1), math.nan)

    def mean_latency(workers: int) -> float:
        values = [r["listener/latency_mean_s"] for r in rows if r["listener/ready_workers"] == workers
                  and r["listener/latency_mean_s"] == r["listener/latency_mean_s"]]  # NaN: nothing answered
        return sum(values) / len(values) if values else math.nan

    return {"reached_max_at_s": grown, "back_to_min_at_s": shrunk,
            "peak_backlog": max(r["listener/backlog_peak"] for r in rows),
            "latency_mean_s_1_worker": mean_latency(1), "latency_mean_s_2_workers": mean_latency(2)}


def plot(data: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, rule = data["timeline"], data["rule"]
    t = [r["t_s"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(6.5, 6), sharex=True)
    axes[0].step(t, [r["listener/num_workers"] for r in rows], where="post", label="size (target)")
    axes[0].step(t, [r["listener/ready_workers"] for r in rows], where="post", label="ready", linestyle="--")
    axes[0].set(ylabel="workers", ylim=(0, rule["max_workers"] + 0.5),
                title=f"Listener autoscaling (min {rule['min_workers']}, max {rule['max_workers']}, target "
                      f"{rule['target_backlog_per_worker']:g}/worker, down cool-down {rule['scale_down_cooldown_s']:g} s)")
    axes[0].legend(fontsize=7, loc="upper right")
    axes[1].plot(t, [r["listener/backlog_peak"] for r in rows], label="backlog peak (queued + in flight)")
    axes[1].plot(t, [r["listener/queued"] for r in rows], label="queued now", linewidth=0.8)
    axes[1].set(ylabel="requests")
    axes[1].legend(fontsize=7, loc="upper right")
    axes[2].plot(t, [r["listener/latency_mean_s"] for r in rows], label="mean", marker=".", linewidth=0.8)
    axes[2].plot(t, [r["listener/latency_max_s"] for r in rows], label="max", marker=".", linewidth=0.8)
    axes[2].set(ylabel="scoring latency, s", xlabel="seconds")
    axes[2].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m bench.autoscale", description=__doc__.splitlines()[0])
    parser.add_argument("timeline", type=Path, help="JSON written by the integration test (see above).")
    parser.add_argument("--out", type=Path, default=RESULTS / "autoscale.png")
    args = parser.parse_args(argv)
    data = json.loads(args.timeline.read_text())
    figures = summary(data)
    (args.out.parent / "autoscale.json").write_text(json.dumps(data | {"summary": figures}))
    print(plot(data, args.out))
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
