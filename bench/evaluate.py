"""Peak memory and pairs/s of `python -m pipeline evaluate` as the dataset grows: flat when chunked.

    python -m bench.evaluate                                   # 500 and 2,000 pairs chunked, 2,000 in one chunk
    python -m bench.evaluate --pairs 500 1000 2000 --whole 2000 --max-pixels 401408 --out bench/results/evaluate.json

Each run is a separate `python -m pipeline evaluate` process on a local pair set (the `local` jsonl format,
image files beside it) with the tiny reasoner, measured from outside: its peak RSS (`ru_maxrss` of a
wrapper's only child) and its wall time. The images are 640 x 640 (409,600 pixels) and are resized to
`--max-pixels` (default 401,408, the paper checkpoint's upper image bound): each decoded image holds
about 1.2 MB, so 2,000 pairs decoded at once would hold about 4.8 GB. `--whole N` runs N pairs with one
chunk as large as the set, the way `evaluate` decoded every image before judging, side by side with
the chunked runs (`--chunk-pairs`, default 64). Greedy, `--max-new-tokens 4`: the answers do not matter
here, only what a pair costs to hold and judge. The tiny model is built offline (`tiny://reasoner`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import write_result

ROOT = Path(__file__).resolve().parent.parent
DISTINCT_IMAGES = 64  # files on disk; rows reuse them (every pair is still decoded on its own)
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def write_pairs(folder: Path, pairs: int, side: int = 640) -> Path:
    """`pairs` rows of the local format over `DISTINCT_IMAGES` gradient PNGs of side x side pixels."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(DISTINCT_IMAGES):
        path = folder / f"img{k:03d}.png"
        if not path.exists():
            gradient = Image.linear_gradient("L").resize((side, side))
            Image.merge("RGB", (gradient, gradient.rotate(90), Image.new("L", (side, side), 4 * k))).save(path)
    rows = [{"pair_id": f"p{i}", "prompt": f"a picture number {i}",
             "image_1": f"img{(2 * i) % DISTINCT_IMAGES:03d}.png", "image_2": f"img{(2 * i + 1) % DISTINCT_IMAGES:03d}.png",
             "label": 1 + i % 2} for i in range(pairs)]
    out = folder / f"pairs-{pairs}.jsonl"
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def run_once(dataset: Path, pairs: int, chunk_pairs: int, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"report-{pairs}-{chunk_pairs}.json"
    command = [sys.executable, "-m", "pipeline", "evaluate", "--model", args.model, "--dataset", str(dataset),
               "--split", "train", "--max-new-tokens", "4", "--max-pixels", str(args.max_pixels),
               "--min-pixels", str(args.min_pixels), "--max-model-len", "4096", "--chunk-pairs", str(chunk_pairs),
               "--threads", str(args.threads), "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], cwd=work, capture_output=True, text=True,
                          env=_env(work))
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"evaluate failed ({done.returncode}): {done.stderr[-2000:]}")
    max_rss_kb = int(done.stdout.rsplit("MAXRSS_KB", 1)[1].split()[0])
    summary = json.loads(out.read_text())["summary"]
    return {"pairs": pairs, "chunk_pairs": chunk_pairs, "judged": summary["pairs"], "seconds": seconds,
            "pairs_per_s": summary["pairs"] / seconds, "peak_rss_gib": max_rss_kb / 2**20}


def _env(work: Path) -> dict:
    import os

    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "RAY_ADDRESS": ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[500, 2000], help="set sizes, chunked")
    parser.add_argument("--whole", type=int, nargs="*", default=[2000], help="set sizes judged as one chunk")
    parser.add_argument("--chunk-pairs", type=int, default=64)
    parser.add_argument("--max-pixels", type=int, default=401408)
    parser.add_argument("--min-pixels", type=int, default=200704)
    parser.add_argument("--model", default="tiny://reasoner")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "evaluate.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        work = Path(tmp)
        runs = []
        plan = [(n, args.chunk_pairs) for n in args.pairs[:1]] + [(n, max(n, 1) * 2) for n in args.whole]
        plan += [(n, args.chunk_pairs) for n in args.pairs[1:]]  # the smallest set first, then the whole chunk
        for pairs, chunk in plan:
            run = run_once(write_pairs(work / "data", pairs), pairs, chunk, args, work)
            print(json.dumps(run), flush=True)
            runs.append(run)
            write_result({"benchmark": "evaluate", "max_pixels": args.max_pixels, "min_pixels": args.min_pixels,
                          "model": args.model, "threads": args.threads, "runs": runs}, args.out)  # after each run
    return 0


if __name__ == "__main__":
    sys.exit(main())
