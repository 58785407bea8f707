"""The paper's datasets as their hub repositories hold them, from a hub id or from a local copy.

    root = fetch("THUDM/ImageRewardDB", "test", subset="")  # only the split's files (allow_patterns)
    layout = layout_of(root, "test")                          # "imagereward_db" | "hpdv2" | None

A local directory laid out as `huggingface_hub.snapshot_download` leaves the repository is recognised by
its files, with no flag; a hub id is downloaded into the hub cache first (the hub's own progress bars; with
`HF_HUB_OFFLINE=1` the cached snapshot is used and nothing is fetched), then read by the same code.

- `THUDM/ImageRewardDB` (docs/evaluation.md "Hub layouts"): `metadata-{split}.parquet` (one row per image:
  `image_path`, `prompt_id`, `prompt`, `rank`, ...) and `images/{split}/{split}_{n}.zip` (WebP files and a
  JSON of the records). `image_path` is `images/{split}/{split}_{n}/<file>.webp`; its image is the member
  named `<file>.webp` of the zip beside that folder (`ZipImages`: by folder and file name, wherever in the
  zip the member sits). The repository's loading script is never run. A train subset ("1k" ... "8k")
  chooses train folders in numeric order until that many prompts are covered.
- `ymhao/HPDv2`: `{split}.json` and `{split}.tar.gz`. The archive is unpacked once into `{split}/` beside
  it (the layout HPS v2's README describes), through a hidden partial directory renamed when complete, so
  an interrupted unpack leaves no half folder and the next run resumes it (files already written with
  the right size are kept). `HpdImages` finds a file under `{split}/` by its path, else by its file name.

Run the tests: `.venv/bin/python -m pytest tests/unit/test_data_hub.py`.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import ConfigError
from pipeline.data.formats import BadRow

log = logging.getLogger(__name__)

IMAGEREWARD_DB, HPDV2 = "imagereward_db", "hpdv2"
HUB_LAYOUTS: dict[str, str] = {"THUDM/ImageRewardDB": IMAGEREWARD_DB, "ymhao/HPDv2": HPDV2}
IMAGEREWARD_SUBSETS = {"1k": 1000, "2k": 2000, "4k": 4000, "8k": 8000}  # prompts in the train split


class ImageFiles(Protocol):
    """Where a row's relative image paths are read from (a directory, zips, an unpacked archive)."""

    def read(self, relative_path: str) -> bytes: ...


@dataclass(frozen=True)
class LoadedRows:
    """A loaded dataset with everything needed to read its rows."""

    rows: Any  # datasets.Dataset or datasets.IterableDataset, image columns undecoded
    format: str
    base_dir: Path | ImageFiles | None  # where relative image paths point
    streaming: bool


def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
    """The hub boundary (tests replace it): the repository's files matching `allow_patterns`, cached."""
    from huggingface_hub import snapshot_download as download

    return download(repo_id, repo_type="dataset", allow_patterns=allow_patterns)


def fetch(repo_id: str, split: str, subset: str) -> Path:
    """The local snapshot of a hub dataset with one of `HUB_LAYOUTS`, holding only what `split` needs."""
    if HUB_LAYOUTS[repo_id] == HPDV2:
        return Path(snapshot_download(repo_id, [f"{split}.json", f"{split}.tar.gz"]))
    root = Path(snapshot_download(repo_id, [f"metadata-{split}.parquet"]))
    if not (root / f"metadata-{split}.parquet").is_file():
        raise ConfigError(f"'{repo_id}' has no split '{split}'; it has: {', '.join(known_splits(root)) or 'none'}")
    folders = imagereward_folders(root / f"metadata-{split}.parquet", split, subset)
    return Path(snapshot_download(repo_id, [f"{folder}.zip" for folder in folders]))


def layout_of(root: Path, split: str) -> str | None:
    """The hub layout a directory holds, recognised by its files; an unknown split of one is refused."""
    if (root / f"metadata-{split}.parquet").is_file():
        return IMAGEREWARD_DB
    if (root / f"{split}.json").is_file() and ((root / f"{split}.tar.gz").is_file() or (root / split).is_dir()):
        return HPDV2
    splits = known_splits(root)
    if splits and (any(root.glob("metadata-*.parquet")) or any(root.glob("*.tar.gz"))):
        raise ConfigError(f"data source '{root}' has no split '{split}'; it has: {', '.join(splits)}")
    return None


def known_splits(root: Path) -> list[str]:
    found = {p.name[len("metadata-"):-len(".parquet")] for p in root.glob("metadata-*.parquet")}
    found |= {p.name[:-len(".json")] for p in root.glob("*.json") if (root / f"{p.stem}.tar.gz").is_file()}
    return sorted(found)


# ---------------------------------------------------------------- ImageRewardDB


def _folder_number(folder: str) -> tuple[int, str]:
    digits = re.search(r"(\d+)$", folder)
    return (int(digits.group(1)) if digits else -1, folder)


def imagereward_folders(metadata: Path, split: str, subset: str) -> list[str]:
    """The image folders (`images/{split}/{split}_{n}`) a split's rows use; for a train subset, the first
    folders in numeric order that cover its number of prompts. Validation and test are the same in every
    subset (the dataset card), so `subset` only matters for train."""
    import pyarrow.parquet as pq

    table = pq.read_table(metadata, columns=["image_path", "prompt_id"]).to_pydict()
    prompts: dict[str, set] = {}
    for image_path, prompt_id in zip(table["image_path"], table["prompt_id"], strict=True):
        prompts.setdefault(posixpath.dirname(str(image_path)), set()).add(prompt_id)
    folders = sorted(prompts, key=_folder_number)
    if split != "train" or not subset:
        return folders
    if subset not in IMAGEREWARD_SUBSETS:
        raise ConfigError(f"ImageRewardDB subset '{subset}' is not one of {', '.join(IMAGEREWARD_SUBSETS)}")
    chosen, covered = [], 0
    for folder in folders:
        if covered >= IMAGEREWARD_SUBSETS[subset]:
            break
        chosen.append(folder)
        covered += len(prompts[folder])
    return chosen


class ZipImages:
    """ImageRewardDB's images read straight out of `images/{split}/{split}_{n}.zip` (no unpacking)."""

    def __init__(self, root: Path):
        self.root = root
        self._zips: dict[Path, tuple[zipfile.ZipFile, dict[str, str]] | None] = {}

    def read(self, relative_path: str) -> bytes:
        folder, name = posixpath.split(str(relative_path))
        unpacked = self.root / folder / name
        if unpacked.is_file():  # a copy whose folders were unpacked by hand
            return unpacked.read_bytes()
        archive = self.root / f"{folder}.zip"
        opened = self._open(archive)
        if opened is None:
            raise BadRow("undecodable_image", f"no archive {folder}.zip for {relative_path}")
        handle, members = opened
        if name not in members:
            raise BadRow("undecodable_image", f"{name} not in {folder}.zip")
        try:
            return handle.read(members[name])
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise BadRow("undecodable_image", f"{name} in {folder}.zip: {exc.__class__.__name__}") from None

    def _open(self, archive: Path) -> tuple[zipfile.ZipFile, dict[str, str]] | None:
        if archive not in self._zips:
            try:
                handle = zipfile.ZipFile(archive)
                members = {posixpath.basename(n): n for n in handle.namelist() if not n.endswith("/")}
                self._zips[archive] = (handle, members)
            except (OSError, zipfile.BadZipFile) as exc:
                log.warning("data: cannot open %s (%s)", archive, exc.__class__.__name__)
                self._zips[archive] = None
        return self._zips[archive]


def imagereward_row_indices(metadata_paths: list[str], folders: list[str]) -> list[int] | None:
    """Rows whose image lies in one of `folders` (None: all of them)."""
    wanted = set(folders)
    keep = [i for i, path in enumerate(metadata_paths) if posixpath.dirname(str(path)) in wanted]
    return None if len(keep) == len(metadata_paths) else keep


# ---------------------------------------------------------------- HPDv2


def _safe_member(name: str) -> str | None:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return None if not parts or ".." in parts else "/".join(parts)


def unpack_once(archive: Path, target: Path, progress: Callable[..., Any] | None = None) -> Path:
    """Unpack `archive` into `target` once: into a hidden partial directory, renamed when complete; a
    partial directory left by an interrupted run is resumed (files of the right size are kept)."""
    if target.is_dir():
        return target
    partial = target.parent / f".{target.name}.unpacking"
    from tqdm import tqdm

    bar = (progress or tqdm)(desc=f"unpacking {archive.name}", unit="file")
    with tarfile.open(archive, "r:*") as tar:  # sequential: a .tar.gz streams, no random access needed
        for member in tar:
            name = _safe_member(member.name)
            if name is None or not member.isfile():
                continue
            out = partial / name
            if out.is_file() and out.stat().st_size == member.size:
                bar.update(1)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            bar.update(1)
    bar.close()
    inner = [p for p in partial.iterdir()] if partial.is_dir() else []
    source = inner[0] if len(inner) == 1 and inner[0].is_dir() and inner[0].name == target.name else partial
    partial.mkdir(exist_ok=True)
    os.replace(source, target)  # atomic: `target` appears complete or not at all
    if partial.exists():
        shutil.rmtree(partial, ignore_errors=True)
    return target


class HpdImages:
    """HPDv2's images under `{split}/` (unpacked from `{split}.tar.gz` on first use), by path or file name."""

    def __init__(self, root: Path, split: str):
        self.root, self.split = root, split
        self._dir: Path | None = None
        self._by_name: dict[str, Path] | None = None

    def read(self, relative_path: str) -> bytes:
        folder = self.folder()
        path = folder / str(relative_path)
        if not path.is_file():
            if self._by_name is None:  # built once, on the first path not found as given
                self._by_name = {p.name: p for p in folder.rglob("*") if p.is_file()}
            path = self._by_name.get(posixpath.basename(str(relative_path)), path)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise BadRow("undecodable_image", f"cannot read {relative_path}: {exc.__class__.__name__}") from None

    def folder(self) -> Path:
        if self._dir is None:
            archive = self.root / f"{self.split}.tar.gz"
            target = self.root / self.split
            self._dir = target if target.is_dir() or not archive.is_file() else unpack_once(archive, target)
        return self._dir
