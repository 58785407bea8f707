"""`python -m pipeline evaluate`: pairwise accuracy of a reasoner with the ImageReward protocol.

    python -m pipeline evaluate --model runs/tiny/checkpoint --dataset THUDM/ImageRewardDB --split test \
        [--listener Qwen/Qwen2.5-VL-7B-Instruct] [--samples 5] [--anchor] [--max-groups 50] [--out report.json]

The dataset is read by `pipeline.data.ranked_groups` (every format; bad rows skipped and counted). Every
pair of a prompt's images with different human ranks is judged (`pipeline.metrics`), each shown in its
seeded image order. The reasoner runs through the rollout worker's vLLM engine (`actors.rollout`):
greedy with `--samples 1`, else n samples at `--temperature` and a majority vote. With `--listener`, the
listener worker (`actors.listener`) scores every completion and the contradiction rate is reported
(`pipeline.rewards.is_contradiction`). With `--anchor`, each image is compared once with the prompt's first
image (n-1 comparisons) and the pairs are judged by the resulting scores.

The JSON report holds `summary` (accuracy, unparsable, tie and contradiction rates, per-category accuracy,
skipped rows by reason, options) and `pairs`, one row per judged pair (pair_id, prompt_id, gold, predicted,
p_preferred, correct, ...), so `summary.accuracy == mean(row.correct)` can be recounted. `gold` is the
preferred image as the pair was shown (after the seeded swap); in anchor mode it is in the pair id's order
(`group:i-j`, 1 = image i), since those pairs are judged by scores and never shown. The summary and the
report go to MLflow (`MLFLOW_TRACKING_URI`, default sqlite:///./mlflow.db), experiment `listener-grpo-eval`.

Departures from the paper's protocol: the reasoner compares two images instead of scoring one, so "a tie"
is a tied vote (or tied anchor scores), and unparsable answers count as wrong rather than being re-asked.

Tests: `.venv/bin/python -m pytest tests/unit/test_eval_protocol.py` (the protocol) and
`.venv/bin/python -m pytest -m integration tests/integration/test_evaluate.py` (the CLI on a tiny model).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.config import EngineConfig
from pipeline.data import RankedGroup, ranked_groups, skip_metrics
from pipeline.formats import ImageBounds, swapped
from pipeline.metrics import (PairRow, anchor_scores, imagereward_pairs, majority_vote, row_from_answers,
                              rows_from_scores, summarize)
from pipeline.prompts import parse_completion
from pipeline.rewards import is_contradiction
from pipeline.types import ListenerScore, PreferencePair, RolloutGroup

log = logging.getLogger(__name__)
EXPERIMENT = "listener-grpo-eval"


@dataclass(frozen=True)
class EvalOptions:
    """Everything one evaluation run depends on (the CLI's options)."""

    model: str
    dataset: str
    split: str = "test"
    listener: str | None = None
    out: Path = Path("report.json")
    samples: int = 1
    temperature: float = 1.0  # used when samples > 1; greedy otherwise
    max_new_tokens: int = 256
    anchor: bool = False
    max_groups: int | None = None
    seed: int = 0
    format: str = "auto"
    subset: str = ""
    ties: str = "skip"
    bounds: ImageBounds = ImageBounds()
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(dtype="float32"))
    experiment: str = EXPERIMENT
    threads: int = 1  # intra-op threads of the engines


# ---------------------------------------------------------------- what to ask


@dataclass(frozen=True)
class Comparison:
    """One question to the reasoner: a pair as shown, plus where it came from."""

    pair: PreferencePair
    group_index: int
    first: int = -1  # anchor mode: index in the group of the image shown as image 1
    second: int = -1  # anchor mode: index of the image shown as image 2


def pairwise_comparisons(groups: list[RankedGroup], seed: int) -> list[Comparison]:
    """Every ImageReward pair of every group, in its seeded image order."""
    return [Comparison(pair=pair, group_index=g) for g, group in enumerate(groups) for pair in group.pairs(seed)]


def anchor_comparisons(groups: list[RankedGroup], seed: int, anchor: int = 0) -> list[Comparison]:
    """Image k of each group against the group's image `anchor` (n-1 per group), seeded order."""
    out = []
    for g, group in enumerate(groups):
        for k in range(len(group.images)):
            if k == anchor:
                continue
            pair_id = f"{group.group_id}:anchor{anchor}-{k}"
            first, second = (anchor, k) if swapped(seed, pair_id) else (k, anchor)
            ranks = group.ranks
            preferred = 1 if ranks[first] <= ranks[second] else 2  # gold of the comparison; unused on ties
            out.append(Comparison(pair=PreferencePair(
                pair_id=pair_id, prompt=group.prompt, image_1=group.images[first], image_2=group.images[second],
                preferred=preferred, prompt_id=group.prompt_id, category=group.category),
                group_index=g, first=first, second=second))
    return out


# ---------------------------------------------------------------- judging (pure)


def answers_of(group: RolloutGroup) -> list[int | None]:
    return [parse_completion(c.text).answer for c in group.completions]


def listener_counts(group: RolloutGroup, scores: dict[tuple[str, int], ListenerScore] | None) -> tuple[int, int]:
    """(contradictions, judged) over a group's completions: parsed answers with a usable listener score."""
    if scores is None:
        return 0, 0
    contradictions = judged = 0
    for completion, answer in zip(group.completions, answers_of(group), strict=True):
        score = scores.get((completion.pair_id, completion.completion_index))
        if answer is None or score is None or not score.usable:
            continue
        judged += 1
        contradictions += is_contradiction(answer, score, group.pair.preferred)
    return contradictions, judged


def pairwise_rows(comparisons: list[Comparison], rollouts: dict[str, RolloutGroup],
                  scores: dict | None) -> list[PairRow]:
    """One row per comparison: majority vote of its completions against the gold image."""
    rows = []
    for comparison in comparisons:
        pair = comparison.pair
        group = rollouts[pair.pair_id]
        row = row_from_answers(pair.pair_id, pair.prompt_id, pair.preferred, answers_of(group), pair.category)
        contradictions, judged = listener_counts(group, scores)
        rows.append(replace(row, contradictions=contradictions, listened=judged))
    return rows


def anchor_rows(groups: list[RankedGroup], comparisons: list[Comparison], rollouts: dict[str, RolloutGroup],
                anchor: int = 0) -> list[PairRow]:
    """ImageReward pairs judged by scores from the anchor comparisons (p of image k over the anchor)."""
    p_over: dict[int, list[float | None]] = {g: [None] * len(group.images) for g, group in enumerate(groups)}
    for comparison in comparisons:
        vote = majority_vote(answers_of(rollouts[comparison.pair.pair_id]))
        k = comparison.first if comparison.first != anchor else comparison.second
        votes_k = vote.votes_1 if comparison.first == k else vote.votes_2
        parsed = vote.votes_1 + vote.votes_2
        p_over[comparison.group_index][k] = votes_k / parsed if parsed else None
    rows = []
    for g, group in enumerate(groups):
        scores = anchor_scores(p_over[g], anchor)
        pair_ids = [group.pair_id(i, j) for i, j, _ in imagereward_pairs(group.ranks)]
        rows += rows_from_scores(group.prompt_id, group.ranks, scores, pair_ids, group.category)
    return rows


def comparison_stats(comparisons: list[Comparison], rollouts: dict[str, RolloutGroup],
                     scores: dict | None) -> dict[str, float | None]:
    """Unparsable and contradiction rates over every completion asked for (both modes)."""
    samples = unparsable = contradictions = judged = 0
    for comparison in comparisons:
        group = rollouts[comparison.pair.pair_id]
        answers = answers_of(group)
        samples += len(answers)
        unparsable += sum(a is None for a in answers)
        c, j = listener_counts(group, scores)
        contradictions, judged = contradictions + c, judged + j
    return {"comparisons": len(comparisons), "completions": samples,
            "unparsable_rate": unparsable / samples if samples else 0.0,
            "contradiction_rate": contradictions / judged if judged else None}


# ---------------------------------------------------------------- engines (the colleagues' worker classes)


def run_reasoner(opts: EvalOptions, model_path: str, pairs: list[PreferencePair]) -> dict[str, RolloutGroup]:
    """The rollout worker, in-process: greedy for one sample, else `samples` at `temperature`."""
    from actors.rollout import RolloutWorker

    worker = RolloutWorker(model_path, opts.engine, seed=opts.seed, num_threads=opts.threads)
    temperature = 0.0 if opts.samples == 1 else opts.temperature
    groups = worker.generate(pairs, opts.samples, opts.max_new_tokens, temperature, 1.0)
    return {group.pair_id: group for group in groups}


def run_listener(opts: EvalOptions, listener_path: str,
                 rollouts: dict[str, RolloutGroup]) -> dict[tuple[str, int], ListenerScore]:
    """The listener worker, in-process: one score per completion."""
    from actors.listener import ListenerWorker, requests_of

    worker = ListenerWorker(listener_path, opts.engine, seed=opts.seed, num_threads=opts.threads)
    scores = worker.score(requests_of(list(rollouts.values())))
    return {(s.pair_id, s.completion_index): s for s in scores}


def _release_engine_memory() -> None:
    """Free a finished engine's memory (vLLM's documented clean-up between engines in one process)."""
    import gc

    from vllm.distributed import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


# ---------------------------------------------------------------- the command


def evaluate(opts: EvalOptions) -> dict:
    """Run the evaluation; returns the report (summary + per-pair rows)."""
    from pipeline.models import resolve_checkpoint

    started = time.perf_counter()
    cache = opts.out.resolve().parent / ".models"  # where tiny:// checkpoints are built
    model_path = resolve_checkpoint(opts.model, "--model", cache)  # fail fast, before reading data
    listener_path = resolve_checkpoint(opts.listener, "--listener", cache) if opts.listener else None
    skipped: Counter = Counter()
    groups = list(ranked_groups(opts.dataset, opts.split, fmt=opts.format, subset=opts.subset, seed=opts.seed,
                                ties=opts.ties, bounds=opts.bounds, skip_counts=skipped, max_groups=opts.max_groups))
    comparisons = (anchor_comparisons(groups, opts.seed) if opts.anchor else pairwise_comparisons(groups, opts.seed))
    rollouts = run_reasoner(opts, model_path, [c.pair for c in comparisons])
    scores = None
    if listener_path:
        _release_engine_memory()  # the reasoner's engine is gone; free it before the listener's starts
        scores = run_listener(opts, listener_path, rollouts)
    if opts.anchor:
        rows = anchor_rows(groups, comparisons, rollouts)
    else:
        rows = pairwise_rows(comparisons, rollouts, scores)
    summary = summarize(rows)
    summary.update(comparison_stats(comparisons, rollouts, scores))  # both modes: over every completion
    summary.update(skipped_rows=dict(sorted(skipped.items())), seconds=time.perf_counter() - started,
                   options=_options_dict(opts))
    return {"summary": summary, "pairs": [row.to_dict() for row in rows]}


def _options_dict(opts: EvalOptions) -> dict:
    return {"model": opts.model, "dataset": opts.dataset, "split": opts.split, "listener": opts.listener,
            "samples": opts.samples, "temperature": opts.temperature if opts.samples > 1 else 0.0,
            "max_new_tokens": opts.max_new_tokens, "anchor": opts.anchor, "max_groups": opts.max_groups,
            "seed": opts.seed, "format": opts.format, "subset": opts.subset, "ties": opts.ties,
            "min_pixels": opts.bounds.min_pixels, "max_pixels": opts.bounds.max_pixels}


def report_metrics(report: dict) -> dict[str, float]:
    """The numeric summary as flat MLflow metrics (eval/accuracy, eval/category/<name>, data/skipped_*)."""
    summary = report["summary"]
    metrics = {f"eval/{k}": float(v) for k, v in summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.update({f"eval/category/{name}": float(c["accuracy"]) for name, c in summary["per_category"].items()})
    metrics.update(skip_metrics(summary["skipped_rows"]))
    return metrics


def log_to_mlflow(report: dict, report_path: Path, experiment: str) -> str:
    """One MLflow run with the options as params, the summary as metrics and the report as an artifact."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(""))
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    options = report["summary"]["options"]
    run = client.create_run(experiment_id, run_name=f"eval-{Path(str(options['model'])).name}")
    run_id = run.info.run_id
    from mlflow.entities import Metric, Param

    stamp = int(time.time() * 1000)
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(options.items())],
                     metrics=[Metric(k, v, stamp, 0) for k, v in sorted(report_metrics(report).items())])
    client.log_artifact(run_id, str(report_path))
    client.set_terminated(run_id)
    return run_id


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(
        model=args.model, dataset=args.dataset, split=args.split, listener=args.listener, out=Path(args.out),
        samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        anchor=args.anchor, max_groups=args.max_groups, seed=args.seed, format=args.format, subset=args.subset,
        ties=args.ties, bounds=ImageBounds(args.min_pixels, args.max_pixels, args.max_image_pixels),
        engine=EngineConfig(dtype=args.dtype, max_model_len=args.max_model_len), threads=args.threads,
    )


def evaluate_command(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    report = evaluate(opts)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=1) + "\n")
    run_id = log_to_mlflow(report, opts.out, opts.experiment)
    s = report["summary"]
    print(f"accuracy {s['accuracy']:.4f} over {s['pairs']} pairs of {s['prompts']} prompts; unparsable "
          f"{s['unparsable_rate']:.3f}; contradictions {s['contradiction_rate']}; skipped {s['skipped_rows']}; "
          f"report {opts.out}; MLflow run {run_id}")
    return 0
