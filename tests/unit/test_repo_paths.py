"""The repository stands on its own: no tracked file refers to a path outside it.

Checked in every tracked text file (`git ls-files`, or a walk of the tree without git):
- no relative path that climbs out of the repository (`../x` resolved from the file's own directory),
- no `../shared` and no absolute path into the machine's work area (`/work/...`),
- no bare `DESIGN.md` / `PAPER.md` (the design and the method are `docs/design.md`, `docs/method.md`),
- every relative Markdown link points at a file or directory that exists.

    .venv/bin/python -m pytest tests/unit/test_repo_paths.py
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "runs", "mlruns", "build", "dist"}
CLIMB = re.compile(r"(?<![\w.])((?:\.\./)+)([\w.-]+)")  # ../x, ../../x
WORK = re.compile(r"(?<![\w.~-])/work/")
BARE_DOC = re.compile(r"(?<![\w/.-])(DESIGN|PAPER)\.md")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(Path(d, f).relative_to(ROOT)) for d, dirs, files in os.walk(ROOT)
                 if not dirs.__setitem__(slice(None), [x for x in dirs if x not in SKIP_DIRS]) for f in files]
    return [ROOT / n for n in sorted(names) if (ROOT / n).is_file()]


def read_text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary
    return data.decode("utf-8", errors="replace")


def problems(path: Path, text: str) -> list[str]:
    """What in `text` (the content of `path`, a file of the repo) points outside the repository."""
    found = []
    where = path.relative_to(ROOT)
    for number, line in enumerate(text.splitlines(), 1):
        for match in CLIMB.finditer(line):
            target = (path.parent / (match.group(1) + match.group(2))).resolve()
            if not target.is_relative_to(ROOT):
                found.append(f"{where}:{number}: {match.group(0)!r} leaves the repository")
        if "../shared" in line:
            found.append(f"{where}:{number}: refers to ../shared")
        if WORK.search(line):
            found.append(f"{where}:{number}: absolute path under /work")
        if BARE_DOC.search(line):
            found.append(f"{where}:{number}: {BARE_DOC.search(line).group(0)} is not in the repository "
                         f"(docs/design.md, docs/method.md)")
        if path.suffix == ".md":
            for link in MD_LINK.findall(line):
                if re.match(r"^[a-z][\w+.-]*:|^#|^/", link):  # URLs, anchors, absolute site paths
                    continue
                target = (path.parent / link.split("#", 1)[0]).resolve()
                if not target.is_relative_to(ROOT) or not target.exists():
                    found.append(f"{where}:{number}: link {link} points at nothing in the repository")
    return found


def test_no_tracked_file_refers_outside_the_repository():
    files = tracked_files()
    assert len(files) > 50 and ROOT / "README.md" in files
    found = []
    for path in files:
        if path == Path(__file__).resolve():
            continue  # this file spells the forbidden patterns out as test data
        text = read_text(path)
        if text is not None:
            found += problems(path, text)
    assert not found, "\n".join(found[:40])


def test_design_and_method_are_in_the_repository():
    for name in ("design.md", "method.md"):
        assert len((ROOT / "docs" / name).read_text().splitlines()) > 40, name
    readme = (ROOT / "README.md").read_text()
    assert "(docs/method.md)" in readme and "(docs/design.md)" in readme


@pytest.mark.parametrize("relative,text,expected", [
    ("README.md", "see [`../shared/PAPER.md`]", ["leaves the repository", "../shared"]),
    ("README.md", "[the design](docs/nowhere.md)", ["link docs/nowhere.md"]),
    ("pipeline/x.py", '"""(DESIGN.md "Contracts")"""', ["DESIGN.md"]),
    ("deploy/job/x.yaml", "path: ../../../etc", ["leaves the repository"]),
    ("bench/results/x.json", '"config": "/work/main/configs/a.yaml"', ["absolute path under /work"]),
    ("deploy/job/x.yaml", "resources: [../raycluster.yaml, ../../README.md]", []),
    ("docs/x.md", "[method](method.md), [site](https://example.com/../x), `/mnt/runs`", []),
])
def test_the_check_catches_what_it_should(relative, text, expected):
    """Hand-made lines, each placed as if it were in the file `relative` (whether or not it exists)."""
    found = problems(ROOT / relative, text)
    assert len(found) == len(expected), found
    for problem, fragment in zip(found, expected):
        assert fragment in problem, (problem, fragment)
