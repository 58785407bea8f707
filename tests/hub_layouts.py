"""Local copies of the paper's hub datasets, laid out file for file as `huggingface_hub.snapshot_download`
leaves them (docs/evaluation.md "Hub layouts" says what each was checked against). Built by test code,
nothing downloaded.

- `write_imagereward_db(root, groups)`: THUDM/ImageRewardDB: `README.md`, the loading script
  `ImageRewardDB.py` (present, as on the hub; it raises if anything ever runs it), `metadata-{split}.parquet`
  with the card's nine columns (rows shuffled, so a prompt's rows are not contiguous), and
  `images/{split}/{split}_{n}.zip` holding lossless WebP files at the zip's root plus `{split}_{n}.json`
  of the folder's records. A rank of None plants an undecodable image (bytes that are not WebP).
- `write_hpdv2(root, split, items)`: ymhao/HPDv2: `{split}.json` and `{split}.tar.gz` (JPEG files under
  `{split}/` in the archive). Test items are ranked rows (`prompt`, `image_path` [n], `rank` [n],
  `raw_annotations`); train items are pairs (`prompt`, `file_path` [2], `human_preference` [2]).

Images are grey with the level set by the rank (`grey(rank)`), so a test can check from the pixels which
file was read. The expected protocol pairs come from `expected_pairs`, the ImageReward rule applied to the
same ranks (decodable images only), never copied from the code under test.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import tarfile
import uuid
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SCRIPT = '''"""Stand-in for the hub's ImageRewardDB loading script: present in the tree, never to be executed."""
raise RuntimeError("the ImageRewardDB loading script was executed")
'''
CARD = "---\nlicense: apache-2.0\n---\n# ImageRewardDB (local test copy of the hub layout)\n"
# The card's columns, in its order; ranks and ratings as floats (see docs/evaluation.md "Hub layouts").
METADATA_SCHEMA = pa.schema([
    ("image_path", pa.string()), ("prompt_id", pa.string()), ("prompt", pa.string()),
    ("classification", pa.string()), ("image_amount_in_total", pa.float64()), ("rank", pa.float64()),
    ("overall_rating", pa.float64()), ("image_text_alignment_rating", pa.float64()),
    ("fidelity_rating", pa.float64()),
])
CORRUPT = b"RIFF\x10\x00\x00\x00WEBPVP8 not an image"


def grey(rank: float) -> tuple[int, int, int]:
    level = int(40 * rank) % 256
    return (level, level, level)


def image_bytes(rank: float, fmt: str, size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    options = {"lossless": True} if fmt == "WEBP" else {"quality": 95}
    Image.new("RGB", size, grey(rank)).save(buffer, fmt, **options)
    return buffer.getvalue()


def expected_pairs(groups: dict[str, list]) -> dict[str, list[tuple[float, float]]]:
    """The protocol's pairs per prompt, as the sorted (better rank, worse rank) of each: every two
    decodable images (rank not None) of a prompt with different ranks. (Positions would not do: the
    table's rows are shuffled, so a prompt's images come in table order.)"""
    out = {}
    for prompt_id, ranks in groups.items():
        kept = [r for r in ranks if r is not None]
        out[prompt_id] = sorted((min(a, b), max(a, b)) for a, b in itertools.combinations(kept, 2) if a != b)
    return out


def write_imagereward_db(root: Path, groups: dict[str, dict[str, list]], per_folder: int = 2,
                         seed: int = 0, size: tuple[int, int] = (32, 32),
                         rank_type: pa.DataType = pa.float64(), prompts: dict[str, str] | None = None) -> Path:
    """`groups[split][prompt_id]` = the ranks of that prompt's images (None: an undecodable image).
    Prompts fill folders `{split}_1`, `{split}_2`, ... `per_folder` prompts each; a prompt's text is
    `prompts[prompt_id]`, else "prompt <id>"."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(CARD)
    (root / "ImageRewardDB.py").write_text(SCRIPT)
    rng = random.Random(seed)
    for split, split_groups in groups.items():
        records, by_folder = [], {}
        for p, (prompt_id, ranks) in enumerate(split_groups.items()):
            folder = f"images/{split}/{split}_{p // per_folder + 1}"
            for k, rank in enumerate(ranks):
                name = f"{uuid.UUID(int=rng.getrandbits(128))}.webp"
                record = {"image_path": f"{folder}/{name}", "prompt_id": prompt_id,
                          "prompt": (prompts or {}).get(prompt_id, f"prompt {prompt_id}"),
                          "classification": "Arts" if p % 2 else "People",
                          "image_amount_in_total": float(len(ranks)), "rank": float(3 if rank is None else rank),
                          "overall_rating": 4.0, "image_text_alignment_rating": 4.0, "fidelity_rating": 4.0}
                records.append(record)
                data = CORRUPT if rank is None else image_bytes(rank, "WEBP", size)
                by_folder.setdefault(folder, []).append((name, data, record))
        for folder, members in by_folder.items():
            (root / folder).parent.mkdir(parents=True, exist_ok=True)
            stem = Path(folder).name
            with zipfile.ZipFile(root / f"{folder}.zip", "w") as archive:
                for name, data, _ in members:
                    archive.writestr(name, data)
                archive.writestr(f"{stem}.json", json.dumps([record for _, _, record in members]))
        rng.shuffle(records)  # the table's rows are not grouped by prompt
        schema = METADATA_SCHEMA.set(METADATA_SCHEMA.get_field_index("rank"), pa.field("rank", rank_type))
        columns = {f.name: pa.array([r[f.name] for r in records]).cast(f.type) for f in schema}
        pq.write_table(pa.table(columns, schema=schema), root / f"metadata-{split}.parquet")
    return root


def write_hpdv2(root: Path, split: str, items: list[dict], size: tuple[int, int] = (32, 32),
                corrupt: set[str] = frozenset(), member_prefix: str | None = None) -> Path:
    """`items`: rows of `{split}.json` without file contents; each named file is written into
    `{split}.tar.gz` (under `member_prefix`/, default `{split}/`) as a grey JPEG of its rank (test) or of
    its preference (train: 1 -> rank 1, 0 -> rank 2); names in `corrupt` get bytes that are not an image."""
    root.mkdir(parents=True, exist_ok=True)
    prefix = split if member_prefix is None else member_prefix
    files: dict[str, bytes] = {}
    for item in items:
        names = item.get("image_path") or item["file_path"]
        levels = item.get("rank") or [1 if p else 2 for p in item["human_preference"]]
        for name, level in zip(names, levels, strict=True):
            files[name] = b"\xff\xd8\xff not a jpeg" if name in corrupt else image_bytes(level, "JPEG", size)
    with tarfile.open(root / f"{split}.tar.gz", "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{prefix}/{name}" if prefix else name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    (root / f"{split}.json").write_text(json.dumps(items))
    return root


def hpdv2_test_items(ranks: list[list[int]]) -> list[dict]:
    """Ranked rows as in HPDv2's test.json (with the per-annotator ranks beside the averaged ones)."""
    return [{"prompt": f"hpd test {k}", "image_path": [f"{k:05d}{i}.jpg" for i in range(len(r))], "rank": r,
             "raw_annotations": [{"rank": r, "user_hash": "u0"}]} for k, r in enumerate(ranks)]


def hpdv2_train_items(preferences: list[list[int]]) -> list[dict]:
    """Pair rows as in HPDv2's train.json (`human_preference`: 1 marks the preferred image)."""
    return [{"prompt": f"hpd train {k}", "file_path": [f"{k:05d}_a.jpg", f"{k:05d}_b.jpg"],
             "human_preference": p} for k, p in enumerate(preferences)]


def corrupt_members(root: Path) -> set[str]:
    """The `image_path`s of an ImageRewardDB copy whose zip members are not images (what `CORRUPT` planted)."""
    found = set()
    for archive in root.glob("images/*/*.zip"):
        with zipfile.ZipFile(archive) as handle:
            folder = archive.relative_to(root).with_suffix("").as_posix()
            found |= {f"{folder}/{name}" for name in handle.namelist() if handle.read(name) == CORRUPT}
    return found
