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
                  ties: TiePolicy = "skip", bounds: ImageBounds = ImageBounds(), skip_counts: Counter | None = None,
                  max_groups: int | None = None, skipped: list[dict] | None = None) -> Iterator[RankedGroup]:
    """The evaluation groups of a dataset, in file order, decoded one group at a time; bad rows skipped,
    counted in `skip_counts` and, when `skipped` is a list, recorded there (`{"item", "reason", "detail"}`).

    ImageRewardDB rows are grouped by prompt and HPDv2's ranked rows are one group each (a bad image drops
    that image only, counted once); every other format gives one group of two per valid pair (ranks (1, 2)
    when image 1 is preferred).
    """
    counts = skip_counts if skip_counts is not None else Counter()
    note = _recorder(counts, skipped)
    loaded = None
    if source != "synthetic":
        loaded = load_rows(source, split, fmt, subset, streaming=False)
        ranked = _ranked_hpdv2_rows if _is_ranked_hpdv2(loaded) else None
        if loaded.format == "imagereward":
            ranked = _imagereward_groups_decoded
        if ranked is not None:
            found = 0
            for group in itertools.islice(ranked(loaded, bounds, note), max_groups):
                found += 1
                yield group
            if not found:
                raise NoUsableRows(source, split, len(loaded.rows), dict(counts))
            return
    pairs = PairSource(source, split=split, fmt=fmt, subset=subset, shuffle=False, seed=seed, ties=ties,
                       bounds=bounds, loop=False, swap=False, loaded=loaded)  # raises NoUsableRows if none usable
    pairs.skipped = skipped
    votes = _vote_columns(pairs._loaded)
    for pair in itertools.islice(pairs, max_groups):
        ranks = (1, 2) if pair.preferred == 1 else (2, 1)
        row = pairs.position - 1  # unshuffled, one shard: candidate k is row k
        yield RankedGroup(group_id=pair.pair_id, prompt_id=pair.prompt_id, prompt=pair.prompt,
                          category=pair.category, images=(pair.image_1, pair.image_2), ranks=ranks,
                          votes=(float(votes[0][row]), float(votes[1][row])) if votes else ())
    counts.update(pairs.skip_counts)


Note = Callable[[str, BadRow], None]  # records one skipped row or image


def _recorder(counts: Counter, skipped: list[dict] | None) -> Note:
    def note(item: str, bad: BadRow) -> None:
        counts[bad.reason] += 1
        if skipped is not None:
            skipped.append({"item": item, "reason": bad.reason, "detail": bad.detail})
        log.warning("data: skipped %s (%s)", item, bad)
    return note


def _is_ranked_hpdv2(loaded: LoadedRows) -> bool:
    """HPDv2's test.json: one row per prompt, `image_path` [n] and `rank` [n] (HPS v2's ranking test)."""
    return loaded.format == "hpdv2" and {"image_path", "rank"} <= set(column_names(loaded.rows))


def _decoded(value: Any, base: Any, bounds: ImageBounds) -> Image.Image:
    return formats.resize_within(formats.decode_image(value, base, bounds), bounds.min_pixels, bounds.max_pixels)


def _ranked_hpdv2_rows(loaded: LoadedRows, bounds: ImageBounds, note: Note) -> Iterator[RankedGroup]:
    """One group per row of HPDv2's test.json. Only the ranks' order matters (HPS v2's `inversion_score`
    compares orders), so any base is accepted; a lower rank is the better image."""
    for index, row in enumerate(loaded.rows):
        try:
            prompt = formats.prompt_of(row, "prompt")
            paths, ranks = formats.need(row, "image_path"), formats.need(row, "rank")
            if len(paths) != len(ranks):
                raise BadRow("label_out_of_range", f"ranks {ranks} for {len(paths)} images")
            ranks = [formats.whole_rank(rank) for rank in ranks]
        except BadRow as bad:
            note(f"hpdv2-{index}", bad)
            continue
        images, kept_ranks, image_ids = [], [], []
        for k, (path, rank) in enumerate(zip(paths, ranks, strict=True)):
            try:
                images.append(_decoded(path, loaded.base_dir, bounds))
            except BadRow as bad:
                note(f"hpdv2-{index} image {k} ({path})", bad)
                continue
            kept_ranks.append(rank)
            image_ids.append(k)
        if len(images) >= 2:
            yield RankedGroup(group_id=f"hpdv2-{index}", prompt_id=f"hpdv2-{index}", prompt=prompt,
                              category=str(row.get("category") or ""), images=tuple(images),
                              ranks=tuple(kept_ranks), image_ids=tuple(image_ids))


def _vote_columns(loaded: LoadedRows | None) -> tuple[list, list] | None:
    """Rapidata's votes per image (metadata columns only), for vote-weighted accuracy."""
    if loaded is None or loaded.format != "rapidata":
        return None
    return loaded.rows["votes_image1"], loaded.rows["votes_image2"]


def _imagereward_groups_decoded(loaded: LoadedRows, bounds: ImageBounds, note: Note) -> Iterator[RankedGroup]:
    rows = loaded.rows
    members: dict[Any, list[int]] = {}
    for index, prompt_id in enumerate(rows["prompt_id"]):  # rows need not be grouped by prompt
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
                image = _decoded(formats.imagereward_image(row), loaded.base_dir, bounds)
            except BadRow as bad:
                where = row.get("image_path") or f"row {index}"
                note(f"{prompt_id} image {position} ({where})", bad)
                continue
            images.append(image)
            ranks.append(rank)
            image_ids.append(position)
            prompt = prompt if prompt is not None else text
            category = category or str(row.get("classification") or "")
        if len(images) >= 2:
            yield RankedGroup(group_id=str(prompt_id), prompt_id=str(prompt_id), prompt=prompt, category=category,
                              images=tuple(images), ranks=tuple(ranks), image_ids=tuple(image_ids))
