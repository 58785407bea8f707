"""Fuzzing the dataset row adapters and the image decoder (pipeline/data/formats.py) with hypothesis, plus the corpus.

The property: whatever a row holds (missing keys, wrong types, NaN and inf, garbage or mutated image bytes,
odd PIL images), turning it into a pair either gives a `PreferencePair` the model can take (label 1 or 2,
both images RGB, pixel count within the model's bounds, aspect ratio within the processor's limit) or
raises `BadRow` with one of `SKIP_REASONS`, which the data source counts; never another exception.

Rows are drawn two ways: arbitrary dicts over every format's keys (the adapters' type checks), and valid
rows with a field or two replaced (reaches the image decoder and the resize with real, mutated images:
flipped, truncated and spliced PNG/JPEG/GIF/BMP/TIFF/WebP/... bytes). Cases that once failed live in
tests/corpus/rows.json (JSON; `{"$png": [w, h]}`, `{"$pil": [w, h]}`, `{"$b64": ...}`, `{"$float": "nan"}`
stand for what JSON cannot hold). A longer, randomised run: `FUZZ_EXAMPLES=5000 pytest tests/unit/test_fuzz_rows.py`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.data.formats import (MAX_ASPECT_RATIO, PAIR_ROW_ADAPTERS, SKIP_REASONS, BadRow, ImageBounds,
                              decode_image, imagereward_pair, imagereward_rank, materialize)
from pipeline.types import PreferencePair

CORPUS = json.loads((Path(__file__).resolve().parents[1] / "corpus" / "rows.json").read_text())
BOUNDS = ImageBounds(min_pixels=3136, max_pixels=12544, max_image_pixels=1 << 20)
_LONG_RUN = "FUZZ_EXAMPLES" in os.environ
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 150)), deadline=None, derandomize=not _LONG_RUN,
                database=None if not _LONG_RUN else settings.default.database,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def encoded(size: tuple[int, int], fmt: str = "PNG", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 7 if mode in ("L", "P") else (10, 200, 30)).save(buffer, fmt)
    return buffer.getvalue()


SEED_IMAGES = [encoded((8, 6), fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA")]
SEED_IMAGES += [encoded((300, 1)), encoded((1, 1)), encoded((8, 8), "PNG", "L"), encoded((8, 8), "PNG", "P")]


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEED_IMAGES)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        edit = draw(st.sampled_from(["set", "truncate", "insert"]))
        if edit == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif edit == "truncate":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(max_size=8))
    return bytes(data)


PIL_MODES = ["RGB", "RGBA", "L", "P", "1", "CMYK", "I", "F", "LA", "La", "I;16"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(), st.text(max_size=6),
                    st.binary(max_size=6))
image_refs = st.one_of(
    mutated_images(), scalars,
    st.fixed_dictionaries({}, optional={"bytes": st.one_of(mutated_images(), scalars), "path": scalars}),
    st.builds(lambda mode, w, h: Image.new(mode, (w, h)), st.sampled_from(PIL_MODES), st.integers(0, 3),
              st.integers(0, 700)),  # what `datasets` hands over when images are decoded
    st.builds(lambda w, h: encoded((w, h)), st.integers(1, 700), st.integers(1, 40)),
)
values = st.one_of(scalars, image_refs, st.lists(st.one_of(scalars, image_refs), max_size=3),
                   st.dictionaries(st.text(max_size=3), scalars, max_size=2))
KEYS = sorted({"caption", "jpg_0", "jpg_1", "label_0", "label_1", "ranking_id", "prompt", "image1", "image2",
               "votes_image1", "votes_image2", "file_path", "human_preference", "image_1", "image_2", "label",
               "pair_id", "prompt_id", "category", "image", "rank", "classification"})
VALID = {
    "pickapic": lambda a, b: {"caption": "c", "jpg_0": a, "jpg_1": b, "label_0": 1, "label_1": 0},
    "rapidata": lambda a, b: {"prompt": "c", "image1": a, "image2": b, "votes_image1": 3, "votes_image2": 1},
    "hpdv2": lambda a, b: {"prompt": "c", "file_path": [a, b], "human_preference": [0, 1]},
    "local": lambda a, b: {"prompt": "c", "image_1": a, "image_2": b, "label": 2},
    "imagereward": lambda a, b: {"prompt_id": "p", "prompt": "c", "image": a, "rank": 1},
}


def to_pair(fmt: str, row: dict) -> PreferencePair:
    """What the data source does with one candidate row (ImageRewardDB: a pair of the row with itself)."""
    if fmt == "imagereward":
        imagereward_rank(row)
        raw = imagereward_pair(row, row, 1, 0, 1)
    else:
        raw = PAIR_ROW_ADAPTERS[fmt](row, 0, 0, "skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about odd metadata in mutated files; not our concern here
        return materialize(raw, None, BOUNDS, seed=0)


def outcome(fmt: str, row: dict) -> str:
    """"ok" for a usable pair, else the BadRow reason; any other exception fails the test."""
    try:
        pair = to_pair(fmt, row)
    except BadRow as bad:
        assert bad.reason in SKIP_REASONS
        return bad.reason
    assert pair.preferred in (1, 2)
    for image in (pair.image_1, pair.image_2):
        width, height = image.size
        assert image.mode == "RGB"
        assert BOUNDS.min_pixels <= width * height <= BOUNDS.max_pixels, image.size
        assert max(width, height) <= MAX_ASPECT_RATIO * min(width, height), image.size
    return "ok"


@FUZZ
@given(st.sampled_from(sorted(VALID)), st.dictionaries(st.sampled_from(KEYS), values, max_size=10))
def test_arbitrary_rows_give_a_pair_or_a_counted_reason(fmt: str, row: dict) -> None:
    outcome(fmt, row)


@FUZZ
@given(st.sampled_from(sorted(VALID)), image_refs, image_refs,
       st.dictionaries(st.sampled_from(KEYS), values, max_size=2))
def test_valid_rows_with_fields_replaced_give_a_pair_or_a_counted_reason(fmt, image_a, image_b, patch) -> None:
    outcome(fmt, {**VALID[fmt](image_a, image_b), **patch})


@FUZZ
@given(image_refs)
def test_decoder_returns_an_rgb_image_or_a_counted_reason(value: Any) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert decode_image(value, None, BOUNDS).mode == "RGB"
    except BadRow as bad:
        assert bad.reason in SKIP_REASONS


def _decode_json(value: Any) -> Any:
    """The corpus's JSON stand-ins for bytes, images and non-finite floats."""
    if isinstance(value, list):
        return [_decode_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "$png" in value:
        return encoded(tuple(value["$png"]))
    if "$pil" in value:
        return Image.new("RGB", tuple(value["$pil"]))
    if "$b64" in value:
        return base64.b64decode(value["$b64"])
    if "$float" in value:
        return float(value["$float"])
    return {k: _decode_json(v) for k, v in value.items()}


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: f"{case['format']}-{case['reason']}-{CORPUS.index(case)}")
def test_corpus_case(case: dict) -> None:
    assert outcome(case["format"], _decode_json(case["row"])) == case["reason"]


def test_rows_found_by_fuzzing_are_counted_by_the_data_source(tmp_path: Path) -> None:
    """End to end through `datasets` and `PairSource`: the found cases are skipped, counted, and logged
    under their reason, and the good rows still come out."""
    from pipeline.data import PairSource, skip_metrics

    for name, size in (("ok.png", (60, 60)), ("thin.png", (205, 1))):
        (tmp_path / name).write_bytes(encoded(size))
    (tmp_path / "empty.png").write_bytes(b"")
    rows = [{"prompt": "good", "image_1": "ok.png", "image_2": "ok.png", "label": 1},
            {"prompt": "thin", "image_1": "ok.png", "image_2": "thin.png", "label": 2},
            {"prompt": "empty file", "image_1": "empty.png", "image_2": "ok.png", "label": 1},
            {"prompt": "no file", "image_1": "missing.png", "image_2": "ok.png", "label": 1},
            {"prompt": "good too", "image_1": "ok.png", "image_2": "ok.png", "label": 2}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = PairSource(str(tmp_path / "pairs.jsonl"), loop=False, shuffle=False, bounds=BOUNDS)
    assert [pair.prompt for pair in source.next_batch(10)] == ["good", "good too"]
    assert dict(source.skip_counts) == {"extreme_aspect_ratio": 1, "undecodable_image": 2}
    assert skip_metrics(source.skip_counts)["data/skipped_extreme_aspect_ratio"] == 1.0


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(st.lists(st.booleans(), min_size=1, max_size=6), st.booleans())
def test_a_looping_source_never_spins_on_bad_rows(good: list[bool], shuffle: bool) -> None:
    """Any mix of good and bad rows: a looping source fills the batch from the good ones, or, with none,
    refuses with NoUsableRows; it never skips rows forever."""
    import tempfile

    from pipeline.data import NoUsableRows, PairSource

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "ok.png").write_bytes(encoded((60, 60)))
        rows = [{"prompt": f"p{k}", "image_1": "ok.png" if ok else "gone.png", "image_2": "ok.png", "label": 1}
                for k, ok in enumerate(good)]
        (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        source = PairSource(str(root / "pairs.jsonl"), shuffle=shuffle, bounds=BOUNDS)
        if any(good):
            assert len(source.next_batch(7)) == 7  # loops over the good rows
        else:
            with pytest.raises(NoUsableRows):
                source.next_batch(7)
            assert source.position == len(good)  # one epoch read, not more
