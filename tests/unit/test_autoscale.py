"""The listener pool's autoscaling rule (pipeline/autoscale.py) and its config (`listener.autoscale`)."""

from __future__ import annotations

import pytest

from pipeline.autoscale import AutoscaleClock, decide, missing_for, wanted_workers, worker_bundle
from pipeline.config import AutoscaleConfig, ConfigError, load_config

RULE = AutoscaleConfig(enabled=True, min_workers=1, max_workers=3, target_backlog_per_worker=4,
                       scale_up_cooldown_s=10, scale_down_cooldown_s=60)


@pytest.mark.parametrize(("backlog", "wanted"), [(0, 1), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3), (100, 3)])
def test_wanted_workers_is_the_backlog_over_the_target_within_the_bounds(backlog: int, wanted: int) -> None:
    assert wanted_workers(backlog, RULE) == wanted


def test_growth_is_at_once_then_waits_for_the_up_cooldown() -> None:
    clock = AutoscaleClock()
    assert decide(0.0, 1, 12, RULE, clock) == 3  # never resized: grow straight to what the backlog wants
    clock.last_change_s = 0.0
    assert decide(5.0, 2, 12, RULE, clock) == 2  # 5 s < scale_up_cooldown_s
    assert decide(10.0, 2, 12, RULE, clock) == 3


def test_shrink_waits_until_no_check_wanted_the_size_for_the_down_cooldown() -> None:
    clock = AutoscaleClock(last_change_s=0.0)
    assert decide(1.0, 3, 12, RULE, clock) == 3  # busy at 3: the quiet period starts after this
    assert clock.last_busy_s == 1.0
    assert decide(30.0, 3, 0, RULE, clock) == 3
    assert decide(60.0, 3, 12, RULE, clock) == 3  # a burst (a new GRPO step) restarts the quiet period
    assert decide(119.0, 3, 0, RULE, clock) == 3
    assert decide(120.0, 3, 0, RULE, clock) == 1  # 60 s quiet: straight down to what the load wants
    assert decide(120.0, 3, 6, RULE, clock) == 2


def test_a_size_outside_the_bounds_is_brought_back_within_them() -> None:
    # After a manual resize's hold: below min grows at once, above max shrinks after the quiet period.
    assert decide(0.0, 1, 0, RULE.model_copy(update={"min_workers": 2}), AutoscaleClock()) == 2
    clock = AutoscaleClock(last_change_s=0.0)
    assert decide(30.0, 5, 100, RULE, clock) == 5 and decide(60.0, 5, 100, RULE, clock) == 3


def test_missing_resources_name_what_the_new_workers_lack() -> None:
    bundle = worker_bundle({"num_cpus": 1, "num_gpus": 0, "resources": {"listener": 1}})
    assert bundle == {"CPU": 1.0, "listener": 1.0}
    assert missing_for(bundle, 2, {"CPU": 5.0, "listener": 1.0}) == {"listener": (2.0, 1.0)}
    assert missing_for(bundle, 2, {"CPU": 5.0, "listener": 2.0}) == {}


def test_autoscale_config_is_typed_and_its_bounds_checked() -> None:
    cfg = load_config(None, ["listener.autoscale.enabled=true", "listener.autoscale.max_workers=3",
                             "listener.num_workers=2"])
    assert cfg.listener.autoscale.enabled and cfg.listener.autoscale.max_workers == 3
    assert not load_config(None).listener.autoscale.enabled  # off unless asked
    with pytest.raises(ConfigError, match=r"min_workers \(4\) > max_workers \(2\)"):
        load_config(None, ["listener.autoscale.min_workers=4", "listener.autoscale.max_workers=2"])
    with pytest.raises(ConfigError, match=r"num_workers \(5\) outside autoscale"):
        load_config(None, ["listener.autoscale.enabled=true", "listener.num_workers=5"])
    with pytest.raises(ConfigError, match="listener.autoscale.target_backlog_per_worker"):
        load_config(None, ["listener.autoscale.target_backlog_per_worker=0"])
