"""Evaluation groups: a prompt's images with human ranks, from every dataset format, through `pipeline.data`.

    for group in ranked_groups("THUDM/ImageRewardDB", "test", subset="1k", skip_counts=counts): ...

ImageRewardDB rows are grouped by prompt (a bad image row drops that image only, counted once). HPDv2's
`test.json` (one row per prompt: `image_path` [n], `rank` [n]) gives one ranked group per row, as HPS v2's
ranking test reads it. Every other format gives one group of two per valid pair (ranks (1, 2) when image 1
is preferred); Rapidata's groups carry the votes per image. A source with no usable group raises
`pipeline.data.NoUsableRows` (one line, exit 2).

Run the tests: `.venv/bin/python -m pytest tests/unit/test_data.py`.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipeline.data import formats
from pipeline.data.source import LoadedRows, NoUsableRows, PairSource, column_names, load_rows
from pipeline.data.formats import BadRow, ImageBounds, TiePolicy, imagereward_pairs
from pipeline.types import PreferencePair

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class RankedGroup:
    """A prompt's images with human ranks (1 = best); a two-image pair dataset gives groups of two."""

    group_id: str
    prompt_id: str
    prompt: str
    category: str
    images: tuple[Image.Image, ...]
    ranks: tuple[int, ...]
    image_ids: tuple[int, ...] = ()  # each image's position among its prompt's rows (bad rows included)
    votes: tuple[float, ...] = ()  # human votes per image, where the dataset counts them (Rapidata)

    def pair_id(self, i: int, j: int) -> str:
        """`group:a-b` with the images' positions in the dataset (as `PairSource` names the same pair)."""
        a, b = (self.image_ids[i], self.image_ids[j]) if self.image_ids else (i, j)
        return f"{self.group_id}:{a}-{b}"

    def pairs(self, seed: int, swap: bool = True) -> list[PreferencePair]:
        """Every pair with different ranks (the ImageReward protocol), each in its seeded image order."""
        out = []
        for i, j, preferred in imagereward_pairs(self.ranks):
            pair_id = self.pair_id(i, j)
            first, second = self.images[i], self.images[j]
            if swap and formats.swapped(seed, pair_id):
                first, second, preferred = second, first, 3 - preferred
            out.append(PreferencePair(pair_id=pair_id, prompt=self.prompt, image_1=first, image_2=second,
                                      preferred=preferred, prompt_id=self.prompt_id, category=self.category))
        return out


def ranked_groups(source: str, split: str, *, fmt: str = "auto", subset: str = "", seed: int = 0,
                  ties: TiePolicy = "skip", bounds: ImageBounds = ImageBounds(),
                  skip_counts: Counter | None = None, max_groups: int | None = None) -> Iterator[RankedGroup]:
    """The evaluation groups of a dataset, in file order; bad rows skipped and counted in `skip_counts`.

    ImageRewardDB rows are grouped by prompt (a bad image row drops that image only, counted once); every
    other format gives one group of two per valid pair (ranks (1, 2) when image 1 is preferred).
    """
    counts = skip_counts if skip_counts is not None else Counter()
    loaded = None
    if source != "synthetic":
        loaded = load_rows(source, split, fmt, subset, streaming=False)
        ranked = _ranked_hpdv2_groups(split) if _is_ranked_hpdv2(loaded) else None
        if loaded.format == "imagereward":
            ranked = _imagereward_groups_decoded
        if ranked is not None:
            found = 0
            for group in itertools.islice(ranked(loaded, bounds, counts), max_groups):
                found += 1
                yield group
            if not found:
                raise NoUsableRows(source, split, len(loaded.rows), dict(counts))
            return
    pairs = PairSource(source, split=split, fmt=fmt, subset=subset, shuffle=False, seed=seed, ties=ties,
                       bounds=bounds, loop=False, swap=False, loaded=loaded)  # raises NoUsableRows if none usable
    votes = _vote_columns(pairs._loaded)
    for pair in itertools.islice(pairs, max_groups):
        ranks = (1, 2) if pair.preferred == 1 else (2, 1)
        row = pairs.position - 1  # unshuffled, one shard: candidate k is row k
        yield RankedGroup(group_id=pair.pair_id, prompt_id=pair.prompt_id, prompt=pair.prompt,
                          category=pair.category, images=(pair.image_1, pair.image_2), ranks=ranks,
                          votes=(float(votes[0][row]), float(votes[1][row])) if votes else ())
    counts.update(pairs.skip_counts)


def _is_ranked_hpdv2(loaded: LoadedRows) -> bool:
    """HPDv2's test.json: one row per prompt, `image_path` [n] and `rank` [n] (HPS v2's ranking test)."""
    return loaded.format == "hpdv2" and {"image_path", "rank"} <= set(column_names(loaded.rows))


def _ranked_hpdv2_groups(split: str) -> Callable[..., Iterator[RankedGroup]]:
    return lambda loaded, bounds, counts: _ranked_hpdv2_rows(loaded, split, bounds, counts)


def _ranked_hpdv2_rows(loaded: LoadedRows, split: str, bounds: ImageBounds, counts: Counter) -> Iterator[RankedGroup]:
    base = loaded.base_dir
    if base is not None and (base / split).is_dir():  # test.json names files inside test/
        first = next(iter(loaded.rows), {}).get("image_path") or [""]
        base = base if (base / str(first[0])).is_file() else base / split
    for index, row in enumerate(loaded.rows):
        try:
            prompt = formats.prompt_of(row, "prompt")
            paths, ranks = formats.need(row, "image_path"), formats.need(row, "rank")
            if len(paths) != len(ranks) or any(not isinstance(r, int) or r < 1 for r in ranks):
                raise BadRow("label_out_of_range", f"ranks {ranks} for {len(paths)} images")
            images = tuple(formats.resize_within(formats.decode_image(path, base, bounds),
                                                 bounds.min_pixels, bounds.max_pixels) for path in paths)
        except BadRow as bad:
            counts[bad.reason] += 1
            log.warning("data: skipped ranked row %d (%s)", index, bad)
            continue
        if len(images) >= 2:
            yield RankedGroup(group_id=f"hpdv2-{index}", prompt_id=f"hpdv2-{index}", prompt=prompt,
                              category=str(row.get("category") or ""), images=images, ranks=tuple(ranks))


def _vote_columns(loaded: LoadedRows | None) -> tuple[list, list] | None:
    """Rapidata's votes per image (metadata columns only), for vote-weighted accuracy."""
    if loaded is None or loaded.format != "rapidata":
        return None
    return loaded.rows["votes_image1"], loaded.rows["votes_image2"]


def _imagereward_groups_decoded(loaded: LoadedRows, bounds: ImageBounds, counts: Counter) -> Iterator[RankedGroup]:
    rows = loaded.rows
    members: dict[Any, list[int]] = {}
    for index, prompt_id in enumerate(rows["prompt_id"]):
        members.setdefault(prompt_id, []).append(index)
    for prompt_id, indices in members.items():
        images, ranks, image_ids, prompt, category = [], [], [], None, ""
        for position, index in enumerate(indices):
            row = rows[index]
            try:
                if prompt_id is None:
                    raise BadRow("missing_field", "prompt_id")
                rank = formats.imagereward_rank(row)
                text = formats.prompt_of(row, "prompt")
                image = formats.decode_image(formats.need(row, "image"), loaded.base_dir, bounds)
            except BadRow as bad:
                counts[bad.reason] += 1
                log.warning("data: skipped image row %d of prompt %s (%s)", index, prompt_id, bad)
                continue
            images.append(formats.resize_within(image, bounds.min_pixels, bounds.max_pixels))
            ranks.append(rank)
            image_ids.append(position)
            prompt = prompt if prompt is not None else text
            category = category or str(row.get("classification") or "")
        if len(images) >= 2:
            yield RankedGroup(group_id=str(prompt_id), prompt_id=str(prompt_id), prompt=prompt, category=category,
                              images=tuple(images), ranks=tuple(ranks), image_ids=tuple(image_ids))
