"""Preference data: every dataset through `datasets.load_dataset`, as a resumable stream of pairs.

Training (the driver):

    source = PairSource.from_config(cfg.data, cfg.model)           # or PairSource(..., start=position)
    pairs = source.next_batch(cfg.data.pairs_per_step)             # list[PreferencePair]
    state = source.state()                                         # {"position": int, "skip_counts": {...}}
    ...  # checkpoint `state`; on resume: PairSource.from_config(cfg.data, cfg.model, state=state)
    mlflow.log_metrics(skip_metrics(source.skip_counts), step=step)

`DataConfig.source` is "synthetic", a hub id (`THUDM/ImageRewardDB`, `ymhao/HPDv2`, `yuvalkirstain/pickapic_v2`,
`Rapidata/...`) or a local path: a copy of a hub repository as `snapshot_download` leaves it (ImageRewardDB's
metadata tables and zips, HPDv2's `<split>.json` and `<split>.tar.gz`: `pipeline/data/hub.py`, recognised by
their files), a dataset dir `datasets` can read, or one jsonl / json / parquet file. The format comes from
the hub id, else from the column names (`DataConfig.format` overrides); the columns of pair formats are
checked up front. Adapters per format live in `pipeline/data/formats.py`.

Order: a stream of candidate pairs, deterministic in (seed, shard). Map-style data is permuted per epoch
(numpy, seeded by (seed, epoch)) and sharded by stride, so a position maps to a row in O(1). Streamed data
(`DataConfig.streaming`, for sets too big to download) uses `IterableDataset.shuffle(seed + epoch,
buffer)` and `split_dataset_by_node`; resuming re-reads the stream up to the position without decoding
images. ImageRewardDB yields every pair of a prompt's images with different ranks; streamed, its rows stay
in file order (a prompt's rows are contiguous there) and are not shuffled.

`position` counts candidates consumed, skipped ones included, so a restart at a position continues the
same sequence. A bad candidate is skipped, logged and counted in `skip_counts` by reason
(`formats.SKIP_REASONS`); the unit is the candidate pair (for ImageRewardDB, also an image row whose rank is
unusable, counted when the prompt's pairs are enumerated: once for map-style data, on every pass when
streamed). `pipeline.eval.groups.ranked_groups` (evaluation) counts image rows instead: a bad ImageRewardDB
image drops that image once, not each of its pairs. Synthetic pairs are not swapped again:
`pipeline/synthetic.py` already places the preferred image at random.

No usable row: a source that reads a whole epoch without one usable pair, and never had one, raises
`NoUsableRows` (a `ConfigError`: one line naming the source and the skip counts, exit 2), instead of
skipping rows forever; a source that had usable pairs and then reads a whole epoch without one (its files
went away) ends, as a non-looping source does after its epoch, and the driver ends the run there.

Run the tests: `.venv/bin/python -m pytest tests/unit/test_data.py`.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import formats, hub
from pipeline.config import ConfigError, SyntheticTask
from pipeline.data.hub import LoadedRows
from pipeline.data.formats import BadRow, ImageBounds, RawPair, TiePolicy, imagereward_pairs
from pipeline.synthetic import synthetic_pair
from pipeline.types import PreferencePair

log = logging.getLogger(__name__)

HUB_FORMATS: dict[str, str] = {
    "THUDM/ImageRewardDB": "imagereward", "ymhao/HPDv2": "hpdv2", "yuvalkirstain/pickapic_v2": "pickapic",
}
# Checked in order: the first format whose columns are all present wins.
COLUMN_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("pickapic", frozenset({"jpg_0", "jpg_1", "label_0", "label_1", "caption"})),
    ("rapidata", frozenset({"prompt", "image1", "image2", "votes_image1", "votes_image2"})),
    ("imagereward", frozenset({"image", "prompt_id", "prompt", "rank"})),
    ("imagereward", frozenset({"image_path", "prompt_id", "prompt", "rank"})),  # metadata-{split}.parquet
    ("hpdv2", frozenset({"prompt", "file_path", "human_preference"})),
    ("hpdv2", frozenset({"prompt", "image_path", "rank"})),  # HPDv2 test.json: ranked images per prompt
    ("local", frozenset({"prompt", "image_1", "image_2", "label"})),
)
# Pair formats whose columns are checked up front (a sibling set without them is refused in one line).
REQUIRED_COLUMNS = {fmt: required for fmt, required in COLUMN_SIGNATURES if fmt in ("pickapic", "rapidata")}
LOGGED_PER_REASON = 5  # log the first few skips of each reason in full, then only count them

Candidate = Callable[[], RawPair]  # resolving a candidate reads its row; it may raise BadRow


class NoUsableRows(ConfigError):
    """A data source none of whose rows can be used (one line: the source and the skip counts)."""

    def __init__(self, source: str, split: str, read: int, skip_counts: dict[str, int]):
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(skip_counts.items()) if n) or "none"
        super().__init__(f"data source '{source}' (split '{split}') has no usable row: {read} read, "
                         f"skipped by reason: {counts}")


def skip_metrics(skip_counts: dict[str, int], prefix: str = "data/skipped_") -> dict[str, float]:
    """MLflow metric names for skip counts, every reason present (0 when none)."""
    return {f"{prefix}{reason}": float(skip_counts.get(reason, 0)) for reason in formats.SKIP_REASONS}


# ---------------------------------------------------------------- loading


def load_hub_dataset(repo_id: str, name: str | None, split: str, streaming: bool) -> Any:
    """The hub boundary for datasets read by `datasets` from the hub; tests replace this function."""
    import datasets

    return datasets.load_dataset(repo_id, name, split=split, streaming=streaming)


def load_rows(source: str, split: str, fmt: str = "auto", subset: str = "", streaming: bool = False) -> LoadedRows:
    """Load `source` (hub id or local path) with `datasets`, image columns left undecoded.

    A hub id with a layout of its own (`hub.HUB_LAYOUTS`) and a local copy of it go through the same code;
    other hub ids through `datasets.load_dataset` (only the split's files are downloaded)."""
    path = Path(source).expanduser()
    if not path.exists() and source in hub.HUB_LAYOUTS:
        path = hub.fetch(source, split, subset)
    layout = hub.layout_of(path, split) if path.is_dir() else None
    if layout == hub.IMAGEREWARD_DB:
        loaded = _imagereward_db(path, split, subset)
    elif layout == hub.HPDV2:
        rows = _load(source, "json", data_files={split: str(path / f"{split}.json")}, split=split,
                     streaming=streaming)
        loaded = hub.LoadedRows(_undecoded(rows), "", hub.HpdImages(path, split), streaming)
    elif path.is_file():
        builder = "parquet" if path.suffix == ".parquet" else "json"
        rows = _load(source, builder, data_files={split: str(path)}, split=split, streaming=streaming)
        loaded = hub.LoadedRows(_undecoded(rows), "", path.parent, streaming)
    elif path.is_dir():
        rows = _load(source, str(path), subset or None, split=split, streaming=streaming)
        loaded = hub.LoadedRows(_undecoded(rows), "", path, streaming)
    else:
        rows = _load(source, hub_id=source, name=subset or None, split=split, streaming=streaming)
        loaded = hub.LoadedRows(_undecoded(rows), "", None, streaming)
    if fmt == "auto":
        fmt = HUB_FORMATS.get(source) or ("rapidata" if source.startswith("Rapidata/") else "")
        fmt = fmt or detect_format(column_names(loaded.rows))
    check_columns(source, fmt, column_names(loaded.rows))
    return replace(loaded, format=fmt)


def _load(source: str, *args: Any, hub_id: str = "", **kwargs: Any) -> Any:
    """`datasets.load_dataset`, an unknown split refused in one line naming the splits there are."""
    import datasets

    try:
        if hub_id:
            return load_hub_dataset(hub_id, kwargs["name"], kwargs["split"], kwargs["streaming"])
        return datasets.load_dataset(*args, **kwargs)
    except ValueError as exc:
        if "Unknown split" in str(exc) or "split" in str(exc).lower() and "should be one of" in str(exc).lower():
            raise ConfigError(f"data source '{source}': {str(exc).splitlines()[0]}") from None
        raise


def _imagereward_db(root: Path, split: str, subset: str) -> LoadedRows:
    """ImageRewardDB's metadata table, its rows limited to the subset's folders; images from the zips.
    Always map-style: the table is metadata only (137K rows in all), the images stay in the archives."""
    import datasets

    metadata = root / f"metadata-{split}.parquet"
    rows = datasets.load_dataset("parquet", data_files={split: str(metadata)}, split=split)
    if split == "train" and subset:
        keep = hub.imagereward_row_indices(rows["image_path"], hub.imagereward_folders(metadata, split, subset))
        rows = rows if keep is None else rows.select(keep)
    return hub.LoadedRows(rows, "imagereward", hub.ZipImages(root), False)


def detect_format(columns: list[str]) -> str:
    present = set(columns)
    for fmt, required in COLUMN_SIGNATURES:
        if required <= present:
            return fmt
    raise ConfigError(f"cannot tell the dataset format from its columns {sorted(present)}; set data.format")


def check_columns(source: str, fmt: str, columns: list[str]) -> None:
    """A pair format's columns, checked before any row is read: one line naming what is missing and what exists."""
    missing = sorted(REQUIRED_COLUMNS.get(fmt, frozenset()) - set(columns))
    if missing:
        raise ConfigError(f"data source '{source}' ({fmt}) lacks columns {missing}; it has {sorted(columns)}")


def column_names(rows: Any) -> list[str]:
    if rows.column_names is not None:
        return list(rows.column_names)
    return list(next(iter(rows.take(1))).keys())  # streamed json without known features


def _undecoded(rows: Any) -> Any:
    """Cast image columns to undecoded structs, so a corrupt image is our BadRow, not a crash in datasets."""
    import datasets

    for name, feature in (rows.features or {}).items():
        if isinstance(feature, datasets.Image) and feature.decode:
            rows = rows.cast_column(name, datasets.Image(decode=False))
    return rows


# ---------------------------------------------------------------- candidates


def _row_candidate(adapter: Callable, row_of: Callable[[], dict], index: int, seed: int,
                   ties: TiePolicy) -> Candidate:
    return lambda: adapter(row_of(), index, seed, ties)


def _imagereward_groups(prompt_ids: list, ranks: list, counts: Counter) -> list[tuple[int, int, int]]:
    """(row_i, row_j, preferred) of every pair with different ranks, per prompt in first-seen order."""
    groups: dict[Any, list[tuple[int, int]]] = {}
    for index, (prompt_id, rank) in enumerate(zip(prompt_ids, ranks, strict=True)):
        try:
            if prompt_id is None:
                raise BadRow("missing_field", "prompt_id")
            rank = formats.imagereward_rank({"rank": rank})
        except BadRow as bad:
            counts[bad.reason] += 1
            log.warning("data: skipped image row %d (%s)", index, bad)
            continue
        groups.setdefault(prompt_id, []).append((index, rank))
    out = []
    for members in groups.values():
        for i, j, preferred in imagereward_pairs([rank for _, rank in members]):
            out.append((members[i][0], members[j][0], preferred))
    return out


def _ir_candidate(rows: Any, i: int, j: int, preferred: int, position_of: dict[int, int]) -> Candidate:
    return lambda: formats.imagereward_pair(rows[i], rows[j], preferred, position_of[i], position_of[j])


def _positions_in_prompt(prompt_ids: list) -> dict[int, int]:
    seen: Counter = Counter()
    position_of = {}
    for index, prompt_id in enumerate(prompt_ids):
        position_of[index] = seen[prompt_id]
        seen[prompt_id] += 1
    return position_of


@dataclass(frozen=True)
class _RowCandidates:
    """Candidate k is row k, made on demand (no per-row object for a million-row dataset)."""

    rows: Any
    adapter: Callable
    seed: int
    ties: TiePolicy

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> Candidate:
        return _row_candidate(self.adapter, lambda: self.rows[k], k, self.seed, self.ties)


def indexed_candidates(loaded: LoadedRows, seed: int, ties: TiePolicy, counts: Counter) -> Sequence[Candidate]:
    """Every candidate of a map-style dataset, in file order (rows are read only when resolved)."""
    rows = loaded.rows
    if loaded.format == "imagereward":
        prompt_ids, ranks = rows["prompt_id"], rows["rank"]  # metadata columns only: no image bytes read
        position_of = _positions_in_prompt(prompt_ids)
        return [_ir_candidate(rows, i, j, p, position_of) for i, j, p in _imagereward_groups(prompt_ids, ranks, counts)]
    return _RowCandidates(rows, formats.PAIR_ROW_ADAPTERS[loaded.format], seed, ties)


def streamed_candidates(loaded: LoadedRows, epoch_seed: int | None, seed: int, ties: TiePolicy, buffer: int,
                        counts: Counter) -> Iterator[Candidate]:
    """One epoch of a streamed dataset's candidates (rows of pair formats shuffled in a seeded buffer,
    unless `epoch_seed` is None)."""
    if loaded.format == "imagereward":
        yield from _streamed_imagereward(loaded.rows, counts)
        return
    adapter = formats.PAIR_ROW_ADAPTERS[loaded.format]
    rows = loaded.rows if epoch_seed is None else loaded.rows.shuffle(seed=epoch_seed, buffer_size=buffer)
    for index, row in enumerate(rows):
        yield _row_candidate(adapter, (lambda r=row: r), index, seed, ties)


def _streamed_imagereward(rows: Any, counts: Counter) -> Iterator[Candidate]:
    for _, group in itertools.groupby(rows, key=lambda row: row.get("prompt_id")):
        members = list(group)
        prompt_ids = [row.get("prompt_id") for row in members]
        pairs = _imagereward_groups(prompt_ids, [row.get("rank") for row in members], counts)
        position_of = _positions_in_prompt(prompt_ids)
        for i, j, preferred in pairs:
            yield _ir_candidate(members, i, j, preferred, position_of)


# ---------------------------------------------------------------- the resumable source


class PairSource:
    """A deterministic, resumable stream of `PreferencePair`s (see the module docstring).

    `next_batch(n)` returns exactly n pairs (bad candidates skipped and counted); `position` is the number
    of candidates consumed; `PairSource(..., start=position)` continues the same sequence. With
    `loop=False` the source ends after one epoch (`next_batch` then returns fewer pairs, finally none).
    """

    def __init__(self, source: str = "synthetic", *, split: str = "train", fmt: str = "auto", subset: str = "",
                 streaming: bool = False, shuffle: bool = True, shuffle_buffer: int = 1000, seed: int = 0,
                 ties: TiePolicy = "skip", bounds: ImageBounds = ImageBounds(), image_size: int = 56,
                 synthetic_task: SyntheticTask = "match", shard_index: int = 0, num_shards: int = 1, start: int = 0,
                 loop: bool = True,
                 swap: bool = True, skip_counts: dict[str, int] | None = None, loaded: LoadedRows | None = None):
        if not 0 <= shard_index < num_shards:
            raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
        self.seed, self.ties, self.bounds, self.swap = seed, ties, bounds, swap
        self.shuffle, self.shuffle_buffer, self.loop = shuffle, shuffle_buffer, loop
        self.shard_index, self.num_shards, self.image_size = shard_index, num_shards, image_size
        self.synthetic_task = synthetic_task
        self.source_name, self.split = source, split
        self._usable_in_epoch, self._ever_usable = 0, start > 0  # see _end_of_epoch (a resumed run had pairs)
        self.skip_counts: Counter = Counter(skip_counts or {})
        self._logged: Counter = Counter()
        self.skipped: list[dict] | None = None  # set to a list to keep a record of each skipped candidate
        self.position = start
        self.format = "synthetic" if source == "synthetic" else ""
        self._loaded: LoadedRows | None = None
        self._indexed: Sequence[Candidate] | None = None
        self._order_epoch, self._order = -1, np.arange(0)  # the cached permutation of one epoch
        if source != "synthetic":
            self._loaded = loaded or load_rows(source, split, fmt, subset, streaming)  # `loaded`: read already
            self.format = self._loaded.format
            if streaming:
                self._loaded = _shard_stream(self._loaded, shard_index, num_shards)
            else:
                # A resumed source's restored counts already include what enumerating the rows counts.
                enumerated = Counter() if skip_counts is not None else self.skip_counts
                self._indexed = indexed_candidates(self._loaded, seed, ties, enumerated)
        self._stream = self._candidates(start)

    @classmethod
    def from_config(cls, data, model, *, state: dict | None = None, shard_index: int = 0,
                    num_shards: int = 1, loop: bool = True) -> "PairSource":
        """The training source of `DataConfig` `data` and `ModelConfig` `model` (pixel bounds)."""
        state = state or {}
        return cls(data.source, split=data.split, fmt=data.format, subset=data.subset, streaming=data.streaming,
                   shuffle_buffer=data.shuffle_buffer, seed=data.seed, ties=data.tie_policy,
                   bounds=ImageBounds(model.min_pixels, model.max_pixels, data.max_image_pixels),
                   image_size=data.image_size, synthetic_task=data.synthetic_task, shard_index=shard_index,
                   num_shards=num_shards, start=int(state.get("position", 0)), loop=loop,
                   skip_counts=state.get("skip_counts"))

    def state(self) -> dict:
        """What a checkpoint must keep to resume this source: position and skip counts so far."""
        return {"position": self.position, "skip_counts": dict(self.skip_counts)}

    def next_batch(self, n: int) -> list[PreferencePair]:
        pairs: list[PreferencePair] = []
        while len(pairs) < n:
            candidate = next(self._stream, None)
            if candidate is None:
                break
            self.position += 1
            pair = self._resolve(candidate)
            if pair is not None:
                pairs.append(pair)
                self._usable_in_epoch += 1
                self._ever_usable = True
        return pairs

    def __iter__(self) -> Iterator[PreferencePair]:
        while batch := self.next_batch(1):
            yield batch[0]

    def _resolve(self, candidate: Callable[[], Any]) -> PreferencePair | None:
        try:
            raw = candidate()
            if isinstance(raw, PreferencePair):  # synthetic: already decoded and randomised
                return raw
            base_dir = self._loaded.base_dir if self._loaded else None
            return formats.materialize(raw, base_dir, self.bounds, self.seed, swap=self.swap)
        except BadRow as bad:
            self._count_skip(bad, f"candidate {self.position - 1}")
            return None

    def _count_skip(self, bad: BadRow, where: str) -> None:
        self.skip_counts[bad.reason] += 1
        if self.skipped is not None:  # evaluation keeps every skipped item for its report
            self.skipped.append({"item": where, "reason": bad.reason, "detail": bad.detail})
        self._logged[bad.reason] += 1
        if self._logged[bad.reason] <= LOGGED_PER_REASON:
            log.warning("data: skipped %s (%s); skipped so far: %s", where, bad, dict(self.skip_counts))

    def _candidates(self, start: int) -> Iterator[Callable[[], Any]]:
        if self.format == "synthetic":
            # Shard by stride over the infinite synthetic stream: shard s takes indices s, s+S, s+2S, ...
            return (lambda k=k: synthetic_pair(self.seed, self.shard_index + k * self.num_shards, self.image_size,
                                               self.synthetic_task)
                    for k in itertools.count(start))
        if self._indexed is not None:
            return self._indexed_from(start)
        return itertools.islice(self._streamed_epochs(start), start, None)  # re-reads rows, decodes no image

    def _indexed_from(self, start: int) -> Iterator[Candidate]:
        total = len(self._indexed)
        mine = np.arange(self.shard_index, total, self.num_shards)  # this shard's slots of each epoch's order
        if len(mine) == 0:
            raise NoUsableRows(self.source_name, self.split, 0, dict(self.skip_counts))
        for position in itertools.count(start):
            epoch, offset = divmod(position, len(mine))
            if offset == 0 and position > start and not self._end_of_epoch(whole=position - len(mine) >= start):
                return
            if epoch > 0 and not self.loop:
                return
            yield self._indexed[int(self._epoch_order(epoch, total)[mine[offset]])]

    def _epoch_order(self, epoch: int, total: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(total)
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(total)
            self._order_epoch = epoch
        return self._order

    def _streamed_epochs(self, start: int) -> Iterator[Candidate]:
        read = 0  # candidates of every epoch so far, the ones before `start` included
        for epoch in itertools.count():
            epoch_seed = self.seed + epoch if self.shuffle else None
            first = read
            for candidate in streamed_candidates(self._loaded, epoch_seed, self.seed, self.ties,
                                                 self.shuffle_buffer, self.skip_counts):
                read += 1
                yield candidate
            if not self._end_of_epoch(whole=first >= start) or not self.loop:
                return

    def _end_of_epoch(self, whole: bool) -> bool:
        """At the end of an epoch: False when the source is used up (a whole epoch gave no usable pair
        after earlier ones did); raises `NoUsableRows` when no candidate was ever usable."""
        usable, self._usable_in_epoch = self._usable_in_epoch, 0
        if not whole or usable:
            return True
        if not self._ever_usable:
            raise NoUsableRows(self.source_name, self.split, self.position, dict(self.skip_counts))
        log.warning("data: a whole epoch of '%s' gave no usable pair (skipped so far: %s); the source ends",
                    self.source_name, dict(self.skip_counts))
        return False


def check_source(data, model) -> None:
    """Raise `NoUsableRows` (one line, exit 2) unless the training source yields at least one usable pair."""
    PairSource.from_config(data, model, loop=False).next_batch(1)


def _shard_stream(loaded: LoadedRows, shard_index: int, num_shards: int) -> LoadedRows:
    from datasets.distributed import split_dataset_by_node

    if num_shards == 1:
        return loaded
    rows = split_dataset_by_node(loaded.rows, rank=shard_index, world_size=num_shards)
    return LoadedRows(rows=rows, format=loaded.format, base_dir=loaded.base_dir, streaming=True)
