"""pipeline/placement.py on a real local Ray cluster (no engines): the learner ranks take the bundles of one
placement group, and the listener pool's and reward aggregator's options pin an actor to the head node."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.placement import _learner_group, _on_head_node, head_node_id

pytestmark = pytest.mark.integration


class Probe:
    def where(self) -> tuple[str, str | None]:
        import ray

        context = ray.get_runtime_context()
        group = context.get_placement_group_id()
        return context.get_node_id(), group


def test_learner_ranks_share_one_placement_group(ray_local) -> None:
    cfg = load_config(None, ["learner.num_ranks=2", "learner.placement=strict_pack"])
    group, options = _learner_group(cfg)
    try:
        ranks = [ray_local.remote(Probe).options(**options).remote() for _ in range(2)]
        where = ray_local.get([rank.where.remote() for rank in ranks])
        table = ray_local.util.placement_group_table(group)
        assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"
        assert list(table["bundles"].values()) == [{"CPU": 1.0, "learner": 1.0}] * 2
        assert {placement for _, placement in where} == {group.id.hex()}  # both ranks inside the group
        for rank in ranks:
            ray_local.kill(rank)
    finally:
        ray_local.util.remove_placement_group(group)
    assert _learner_group(load_config(None, ["learner.placement=none"]))[0] is None


def test_pool_and_aggregator_options_pin_to_the_head_node(ray_local) -> None:
    options = _on_head_node()
    assert "scheduling_strategy" in options  # the local cluster's only node is its head
    probe = ray_local.remote(Probe).options(num_cpus=0, **options).remote()
    node, _ = ray_local.get(probe.where.remote())
    ray_local.kill(probe)
    assert node == head_node_id(ray_local.nodes())
