"""pipeline/data/source.py and pipeline/data/formats.py on local fixtures in each dataset's hub schema.

Every fixture is written the way the hub stores it (parquet with `datasets` Image structs
{"bytes", "path"} and the hub's column types, Pick-a-Pic's raw JPEG `binary` columns, HPDv2's train.json
with image files beside it) and read back through the real `datasets.load_dataset`. The only stand-in is
the hub download for HPDv2 (`data.snapshot_download`, replaced in one test).

Images are coloured by what the label should say (the preferred image red, the other blue; for
ImageRewardDB a grey level per rank), so each test checks the label against the pixels, whatever the
seeded swap did.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from pipeline.data import formats
from pipeline.data import source as data
from pipeline.eval import groups as eval_data
from pipeline.config import DataConfig, ModelConfig
from pipeline.data.formats import ImageBounds

RED, BLUE = (255, 0, 0), (0, 0, 255)
BOUNDS = ImageBounds(min_pixels=64, max_pixels=1024, max_image_pixels=4096)


def encode(colour, size=(16, 16), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def centre(image) -> tuple:
    return image.getpixel((image.width // 2, image.height // 2))


def is_red(image) -> bool:
    r, g, b = centre(image)
    return r > 200 and b < 60


def grey(rank: int) -> tuple:
    return (40 * rank,) * 3


# ---------------------------------------------------------------- fixtures in the hubs' schemas

IR_FEATURES = Features({
    "image": Image(), "prompt_id": Value("string"), "prompt": Value("string"), "classification": Value("string"),
    "image_amount_in_total": Value("int8"), "rank": Value("int8"), "overall_rating": Value("int8"),
    "image_text_alignment_rating": Value("int8"), "fidelity_rating": Value("int8"),
})
# Prompt "a": ranks 1, 2, 3 -> 3 pairs. Prompt "b": ranks 2, 1, 2, 3 -> 5 pairs (images 0 and 2 tie).
IR_GROUPS = {"a": ("a cat", "Animals", [1, 2, 3]), "b": ("a red car", "Vehicles", [2, 1, 2, 3])}


def write_imagereward(root: Path, bad_image_in_b: bool = False) -> Path:
    rows = {name: [] for name in IR_FEATURES}
    for prompt_id, (prompt, category, ranks) in IR_GROUPS.items():
        for k, rank in enumerate(ranks):
            image_bytes = b"\x89PNG broken" if bad_image_in_b and prompt_id == "b" and k == 1 else encode(grey(rank))
            rows["image"].append({"bytes": image_bytes, "path": f"{prompt_id}_{k}.png"})
            rows["prompt_id"].append(prompt_id)
            rows["prompt"].append(prompt)
            rows["classification"].append(category)
            rows["image_amount_in_total"].append(len(ranks))
            rows["rank"].append(rank)
            for key in ("overall_rating", "image_text_alignment_rating", "fidelity_rating"):
                rows[key].append(7 - rank)
    (root / "data").mkdir(parents=True)
    Dataset.from_dict(rows, features=IR_FEATURES).to_parquet(root / "data" / "test-00000-of-00001.parquet")
    return root


def write_pickapic(path: Path, rows: list[dict]) -> Path:
    features = Features({
        "are_different": Value("bool"), "best_image_uid": Value("string"), "caption": Value("string"),
        "has_label": Value("bool"), "image_0_uid": Value("string"), "image_1_uid": Value("string"),
        "jpg_0": Value("binary"), "jpg_1": Value("binary"), "label_0": Value("float64"),
        "label_1": Value("float64"), "model_0": Value("string"), "model_1": Value("string"),
        "ranking_id": Value("int64"), "user_id": Value("int64"),
    })
    full = {name: [row.get(name, _pickapic_default(name, k)) for k, row in enumerate(rows)] for name in features}
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(full, features=features).to_parquet(path)
    return path


def _pickapic_default(name: str, k: int):
    return {"are_different": True, "best_image_uid": f"u{k}", "has_label": True, "image_0_uid": f"i{k}a",
            "image_1_uid": f"i{k}b", "model_0": "sdxl", "model_1": "sd15", "ranking_id": 1000 + k,
            "user_id": 7}.get(name)


def pickapic_row(caption, first_red: bool | None, **extra) -> dict:
    """A row whose preferred image is red; first_red None makes a tie (both blue, 0.5/0.5); `extra` overrides."""
    if first_red is None:
        row = {"caption": caption, "jpg_0": encode(BLUE, fmt="JPEG"), "jpg_1": encode(BLUE, fmt="JPEG"),
               "label_0": 0.5, "label_1": 0.5}
    else:
        row = {"caption": caption, "jpg_0": encode(RED if first_red else BLUE, fmt="JPEG"),
               "jpg_1": encode(BLUE if first_red else RED, fmt="JPEG"),
               "label_0": 1.0 if first_red else 0.0, "label_1": 0.0 if first_red else 1.0}
    row.update(extra)
    return row


def write_rapidata(root: Path, votes: list[tuple[int, int]]) -> Path:
    features = Features({
        "prompt": Value("string"), "image1": Image(), "image2": Image(), "votes_image1": Value("int64"),
        "votes_image2": Value("int64"), "model1": Value("string"), "model2": Value("string"),
        "detailed_results": Value("string"), "image1_path": Value("string"), "image2_path": Value("string"),
    })
    rows = {name: [] for name in features}
    for k, (v1, v2) in enumerate(votes):
        rows["prompt"].append(f"prompt {k}")
        rows["image1"].append({"bytes": encode(RED if v1 > v2 else BLUE), "path": None})
        rows["image2"].append({"bytes": encode(RED if v2 > v1 else BLUE), "path": None})
        rows["votes_image1"].append(v1)
        rows["votes_image2"].append(v2)
        rows["model1"].append("flux")
        rows["model2"].append("dalle-3")
        rows["detailed_results"].append("[]")
        rows["image1_path"].append(f"{k}_1.png")
        rows["image2_path"].append(f"{k}_2.png")
    (root / "data").mkdir(parents=True)
    Dataset.from_dict(rows, features=features).to_parquet(root / "data" / "train-00000-of-00001.parquet")
    return root


def write_hpdv2(root: Path, preferences: list[list[int]]) -> Path:
    (root / "train").mkdir(parents=True)
    items = []
    for k, preference in enumerate(preferences):
        paths = [f"train/{k:08d}_0.jpg", f"train/{k:08d}_1.jpg"]
        for side, path in enumerate(paths):
            (root / path).write_bytes(encode(RED if preference[side] == max(preference) else BLUE, fmt="JPEG"))
        items.append({"human_preference": preference, "prompt": f"hpd prompt {k}", "file_path": paths,
                      "user_hash": "ab12"})
    (root / "train.json").write_text(json.dumps(items))
    return root


def write_local_jsonl(root: Path, labels: list[int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, label in enumerate(labels):
        for side in (1, 2):
            (root / f"{k}_{side}.png").write_bytes(encode(RED if side == label else BLUE))
        lines.append(json.dumps({"prompt": f"local {k}", "image_1": f"{k}_1.png", "image_2": f"{k}_2.png",
                                 "label": label, "category": "even" if k % 2 == 0 else "odd"}))
    path = root / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def collect(source, **kwargs) -> list:
    kwargs.setdefault("bounds", BOUNDS)
    return list(data.PairSource(str(source), loop=False, **kwargs))


# ---------------------------------------------------------------- adapters on their fixtures


def test_imagereward_every_pair_with_different_ranks(tmp_path):
    root = write_imagereward(tmp_path / "ImageRewardDB")
    pairs = collect(root, split="test", shuffle=False)
    assert data.load_rows(str(root), "test").format == "imagereward"
    assert [p.pair_id for p in pairs] == ["a:0-1", "a:0-2", "a:1-2", "b:0-1", "b:0-3", "b:1-2", "b:1-3", "b:2-3"]
    for pair in pairs:  # the preferred image has the lower rank: a darker grey
        other = pair.image_2 if pair.preferred == 1 else pair.image_1
        preferred = pair.image_1 if pair.preferred == 1 else pair.image_2
        assert centre(preferred)[0] < centre(other)[0]
    assert {p.category for p in pairs} == {"Animals", "Vehicles"}
    assert {p.prompt_id for p in pairs} == {"a", "b"}


def test_pickapic_labels_and_ties(tmp_path):
    path = write_pickapic(tmp_path / "pickapic" / "test.parquet", [
        pickapic_row("first wins", True), pickapic_row("second wins", False), pickapic_row("tie", None)])
    source = data.PairSource(str(path), split="test", loop=False, bounds=BOUNDS)
    pairs = list(source)
    assert source.format == "pickapic"
    assert [p.prompt for p in pairs] == ["first wins", "second wins"] or sorted(p.prompt for p in pairs) == [
        "first wins", "second wins"]
    assert all(is_red(p.image_1 if p.preferred == 1 else p.image_2) for p in pairs)
    assert dict(source.skip_counts) == {"tie": 1}
    tie_broken = collect(path, split="test", ties="random")
    assert len(tie_broken) == 3


def test_rapidata_majority_vote(tmp_path):
    root = write_rapidata(tmp_path / "rapidata", [(7, 3), (2, 9), (5, 5), (0, 1)])
    source = data.PairSource(str(root), loop=False, bounds=BOUNDS, shuffle=False)
    pairs = list(source)
    assert source.format == "rapidata"
    assert [p.prompt for p in pairs] == ["prompt 0", "prompt 1", "prompt 3"]
    assert all(is_red(p.image_1 if p.preferred == 1 else p.image_2) for p in pairs)
    assert dict(source.skip_counts) == {"tie": 1}


def test_hpdv2_local_dir(tmp_path):
    """A folder with train.json and the images already unpacked beside it (HPS v2's README layout)."""
    root = write_hpdv2(tmp_path / "HPDv2", [[1, 0], [0, 1], [0, 1]])
    pairs = collect(root, shuffle=False)
    assert [p.prompt for p in pairs] == ["hpd prompt 0", "hpd prompt 1", "hpd prompt 2"]
    assert all(is_red(p.image_1 if p.preferred == 1 else p.image_2) for p in pairs)


def test_local_jsonl_and_parquet(tmp_path):
    path = write_local_jsonl(tmp_path / "local", [1, 2, 2, 1])
    pairs = collect(path, shuffle=False)
    assert [p.prompt for p in pairs] == ["local 0", "local 1", "local 2", "local 3"]
    assert [p.category for p in pairs] == ["even", "odd", "even", "odd"]
    assert all(is_red(p.image_1 if p.preferred == 1 else p.image_2) for p in pairs)
    parquet = tmp_path / "local.parquet"  # the same format with image bytes inline
    Dataset.from_dict({"prompt": ["x", "y"], "image_1": [encode(RED), encode(BLUE)],
                       "image_2": [encode(BLUE), encode(RED)], "label": [1, 2]}).to_parquet(parquet)
    inline = collect(parquet, shuffle=False)
    assert [p.prompt for p in inline] == ["x", "y"]
    assert all(is_red(p.image_1 if p.preferred == 1 else p.image_2) for p in inline)


def test_synthetic_source_matches_the_generator():
    from pipeline.synthetic import synthetic_pair

    source = data.PairSource("synthetic", seed=3, image_size=32)
    pairs = source.next_batch(3)
    assert [p.pair_id for p in pairs] == ["synthetic-3-0", "synthetic-3-1", "synthetic-3-2"]
    assert [p.preferred for p in pairs] == [synthetic_pair(3, k, 32).preferred for k in range(3)]
    assert source.position == 3


def test_unknown_columns_name_the_problem(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text('{"text": "x", "score": 1}\n')
    with pytest.raises(ValueError, match="cannot tell the dataset format"):
        data.PairSource(str(path))


# ---------------------------------------------------------------- bad rows


def test_planted_bad_rows_are_skipped_and_counted_by_reason(tmp_path, caplog):
    truncated = encode(RED, size=(64, 64), fmt="PNG")[:60]
    rows = [
        pickapic_row("good 1", True),
        pickapic_row("undecodable", True, jpg_0=b"not an image at all"),
        pickapic_row("truncated", False, jpg_1=truncated),
        pickapic_row("missing", True, jpg_1=None),
        pickapic_row("label out of range", True, label_0=2.0, label_1=-1.0),
        pickapic_row("", True),
        pickapic_row("   ", False),
        pickapic_row("oversized", True, jpg_0=encode(RED, size=(80, 80), fmt="JPEG")),
        pickapic_row("tie", None),
        pickapic_row("good 2", False),
        pickapic_row("missing label", True, label_0=None, label_1=None),
        pickapic_row("good 3", True),
    ]
    path = write_pickapic(tmp_path / "bad.parquet", rows)
    source = data.PairSource(str(path), loop=False, bounds=BOUNDS, shuffle=False)
    with caplog.at_level("WARNING", logger="pipeline.data.source"):
        pairs = source.next_batch(100)
    assert [p.prompt for p in pairs] == ["good 1", "good 2", "good 3"]
    assert dict(source.skip_counts) == {"undecodable_image": 2, "missing_field": 2, "label_out_of_range": 1,
                                        "empty_prompt": 2, "oversized_image": 1, "tie": 1}
    assert source.position == 12
    assert "oversized_image" in caplog.text and "80x80" in caplog.text
    metrics = data.skip_metrics(source.skip_counts)
    assert metrics["data/skipped_empty_prompt"] == 2.0 and len(metrics) == len(formats.SKIP_REASONS)


def test_imagereward_bad_image_row_counted_once_in_eval_groups(tmp_path):
    root = write_imagereward(tmp_path / "ir", bad_image_in_b=True)  # prompt b loses image 1 (its rank-1)
    counts = Counter()
    groups = list(eval_data.ranked_groups(str(root), "test", bounds=BOUNDS, skip_counts=counts))
    # b keeps images 0, 2, 3 with ranks 2, 2, 3: pairs (0,3) and (2,3); 0 and 2 tie.
    assert [(g.prompt_id, g.ranks) for g in groups] == [("a", (1, 2, 3)), ("b", (2, 2, 3))]
    assert counts == {"undecodable_image": 1}
    assert [p.pair_id for p in groups[1].pairs(seed=0)] == ["b:0-3", "b:2-3"]  # ids as in the dataset
    training = data.PairSource(str(root), split="test", shuffle=False, loop=False, bounds=BOUNDS)
    assert [p.pair_id for p in training if p.prompt_id == "b"] == ["b:0-3", "b:2-3"]
    assert training.skip_counts == {"undecodable_image": 3}  # image 1 was in 3 candidate pairs


# ---------------------------------------------------------------- order, swap, resume, shards


def test_swap_is_seeded_per_pair_and_keeps_the_label_right(tmp_path):
    path = write_local_jsonl(tmp_path / "local", [1] * 40)
    first = collect(path, seed=5)
    again = collect(path, seed=5)
    other = collect(path, seed=6)
    assert [(p.pair_id, p.preferred) for p in first] == [(p.pair_id, p.preferred) for p in again]
    assert [p.pair_id for p in first] != [p.pair_id for p in other]  # the order depends on the seed
    positions = Counter(p.preferred for p in first)
    assert positions[1] > 5 and positions[2] > 5  # dataset always says 1; the swap moves about half
    assert all(is_red(p.image_1 if p.preferred == 1 else p.image_2) for p in first)


@pytest.mark.parametrize("streaming", [False, True])
def test_restart_at_a_position_continues_the_same_sequence(tmp_path, streaming, monkeypatch):
    # datasets sleeps 5 s after each streamed shuffle pass (an arrow thread-shutdown workaround); a
    # one-file local fixture does not need it.
    monkeypatch.setattr("datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    path = write_pickapic(tmp_path / "p" / "train.parquet",
                          [pickapic_row(f"c{k}", k % 3 == 0) if k != 4 else pickapic_row("tie", None)
                           for k in range(7)])
    kwargs = dict(split="train", seed=1, bounds=BOUNDS, streaming=streaming, shuffle_buffer=4)
    full = data.PairSource(str(path), **kwargs)
    sequence = [p.prompt for p in full.next_batch(15)]  # two epochs and a bit: 6 valid pairs per epoch
    assert sorted(sequence[:6]) == sorted(f"c{k}" for k in range(7) if k != 4)
    assert sequence[6:12] != sequence[:6] or streaming  # a new permutation each epoch (map-style)
    head = data.PairSource(str(path), **kwargs)
    head.next_batch(5)
    resumed = data.PairSource(str(path), start=head.position, skip_counts=head.state()["skip_counts"], **kwargs)
    assert [p.prompt for p in resumed.next_batch(10)] == sequence[5:15]
    assert resumed.position == full.position
    assert resumed.skip_counts == full.skip_counts and full.skip_counts["tie"] >= 2


def test_shards_are_disjoint_and_cover_an_epoch(tmp_path):
    path = write_local_jsonl(tmp_path / "local", [1, 2] * 5)
    shards = [collect(path, seed=2, shard_index=s, num_shards=3) for s in range(3)]
    ids = [p.pair_id for shard in shards for p in shard]
    assert sorted(ids) == sorted(f"local-{k}" for k in range(10))
    assert [len(s) for s in shards] == [4, 3, 3]


def test_from_config_uses_data_and_model_fields(tmp_path):
    path = write_local_jsonl(tmp_path / "local", [2, 1, 2])
    cfg = DataConfig(source=str(path), seed=4)
    model = ModelConfig(min_pixels=3136, max_pixels=12544)
    source = data.PairSource.from_config(cfg, model)
    pairs = source.next_batch(2)
    assert all(p.image_1.size == (56, 56) for p in pairs)  # 16x16 images scaled up to min_pixels
    resumed = data.PairSource.from_config(cfg, model, state=source.state())
    assert resumed.next_batch(1)[0].pair_id == source.next_batch(1)[0].pair_id


# ---------------------------------------------------------------- images


@pytest.mark.parametrize(("size", "expected"), [
    ((200, 100), (158, 79)),  # 20000 > 12544: scale sqrt(12544/20000) = 0.792, floored
    ((10, 10), (56, 56)),  # 100 < 3136: scale 5.6
    ((100, 100), (100, 100)),  # 10000 within bounds: unchanged
])
def test_resize_within_pixel_bounds(size, expected):
    image = formats.resize_within(PILImage.new("RGB", size), 3136, 12544)
    assert image.size == expected


def test_pair_datasets_evaluate_as_groups_of_two(tmp_path):
    path = write_pickapic(tmp_path / "pickapic" / "test.parquet", [
        pickapic_row("first wins", True), pickapic_row("tie", None), pickapic_row("second wins", False)])
    counts = Counter()
    groups = list(eval_data.ranked_groups(str(path), "test", bounds=BOUNDS, skip_counts=counts))
    assert [(g.group_id, g.ranks) for g in groups] == [("pickapic-1000", (1, 2)), ("pickapic-1002", (2, 1))]
    assert counts == {"tie": 1}
    (pair,) = groups[1].pairs(seed=0)
    assert pair.pair_id == "pickapic-1002:0-1" and is_red(pair.image_1 if pair.preferred == 1 else pair.image_2)


def test_imagereward_rows_with_unusable_ranks_are_counted_once_across_a_resume(tmp_path):
    root = tmp_path / "ir"
    (root / "data").mkdir(parents=True)
    rows = {"image": [{"bytes": encode(grey(r or 1)), "path": None} for r in (1, 2, None, 0)],
            "prompt_id": ["a"] * 4, "prompt": ["p"] * 4, "rank": [1, 2, None, 0]}
    features = Features({"image": Image(), "prompt_id": Value("string"), "prompt": Value("string"),
                         "rank": Value("int8")})
    Dataset.from_dict(rows, features=features).to_parquet(root / "data" / "test-00000-of-00001.parquet")
    source = data.PairSource(str(root), split="test", loop=False, bounds=BOUNDS)
    assert [p.pair_id for p in source] == ["a:0-1"]  # rank None: missing; rank 0: out of range
    assert source.skip_counts == {"missing_field": 1, "label_out_of_range": 1}
    state = source.state()
    resumed = data.PairSource(str(root), split="test", loop=False, bounds=BOUNDS, start=state["position"],
                              skip_counts=state["skip_counts"])
    assert resumed.next_batch(1) == [] and resumed.skip_counts == source.skip_counts


# ---------------------------------------------------------------- sources with no usable row


def write_missing_images_jsonl(root: Path, n: int = 2) -> Path:
    """`n` local rows whose image files do not exist: every row is bad."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "bad.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{k}", "image_1": f"gone_{k}_1.png", "image_2": f"gone_{k}_2.png",
                                        "label": 1}) + "\n" for k in range(n)))
    return path


@pytest.mark.parametrize("streaming", [False, True])
def test_a_source_whose_every_row_is_bad_is_refused_not_looped(tmp_path, streaming):
    path = write_missing_images_jsonl(tmp_path / "local")
    source = data.PairSource(str(path), streaming=streaming, bounds=BOUNDS)  # loop=True: once looped forever
    with pytest.raises(data.NoUsableRows) as raised:
        source.next_batch(4)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message and "no usable row" in message
    assert "2 read" in message and "undecodable_image 2" in message  # a missing file cannot be decoded


def test_imagereward_rows_none_usable_are_refused_in_training_and_evaluation(tmp_path):
    root = tmp_path / "ir"
    (root / "data").mkdir(parents=True)
    features = Features({"image": Image(), "prompt_id": Value("string"), "prompt": Value("string"),
                         "rank": Value("int8")})
    rows = {"image": [{"bytes": encode(grey(1)), "path": None}] * 2, "prompt_id": ["a", "a"], "prompt": ["p"] * 2,
            "rank": [None, 0]}  # rank None: missing; 0: out of range -> no pair at all
    Dataset.from_dict(rows, features=features).to_parquet(root / "data" / "test-00000-of-00001.parquet")
    with pytest.raises(data.NoUsableRows, match="label_out_of_range 1, missing_field 1"):
        data.PairSource(str(root), split="test", bounds=BOUNDS).next_batch(1)
    with pytest.raises(data.NoUsableRows, match="no usable row"):
        list(eval_data.ranked_groups(str(write_missing_images_jsonl(tmp_path / "l")), "train", bounds=BOUNDS))


def test_a_source_that_runs_out_of_usable_rows_mid_run_ends(tmp_path, caplog):
    path = write_local_jsonl(tmp_path / "local", [1, 2])
    source = data.PairSource(str(path), bounds=BOUNDS)  # loop=True
    assert len(source.next_batch(2)) == 2  # the first epoch
    for image in (tmp_path / "local").glob("*.png"):
        image.unlink()  # the files go away mid-run
    assert source.next_batch(2) == []  # a whole epoch without a usable pair: the source ends, no error
    assert source.skip_counts == {"undecodable_image": 2}
    assert "the source ends" in caplog.text


def test_check_source_refuses_before_training(tmp_path):
    bad = DataConfig(source=str(write_missing_images_jsonl(tmp_path / "local")))
    with pytest.raises(data.NoUsableRows):
        data.check_source(bad, ModelConfig())
    data.check_source(DataConfig(source="synthetic"), ModelConfig())  # a usable source passes


def test_rapidata_groups_carry_votes_and_hpdv2_test_json_gives_ranked_groups(tmp_path):
    root = write_rapidata(tmp_path / "rapidata", [(7, 3), (2, 9)])
    groups = list(eval_data.ranked_groups(str(root), "train", bounds=BOUNDS))
    assert [(g.ranks, g.votes) for g in groups] == [((1, 2), (7.0, 3.0)), ((2, 1), (2.0, 9.0))]
    hpd = write_hpdv2_test(tmp_path / "HPDv2", [[2, 1, 3], [1, 1, 2]])
    ranked = list(eval_data.ranked_groups(str(hpd), "test", bounds=BOUNDS))
    assert [(g.prompt, g.ranks) for g in ranked] == [("hpd test 0", (2, 1, 3)), ("hpd test 1", (1, 1, 2))]
    assert [centre(image)[0] for image in ranked[0].images] == [80, 40, 120]  # grey(rank): the right files


def write_hpdv2_test(root: Path, ranks: list[list[int]]) -> Path:
    """HPDv2's test.json layout: one row per prompt, image_path [n] (files in test/), rank [n]."""
    (root / "test").mkdir(parents=True)
    items = []
    for k, prompt_ranks in enumerate(ranks):
        paths = [f"{k:05d}_{i}.jpg" for i in range(len(prompt_ranks))]
        for path, rank in zip(paths, prompt_ranks):
            (root / "test" / path).write_bytes(encode(grey(rank), fmt="PNG"))
        items.append({"prompt": f"hpd test {k}", "image_path": paths, "rank": prompt_ranks, "user_hash": "u"})
    (root / "test.json").write_text(json.dumps(items))
    return root


# ---------------------------------------------------------------- the paper's test sets as presets


def _hub_from_local(monkeypatch, local: Path, calls: list) -> None:
    """The hub stand-in (no network here): `load_hub_dataset` reads a local copy in the hub's own layout."""
    import datasets

    def load(repo_id, name, split, streaming):
        calls.append((repo_id, name, split))
        return datasets.load_dataset(str(local), split=split, streaming=streaming)

    monkeypatch.setattr(data, "load_hub_dataset", load)


def test_presets_resolve_through_the_loading_code(tmp_path, monkeypatch):
    """The Rapidata preset through `datasets` (hub stand-in); the ImageRewardDB and HPDv2 presets through
    their hub layouts (tests/unit/test_data_hub.py)."""
    from pipeline.eval.presets import PRESETS, resolve_dataset

    assert resolve_dataset("THUDM/ImageRewardDB") is None and resolve_dataset("./local.jsonl") is None
    calls: list = []
    rapidata = resolve_dataset("rapidata-style")
    _hub_from_local(monkeypatch, write_rapidata(tmp_path / "rapidata", [(7, 3), (2, 9)]), calls)
    groups = list(eval_data.ranked_groups(rapidata.source, rapidata.split, fmt=rapidata.format, bounds=BOUNDS))
    assert calls == [("Rapidata/human-style-preferences-images", None, "train")]
    assert rapidata.weighting == "votes" and [g.votes for g in groups] == [(7.0, 3.0), (2.0, 9.0)]
    assert (PRESETS["imagereward-test"].source, PRESETS["hpdv2-test"].source) == ("THUDM/ImageRewardDB", "ymhao/HPDv2")
    assert set(PRESETS) == {"imagereward-test", "hpdv2-test", "rapidata-style"}
