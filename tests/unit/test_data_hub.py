"""pipeline/data/hub.py: the paper's datasets read from copies of their real hub trees (tests/hub_layouts.py).

Real `datasets`, pyarrow, zipfile and tarfile throughout; the one stand-in is the hub download
(`hub.snapshot_download`, replaced where a hub id is resolved), except in the offline test, which runs the
real `huggingface_hub.snapshot_download` against a prepared cache with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the hub-layout builder
from hub_layouts import (expected_pairs, grey, hpdv2_test_items, hpdv2_train_items,  # noqa: E402
                         write_hpdv2, write_imagereward_db)
from pipeline.config import ConfigError
from pipeline.data import hub
from pipeline.data.formats import ImageBounds, imagereward_pairs
from pipeline.data.source import PairSource, load_rows
from pipeline.eval.groups import ranked_groups

BOUNDS = ImageBounds(min_pixels=64, max_pixels=4096, max_image_pixels=1 << 20)
# Prompt "a": 3 images, ranks 1 2 3; "b": a tie (1, 2, 1, 3); "c": an undecodable image beside ranks 2, 1;
# "d", "e": train-only prompts filling more folders.
TEST = {"a": [1, 2, 3], "b": [1, 2, 1, 3], "c": [2, None, 1]}
TRAIN = {"a": [1, 2], "b": [2, 1], "c": [1, 1, 2], "d": [1, 2], "e": [3, 1]}


def centre_level(image) -> int:
    return image.getpixel((image.width // 2, image.height // 2))[0]


@pytest.fixture()
def imagereward_db(tmp_path) -> Path:
    return write_imagereward_db(tmp_path / "ImageRewardDB", {"test": TEST, "train": TRAIN}, per_folder=2)


def _pairs_by_prompt(groups) -> dict[str, list[tuple[float, float]]]:
    """The judged pairs of each group as sorted (better rank, worse rank), as `expected_pairs` gives them."""
    return {group.prompt_id: sorted((min(group.ranks[i], group.ranks[j]), max(group.ranks[i], group.ranks[j]))
                                    for i, j, _ in imagereward_pairs(group.ranks)) for group in groups}


@pytest.mark.parametrize("rank_type", [pa.float64(), pa.int64()])
def test_imagereward_db_copy_judges_the_protocol_pairs(tmp_path, rank_type):
    root = write_imagereward_db(tmp_path / "ImageRewardDB", {"test": TEST}, rank_type=rank_type)
    assert (root / "ImageRewardDB.py").is_file() and not (root / "images" / "test" / "test_1").exists()
    counts, skipped = Counter(), []
    groups = list(ranked_groups(str(root), "test", bounds=BOUNDS, skip_counts=counts, skipped=skipped))
    assert _pairs_by_prompt(groups) == expected_pairs(TEST)
    assert counts == {"undecodable_image": 1}
    assert [s["reason"] for s in skipped] == ["undecodable_image"] and skipped[0]["item"].startswith("c image ")
    for group in groups:  # the right file behind each image: its grey level is its rank's
        assert [centre_level(image) for image in group.images] == [grey(r)[0] for r in group.ranks]


def test_imagereward_db_training_pairs_from_the_zips(imagereward_db):
    source = PairSource(str(imagereward_db), split="train", shuffle=False, loop=False, bounds=BOUNDS)
    pairs = list(source)
    assert source.format == "imagereward"
    per_prompt = Counter(pair.prompt_id for pair in pairs)
    assert per_prompt == {p: len(found) for p, found in expected_pairs(TRAIN).items()}
    for pair in pairs:  # the preferred image has the lower rank, i.e. the darker grey
        better, worse = (pair.image_1, pair.image_2) if pair.preferred == 1 else (pair.image_2, pair.image_1)
        assert centre_level(better) < centre_level(worse)


def test_hub_id_downloads_only_the_splits_files(imagereward_db, monkeypatch):
    requested = []
    monkeypatch.setattr(hub, "snapshot_download", lambda repo, patterns: requested.append(patterns) or
                        str(imagereward_db))
    groups = list(ranked_groups("THUDM/ImageRewardDB", "test", bounds=BOUNDS))
    assert requested == [["metadata-test.parquet"], ["images/test/test_1.zip", "images/test/test_2.zip"]]
    assert _pairs_by_prompt(groups) == expected_pairs(TEST)
    requested.clear()  # a train subset: folders in numeric order until its prompts are covered
    monkeypatch.setattr(hub, "IMAGEREWARD_SUBSETS", {"1k": 3, "8k": 100})
    rows = load_rows("THUDM/ImageRewardDB", "train", subset="1k").rows
    assert requested[1] == ["images/train/train_1.zip", "images/train/train_2.zip"]
    assert sorted(set(rows["prompt_id"])) == ["a", "b", "c", "d"]
    with pytest.raises(ConfigError, match="subset '3k' is not one of 1k, 8k"):
        load_rows("THUDM/ImageRewardDB", "train", subset="3k")
    with pytest.raises(ConfigError, match="has no split 'dev'; it has: test, train"):
        load_rows("THUDM/ImageRewardDB", "dev")


def test_offline_hub_id_reads_the_cache_and_fetches_nothing(imagereward_db, tmp_path, monkeypatch):
    """The real huggingface_hub resolver, offline, over a cache laid out as it writes one."""
    import huggingface_hub.constants as constants

    revision = "0" * 40
    repo = tmp_path / "hub" / "datasets--THUDM--ImageRewardDB"
    shutil.copytree(imagereward_db, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    groups = list(ranked_groups("THUDM/ImageRewardDB", "test", bounds=BOUNDS))
    assert _pairs_by_prompt(groups) == expected_pairs(TEST)


def test_hpdv2_ranked_test_from_the_archive(tmp_path):
    """test.json's ranks in any base (only their order counts); the archive unpacked once, atomically."""
    items = hpdv2_test_items([[0, 2, 1], [1, 1, 3, 2]])
    root = write_hpdv2(tmp_path / "HPDv2", "test", items, corrupt={"000013.jpg"})
    counts, skipped = Counter(), []
    groups = list(ranked_groups(str(root), "test", bounds=BOUNDS, skip_counts=counts, skipped=skipped))
    assert [(g.ranks, g.image_ids) for g in groups] == [((0, 2, 1), (0, 1, 2)), ((1, 1, 3), (0, 1, 2))]
    assert counts == {"undecodable_image": 1} and "000013.jpg" in skipped[0]["item"]
    assert [centre_level(image) for image in groups[0].images] == [grey(r)[0] for r in (0, 2, 1)]
    assert (root / "test").is_dir() and not list(root.glob(".test.unpacking"))
    (root / "test.tar.gz").unlink()  # unpacked once: the folder is read from now on
    assert len(list(ranked_groups(str(root), "test", bounds=BOUNDS))) == 2


def test_hpdv2_train_pairs_and_members_at_the_archive_root(tmp_path):
    items = hpdv2_train_items([[1, 0], [0, 1], [1, 0]])
    root = write_hpdv2(tmp_path / "HPDv2", "train", items, member_prefix="")
    pairs = list(PairSource(str(root), split="train", shuffle=False, loop=False, bounds=BOUNDS))
    assert [pair.prompt for pair in pairs] == ["hpd train 0", "hpd train 1", "hpd train 2"]
    for pair in pairs:
        better = pair.image_1 if pair.preferred == 1 else pair.image_2
        assert centre_level(better) == grey(1)[0]


def test_an_interrupted_unpack_resumes(tmp_path):
    items = hpdv2_test_items([[1, 2]])
    root = write_hpdv2(tmp_path / "HPDv2", "test", items)
    partial = root / ".test.unpacking" / "test"
    partial.mkdir(parents=True)
    (partial / "000000.jpg").write_bytes(b"half")  # a file cut short: rewritten
    target = hub.unpack_once(root / "test.tar.gz", root / "test")
    assert sorted(p.name for p in target.iterdir()) == ["000000.jpg", "000001.jpg"]
    assert (target / "000000.jpg").read_bytes()[:2] == b"\xff\xd8" and not (root / ".test.unpacking").exists()


def test_hpdv2_hub_id_asks_for_the_json_and_the_archive(tmp_path, monkeypatch):
    root = write_hpdv2(tmp_path / "HPDv2", "test", hpdv2_test_items([[1, 2, 3]]))
    requested = []
    monkeypatch.setattr(hub, "snapshot_download", lambda repo, patterns: requested.append((repo, patterns)) or
                        str(root))
    (group,) = ranked_groups("ymhao/HPDv2", "test", bounds=BOUNDS)
    assert requested == [("ymhao/HPDv2", ["test.json", "test.tar.gz"])] and group.ranks == (1, 2, 3)


def test_pair_sets_are_checked_up_front(tmp_path):
    """A Rapidata sibling without vote columns, or a split that is not there: one line naming what exists."""
    root = tmp_path / "rapidata"
    (root / "data").mkdir(parents=True)
    Dataset.from_dict({"prompt": ["x"], "image1": [b"1"], "image2": [b"2"], "weighted_score": [0.5]}).to_parquet(
        root / "data" / "train_0001-00000-of-00001.parquet")
    with pytest.raises(ConfigError, match=r"lacks columns \['votes_image1', 'votes_image2'\]; it has \[") as raised:
        load_rows(str(root), "train_0001", fmt="rapidata")
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match="train_0001") as raised:
        load_rows(str(root), "train", fmt="rapidata")
    assert "\n" not in str(raised.value)


def test_documented_imagereward_test_numbers_recount(tmp_path):
    """docs/evaluation.md's ImageReward test-set numbers, recounted with our pair rule from the rankings of
    the authors' data/test.json (tests/data/imagereward_test_rankings.json holds them, nothing else)."""
    data = json.loads((Path(__file__).parents[1] / "data" / "imagereward_test_rankings.json").read_text())
    rankings = data["rankings"]
    all_pairs = sum(len(r) * (len(r) - 1) // 2 for r in rankings)
    judged = sum(len(imagereward_pairs(r)) for r in rankings)
    assert (len(rankings), sum(map(len, rankings)), all_pairs, all_pairs - judged, judged) == (
        466, 2720, 7230, 831, 6399)
    docs = (Path(__file__).parents[2] / "docs" / "evaluation.md").read_text()
    for number in ("466", "2,720", "7,230", "831", "6,399"):
        assert number in docs
    assert len(imagereward_pairs(list(range(9)))) == 36  # HPS v2: a prompt's 9 images give 36 pairs
