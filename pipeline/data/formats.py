"""Per-dataset row adapters and image handling (pure: PIL only; used by `pipeline/data/source.py`).

Each adapter turns one dataset row (a dict, as `datasets` yields it with images left undecoded) into a
`RawPair`: the prompt, two image references (bytes, a path, a `{"bytes", "path"}` struct or a PIL image),
the preferred image and ids. A row that cannot be used raises `BadRow(reason)`; the caller skips it and
counts the reason. `materialize` decodes, checks and resizes the images and applies the seeded per-pair
swap of the two images (label swapped with them), so no position carries the answer.

Schemas (docs/method.md "Hub identifiers"):
- ImageRewardDB: one row per image: image (or image_path, read from the zips by `hub.ZipImages`), prompt_id,
  prompt, rank (1 = best), classification, ...; pairs are formed per prompt (`imagereward_pairs`).
- HPDv2 (train.json): prompt, file_path [2 paths under the unpacked train/], human_preference [2]
  (one-hot; in general the larger entry wins).
- Pick-a-Pic v2: caption, jpg_0/jpg_1 (raw JPEG bytes), label_0/label_1 (1/0, or 0.5/0.5 for a tie).
- Rapidata: prompt, image1/image2 (image structs), votes_image1/votes_image2 (majority wins).
- local (jsonl or parquet): prompt, image_1, image_2 (path relative to the file, bytes or struct),
  label (1 or 2); optional pair_id, prompt_id, category.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal

from PIL import Image

from pipeline.types import PreferencePair

TiePolicy = Literal["skip", "random"]
SKIP_REASONS: tuple[str, ...] = (
    "undecodable_image", "missing_field", "label_out_of_range", "empty_prompt", "oversized_image", "tie",
    "extreme_aspect_ratio",
)
# Qwen2-VL's image processor (`smart_resize`, in transformers and vLLM) raises on a longer side over 200x
# the shorter: such an image would crash a rollout or learner step, so its row is skipped here.
MAX_ASPECT_RATIO = 200


class BadRow(Exception):
    """A row that cannot become a pair; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RawPair:
    """A pair before its images are decoded; `preferred` is in the dataset's own image order."""

    pair_id: str
    prompt: str
    image_1: Any
    image_2: Any
    preferred: int
    prompt_id: str = ""
    category: str = ""


@dataclass(frozen=True)
class ImageBounds:
    """Pixel limits: rows above `max_image_pixels` are rejected; kept images are resized into [min, max]."""

    min_pixels: int = 3136
    max_pixels: int = 12544
    max_image_pixels: int = 4096 * 4096


# ---------------------------------------------------------------- images


def _image_bytes(value: Any, base_dir: Any) -> bytes:
    """`base_dir`: a directory relative paths point into, an object with `read(path)` (`hub.ImageFiles`), or None."""
    if isinstance(value, dict):  # datasets' Image(decode=False) struct
        data = value.get("bytes")
        if isinstance(data, (bytes, bytearray)) and data:  # anything else is not image data: try the path
            return bytes(data)
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value and hasattr(base_dir, "read"):  # zips, an unpacked archive (`hub`)
        return base_dir.read(value)
    if isinstance(value, str) and value:
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            return path.read_bytes()
        except OSError as exc:
            raise BadRow("undecodable_image", f"cannot read {path}: {exc.__class__.__name__}") from None
    raise BadRow("missing_field", "image")


def decode_image(value: Any, base_dir: Any, bounds: ImageBounds) -> Image.Image:
    """An RGB PIL image from any image reference; BadRow when missing, undecodable or oversized."""
    if isinstance(value, Image.Image):
        image = value
    else:
        try:
            image = Image.open(io.BytesIO(_image_bytes(value, base_dir)))  # reads the header only
        except Image.DecompressionBombError as exc:
            raise BadRow("oversized_image", str(exc)[:80]) from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise BadRow("undecodable_image", exc.__class__.__name__) from None
    width, height = image.size
    if width < 1 or height < 1:  # an empty image (a PIL object from a row) has no pixels to resize
        raise BadRow("undecodable_image", f"{width}x{height}")
    if width * height > bounds.max_image_pixels:  # checked before the full decode: no decompression bomb
        raise BadRow("oversized_image", f"{width}x{height}")
    new_w, new_h = resized_size(width, height, bounds.min_pixels, bounds.max_pixels)
    if max(new_w, new_h) > MAX_ASPECT_RATIO * min(new_w, new_h):  # after resizing, as the processor sees it
        raise BadRow("extreme_aspect_ratio", f"{width}x{height}")
    try:
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise BadRow("undecodable_image", exc.__class__.__name__) from None


def resized_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled, keeping the aspect ratio, so that width * height lies in [min_pixels, max_pixels]."""
    area = width * height
    if min_pixels <= area <= max_pixels:
        return width, height
    scale = math.sqrt((max_pixels if area > max_pixels else min_pixels) / area)
    rounding = math.floor if area > max_pixels else math.ceil  # floor stays under max, ceil over min
    return max(1, rounding(width * scale)), max(1, rounding(height * scale))


def resize_within(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Scale (keeping the aspect ratio) so that width * height lies in [min_pixels, max_pixels]."""
    size = resized_size(*image.size, min_pixels, max_pixels)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def swapped(seed: int, pair_id: str) -> bool:
    """Whether pair `pair_id` is shown with its images swapped: a seeded coin per pair, order-independent."""
    return random.Random(f"swap:{seed}:{pair_id}").random() < 0.5


def materialize(raw: RawPair, base_dir: Any, bounds: ImageBounds, seed: int,
                swap: bool = True) -> PreferencePair:
    """Decode, check and resize both images; swap them (and the label) by the pair's seeded coin."""
    image_1 = resize_within(decode_image(raw.image_1, base_dir, bounds), bounds.min_pixels, bounds.max_pixels)
    image_2 = resize_within(decode_image(raw.image_2, base_dir, bounds), bounds.min_pixels, bounds.max_pixels)
    preferred = raw.preferred
    if swap and swapped(seed, raw.pair_id):
        image_1, image_2, preferred = image_2, image_1, 3 - preferred
    return PreferencePair(pair_id=raw.pair_id, prompt=raw.prompt, image_1=image_1, image_2=image_2,
                          preferred=preferred, prompt_id=raw.prompt_id, category=raw.category)


# ---------------------------------------------------------------- rows


def need(row: dict, key: str) -> Any:
    value = row.get(key)
    if value is None:
        raise BadRow("missing_field", key)
    return value


def prompt_of(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise BadRow("missing_field", key)
    if not isinstance(value, str) or not value.strip():
        raise BadRow("empty_prompt")
    return value


def number(row: dict, key: str) -> float:
    value = need(row, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise BadRow("label_out_of_range", f"{key}={value!r}")
    return float(value)


def winner(score_1: float, score_2: float, pair_id: str, seed: int, ties: TiePolicy) -> int:
    """1 or 2 by the larger score; a tie is skipped or broken by a seeded coin, per `ties`."""
    if score_1 != score_2:
        return 1 if score_1 > score_2 else 2
    if ties == "skip":
        raise BadRow("tie")
    return 1 if random.Random(f"tie:{seed}:{pair_id}").random() < 0.5 else 2


def pickapic_row(row: dict, index: int, seed: int, ties: TiePolicy) -> RawPair:
    pair_id = f"pickapic-{row.get('ranking_id', index)}"
    label_0, label_1 = number(row, "label_0"), number(row, "label_1")
    if label_0 not in (0.0, 0.5, 1.0) or label_0 + label_1 != 1.0:
        raise BadRow("label_out_of_range", f"labels {label_0}, {label_1}")
    return RawPair(pair_id=pair_id, prompt=prompt_of(row, "caption"), image_1=need(row, "jpg_0"),
                   image_2=need(row, "jpg_1"), preferred=winner(label_0, label_1, pair_id, seed, ties),
                   prompt_id=pair_id)


def rapidata_row(row: dict, index: int, seed: int, ties: TiePolicy) -> RawPair:
    pair_id = f"rapidata-{index}"
    votes_1, votes_2 = number(row, "votes_image1"), number(row, "votes_image2")
    if votes_1 < 0 or votes_2 < 0:
        raise BadRow("label_out_of_range", f"votes {votes_1}, {votes_2}")
    return RawPair(pair_id=pair_id, prompt=prompt_of(row, "prompt"), image_1=need(row, "image1"),
                   image_2=need(row, "image2"), preferred=winner(votes_1, votes_2, pair_id, seed, ties),
                   prompt_id=pair_id)


def hpdv2_row(row: dict, index: int, seed: int, ties: TiePolicy) -> RawPair:
    pair_id = f"hpdv2-{index}"
    paths, preference = need(row, "file_path"), need(row, "human_preference")
    if not isinstance(paths, (list, tuple)) or len(paths) != 2 or any(not p for p in paths):
        raise BadRow("missing_field", "file_path")
    if not isinstance(preference, (list, tuple)) or len(preference) != 2 or any(
            isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or p < 0 for p in preference):
        raise BadRow("label_out_of_range", f"human_preference={preference!r}")
    return RawPair(pair_id=pair_id, prompt=prompt_of(row, "prompt"), image_1=paths[0], image_2=paths[1],
                   preferred=winner(float(preference[0]), float(preference[1]), pair_id, seed, ties),
                   prompt_id=pair_id)


def local_row(row: dict, index: int, seed: int, ties: TiePolicy) -> RawPair:
    pair_id = str(row.get("pair_id") or f"local-{index}")
    label = need(row, "label")
    if label not in (1, 2) or isinstance(label, bool):
        raise BadRow("label_out_of_range", f"label={label!r}")
    return RawPair(pair_id=pair_id, prompt=prompt_of(row, "prompt"), image_1=need(row, "image_1"),
                   image_2=need(row, "image_2"), preferred=int(label),
                   prompt_id=str(row.get("prompt_id") or pair_id), category=str(row.get("category") or ""))


PAIR_ROW_ADAPTERS = {"pickapic": pickapic_row, "rapidata": rapidata_row, "hpdv2": hpdv2_row, "local": local_row}


def imagereward_rank(row: dict) -> int:
    """A ranked image row's rank (1 = best); BadRow when missing or not a positive integer. An integral
    float (`3.0`) is the same rank: a table may store ranks as floats."""
    return whole_rank(need(row, "rank"), minimum=1)


def whole_rank(rank: Any, minimum: int = 0) -> int:
    """`rank` as an int (an int, or a float with no fraction) of at least `minimum`; else BadRow."""
    if isinstance(rank, float) and rank.is_integer():
        rank = int(rank)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < minimum:
        raise BadRow("label_out_of_range", f"rank={rank!r}")
    return rank


def imagereward_image(row: dict) -> Any:
    """A ranked row's image: `image` (a parquet export's struct) or `image_path` (metadata-{split}.parquet,
    read from the zips by `hub.ZipImages`)."""
    return row["image"] if row.get("image") is not None else need(row, "image_path")


def imagereward_pair(row_i: dict, row_j: dict, preferred: int, index_i: int, index_j: int) -> RawPair:
    """The pair of two ranked rows of one prompt (ids: `prompt_id:i-j`, positions within the prompt)."""
    prompt_id = str(need(row_i, "prompt_id"))
    return RawPair(pair_id=f"{prompt_id}:{index_i}-{index_j}", prompt=prompt_of(row_i, "prompt"),
                   image_1=imagereward_image(row_i), image_2=imagereward_image(row_j), preferred=preferred,
                   prompt_id=prompt_id, category=str(row_i.get("classification") or ""))


def imagereward_pairs(ranks: Sequence[int]) -> list[tuple[int, int, int]]:
    """Every pair (i, j), i < j, of images with different ranks, with the preferred one (1: i, 2: j).

    Rank 1 is the best (ImageRewardDB's convention), so the lower rank is preferred.
    """
    pairs = []
    for i, j in itertools.combinations(range(len(ranks)), 2):
        if ranks[i] != ranks[j]:
            pairs.append((i, j, 1 if ranks[i] < ranks[j] else 2))
    return pairs
