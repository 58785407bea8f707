"""The listener pool's autoscaling rule and its resource arithmetic (pure functions, no Ray).

`ListenerPool` (actors/listener.py) calls `decide` every `listener.autoscale.interval_s` with the peak
backlog (requests queued or in flight) it saw since the previous call; the rule is the Kubernetes HPA's,
on the pool's own load instead of a CPU figure:

    wanted = clamp(ceil(backlog / target_backlog_per_worker), min_workers, max_workers)

- grow to `wanted` at once, unless the pool changed size less than `scale_up_cooldown_s` ago;
- shrink to `wanted` only once no tick has wanted the current size or more for `scale_down_cooldown_s`
  (the backlog of GRPO is bursty: every step sends its groups at once, then the learner trains);
- a manual `scale-listeners` pins the size for `override_hold_s`; `decide` is not called meanwhile.

Where it departs from the paper: the paper runs a fixed listener; autoscaling is an operations feature.
Unit tests: `pytest tests/unit/test_autoscale.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


class AutoscaleRule(Protocol):
    """The fields of `pipeline.config.AutoscaleConfig` the rule reads."""

    min_workers: int
    max_workers: int
    target_backlog_per_worker: float
    scale_up_cooldown_s: float
    scale_down_cooldown_s: float


@dataclass
class AutoscaleClock:
    """When the pool last changed size and when the load last wanted at least its current size."""

    last_change_s: float = -math.inf
    last_busy_s: float = -math.inf


def wanted_workers(backlog: int, rule: AutoscaleRule) -> int:
    """Workers that would hold `backlog` at the target per worker, within [min_workers, max_workers]."""
    need = math.ceil(backlog / rule.target_backlog_per_worker)
    return max(rule.min_workers, min(rule.max_workers, need))


def decide(now_s: float, current: int, backlog: int, rule: AutoscaleRule, clock: AutoscaleClock) -> int:
    """The size the pool should take now (== `current`: stay). Updates `clock.last_busy_s`."""
    wanted = wanted_workers(backlog, rule)
    if wanted >= current:
        clock.last_busy_s = now_s
    if wanted > current and now_s - clock.last_change_s >= rule.scale_up_cooldown_s:
        return wanted
    quiet_since = max(clock.last_busy_s, clock.last_change_s)
    if wanted < current and now_s - quiet_since >= rule.scale_down_cooldown_s:
        return wanted
    return current


def missing_for(bundle: dict[str, float], count: int, available: dict[str, float]) -> dict[str, tuple[float, float]]:
    """name -> (needed, free) for each resource that `count` actors of `bundle` need more of than is free."""
    return {name: (amount * count, available.get(name, 0.0)) for name, amount in bundle.items()
            if amount > 0 and amount * count > available.get(name, 0.0) + 1e-9}


def worker_bundle(options: dict) -> dict[str, float]:
    """The resources one actor created with Ray `options` asks for, by name (CPU, GPU, custom)."""
    bundle = {"CPU": float(options.get("num_cpus") or 0), "GPU": float(options.get("num_gpus") or 0)}
    bundle.update({name: float(amount) for name, amount in (options.get("resources") or {}).items()})
    return {name: amount for name, amount in bundle.items() if amount > 0}
