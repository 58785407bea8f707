"""`python -m pipeline evaluate`: pairwise accuracy of a reasoner with the ImageReward protocol.

    python -m pipeline evaluate --model runs/tiny/checkpoint --dataset THUDM/ImageRewardDB --split test \
        [--listener Qwen/Qwen2.5-VL-7B-Instruct] [--samples 5] [--anchor] [--max-groups 50] [--out report.json]

The dataset is read by `pipeline.eval.groups.ranked_groups` (every format; bad rows skipped and counted). Every
pair of a prompt's images with different human ranks is judged (`pipeline.metrics`), each shown in its
seeded image order. The reasoner runs through the rollout worker's vLLM engine (`actors.rollout`):
greedy with `--samples 1`, else n samples at `--temperature` and a majority vote. With `--listener`, the
listener worker (`actors.listener`) scores every completion and the contradiction rate is reported
(`pipeline.rewards.is_contradiction`). With `--anchor`, each image is compared once with the prompt's first
image (n-1 comparisons) and scored by the reasoner's probability of naming it at the answer position
(`RolloutWorker.answer_p_image_1`, mean over the samples), so the pairs are judged by continuous scores
and tie only when the probabilities are equal. With `--both-orders` every comparison is also asked with
the images swapped (`pipeline.eval_stats`: accuracy per order, mean, position-bias rate; anchor scores
average both orders).

`--dataset` takes a hub id, a local path or a preset of the paper's test sets (`imagereward-test`,
`hpdv2-test`, `rapidata-style`; `pipeline.eval_presets`, docs/evaluation.md). `min_pixels`, `max_pixels`,
`max_new_tokens` and the dtype come from the checkpoint's run (`policy/run_config.yaml`) unless given on
the command line; what was used, and from where, is printed and recorded in `summary.options`.

The JSON report holds `summary` (accuracy = `accuracy_pair_weighted`, `accuracy_prompt_weighted`,
`accuracy_vote_weighted` where votes exist, order statistics, unparsable, tie and contradiction rates,
per-category accuracy, skipped rows by reason, options), `analysis` (further analyses of the same rows,
e.g. agreement with the listener) and `pairs`, one row per judged pair (pair_id, prompt_id, gold, predicted,
p_preferred, correct, ...), so `summary.accuracy == mean(row.correct)` can be recounted. `gold` is the
preferred image as the pair was shown (after the seeded swap); in anchor mode it is in the pair id's order
(`group:i-j`, 1 = image i), since those pairs are judged by scores and never shown. The summary and the
report go to MLflow (`MLFLOW_TRACKING_URI`, default sqlite:///./mlflow.db), experiment `listener-grpo-eval`;
names are made valid by `pipeline.tracking.mlflow_safe_name` (the report keeps the original names).

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
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.config import EngineConfig
from pipeline.data import skip_metrics
from pipeline.eval.groups import RankedGroup, ranked_groups
from pipeline.eval.presets import EvalSettings, resolve_dataset, resolve_settings
from pipeline.eval.stats import (SWAPPED_SUFFIX, answer_prefix, mean_or_none, order_stats,
                                 prompt_weighted_accuracy, vote_weighted_accuracy)
from pipeline.data.formats import ImageBounds, swapped
from pipeline.eval.protocol import (PairRow, anchor_scores, imagereward_pairs, row_from_answers, rows_from_scores,
                              summarize)
from pipeline.prompts import parse_completion
from pipeline.rewards import agreement_metrics, is_contradiction
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
    max_new_tokens: int | None = None  # None: from the checkpoint's run, else 256 (eval_presets)
    anchor: bool = False
    both_orders: bool = False
    max_groups: int | None = None
    seed: int = 0
    format: str = "auto"
    subset: str = ""
    ties: str = "skip"
    min_pixels: int | None = None  # None: from the checkpoint's run, else the defaults (eval_presets)
    max_pixels: int | None = None
    max_image_pixels: int = 4096 * 4096
    dtype: str | None = None
    max_model_len: int = 4096
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


def with_swapped_orders(comparisons: list[Comparison]) -> list[Comparison]:
    """Each comparison, then the same with its images swapped (id + `SWAPPED_SUFFIX`, gold swapped too)."""
    out = []
    for c in comparisons:
        pair = c.pair
        flipped = replace(pair, pair_id=pair.pair_id + SWAPPED_SUFFIX, image_1=pair.image_2, image_2=pair.image_1,
                          preferred=3 - pair.preferred)
        out += [c, Comparison(pair=flipped, group_index=c.group_index, first=c.second, second=c.first)]
    return out


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


def anchor_rows(groups: list[RankedGroup], comparisons: list[Comparison], p_image_1: dict[str, float | None],
                anchor: int = 0) -> list[PairRow]:
    """ImageReward pairs judged by continuous scores: image k's score is p(image k over the anchor), the
    reasoner's probability of naming k at the answer position (`p_image_1[pair_id]`: p of the image shown
    first, None when no answer parsed), averaged over the orders it was asked in. Equal scores tie."""
    asked: dict[tuple[int, int], list[float | None]] = defaultdict(list)
    for comparison in comparisons:
        k = comparison.first if comparison.first != anchor else comparison.second
        p = p_image_1.get(comparison.pair.pair_id)
        asked[comparison.group_index, k].append(None if p is None else p if comparison.first == k else 1.0 - p)
    p_over = {g: [mean_or_none(asked.get((g, k), [])) for k in range(len(group.images))]
              for g, group in enumerate(groups)}
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


def run_reasoner(opts: EvalOptions, settings: EvalSettings, model_path: str, pairs: list[PreferencePair]
                 ) -> tuple[dict[str, RolloutGroup], dict[str, float | None]]:
    """The rollout worker, in-process: greedy for one sample, else `samples` at `temperature`. With
    `--anchor`, also p(image 1) per pair: the mean over its parsed completions of the probability read at
    their answer position (None when none parsed)."""
    from actors.rollout import RolloutWorker

    worker = RolloutWorker(model_path, engine_config(opts, settings), seed=opts.seed, num_threads=opts.threads)
    temperature = 0.0 if opts.samples == 1 else opts.temperature
    groups = worker.generate(pairs, opts.samples, settings.max_new_tokens, temperature, 1.0)
    rollouts = {group.pair_id: group for group in groups}
    if not opts.anchor:
        return rollouts, {}
    asked = [(g.pair, prefix) for g in groups for c in g.completions if (prefix := answer_prefix(c.text))]
    probabilities = worker.answer_p_image_1([pair for pair, _ in asked], [prefix for _, prefix in asked])
    per_pair: dict[str, list[float | None]] = defaultdict(list)
    for (pair, _), p in zip(asked, probabilities, strict=True):
        per_pair[pair.pair_id].append(p)
    return rollouts, {pair_id: mean_or_none(per_pair.get(pair_id, [])) for pair_id in rollouts}


def run_listener(opts: EvalOptions, settings: EvalSettings, listener_path: str,
                 rollouts: dict[str, RolloutGroup]) -> dict[tuple[str, int], ListenerScore]:
    """The listener worker, in-process: one score per completion."""
    from actors.listener import ListenerWorker, requests_of

    worker = ListenerWorker(listener_path, engine_config(opts, settings), seed=opts.seed, num_threads=opts.threads)
    scores = worker.score(requests_of(list(rollouts.values())))
    return {(s.pair_id, s.completion_index): s for s in scores}


def engine_config(opts: EvalOptions, settings: EvalSettings) -> EngineConfig:
    return EngineConfig(dtype=settings.dtype, max_model_len=opts.max_model_len)


def _release_engine_memory() -> None:
    """Free a finished engine's memory (vLLM's documented clean-up between engines in one process)."""
    import gc

    from vllm.distributed import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


# ---------------------------------------------------------------- the command


def evaluate(opts: EvalOptions) -> dict:
    """Run the evaluation; returns the report (summary, analysis, per-pair rows)."""
    from pipeline.models import resolve_checkpoint

    started = time.perf_counter()
    cache = opts.out.resolve().parent / ".models"  # where tiny:// checkpoints are built
    model_path = resolve_checkpoint(opts.model, "--model", cache)  # fail fast, before reading data
    listener_path = resolve_checkpoint(opts.listener, "--listener", cache) if opts.listener else None
    settings = resolve_settings(model_path, {"min_pixels": opts.min_pixels, "max_pixels": opts.max_pixels,
                                             "max_new_tokens": opts.max_new_tokens, "dtype": opts.dtype})
    print(f"evaluate: {settings.describe()}", flush=True)
    preset = resolve_dataset(opts.dataset)
    source, split, fmt, subset = ((preset.source, preset.split, preset.format, preset.subset) if preset
                                  else (opts.dataset, opts.split, opts.format, opts.subset))
    skipped: Counter = Counter()
    bounds = ImageBounds(settings.min_pixels, settings.max_pixels, opts.max_image_pixels)
    groups = list(ranked_groups(source, split, fmt=fmt, subset=subset, seed=opts.seed, ties=opts.ties,
                                bounds=bounds, skip_counts=skipped, max_groups=opts.max_groups))
    comparisons = (anchor_comparisons(groups, opts.seed) if opts.anchor else pairwise_comparisons(groups, opts.seed))
    if opts.both_orders:
        comparisons = with_swapped_orders(comparisons)
    rollouts, p_image_1 = run_reasoner(opts, settings, model_path, [c.pair for c in comparisons])
    scores = None
    if listener_path:
        _release_engine_memory()  # the reasoner's engine is gone; free it before the listener's starts
        scores = run_listener(opts, settings, listener_path, rollouts)
    rows = anchor_rows(groups, comparisons, p_image_1) if opts.anchor else pairwise_rows(comparisons, rollouts, scores)
    summary = summarize(rows)
    summary.update(weighted_accuracies(rows, groups))
    summary.update(order_stats(rows))
    summary.update(comparison_stats(comparisons, rollouts, scores))  # both modes: over every completion
    summary.update(skipped_rows=dict(sorted(skipped.items())), seconds=time.perf_counter() - started,
                   options=_options_dict(opts, settings, source, split, subset)
                   | {"weighting": preset.weighting if preset else "pairs"})
    # `analysis`: further analyses of the same rows (e.g. accuracy where the reasoner agrees with the listener)
    analysis = {}
    if scores is not None and not opts.anchor:  # anchor comparisons of equal ranks have no gold to be right on
        # the paper's agreement analysis over every completion, the same function as the training metrics
        agreement = agreement_metrics((answer, scores.get((c.pair_id, c.completion_index)), g.pair.preferred)
                                      for g in rollouts.values() for c, answer in zip(g.completions, answers_of(g)))
        analysis["listener_agreement"] = {k: None if v != v else v for k, v in agreement.items()}  # NaN -> null
    return {"summary": summary, "analysis": analysis, "pairs": [row.to_dict() for row in rows]}


def weighted_accuracies(rows: list[PairRow], groups: list[RankedGroup]) -> dict[str, float]:
    """Pair-weighted (ImageReward's test.py), prompt-weighted (HPS v2) and, where the groups carry human
    votes, vote-weighted accuracy."""
    out = {"accuracy_pair_weighted": summarize(rows)["accuracy"] if rows else 0.0,
           "accuracy_prompt_weighted": prompt_weighted_accuracy(rows)}
    votes = {}
    for group in groups:
        if len(group.votes) == 2:
            preferred = 0 if group.ranks[0] < group.ranks[1] else 1
            votes[group.pair_id(0, 1)] = (group.votes[preferred], group.votes[1 - preferred])
    by_vote = vote_weighted_accuracy(rows, votes) if votes else None
    if by_vote is not None:
        out["accuracy_vote_weighted"] = by_vote
    return out


def _options_dict(opts: EvalOptions, settings: EvalSettings, source: str, split: str, subset: str) -> dict:
    return {"model": opts.model, "dataset": opts.dataset, "source": source, "split": split,
            "listener": opts.listener, "samples": opts.samples,
            "temperature": opts.temperature if opts.samples > 1 else 0.0, "max_new_tokens": settings.max_new_tokens,
            "anchor": opts.anchor, "both_orders": opts.both_orders, "max_groups": opts.max_groups, "seed": opts.seed,
            "format": opts.format, "subset": subset, "ties": opts.ties, "min_pixels": settings.min_pixels,
            "max_pixels": settings.max_pixels, "dtype": settings.dtype, "max_model_len": opts.max_model_len,
            "settings_from": dict(settings.sources)}


def report_metrics(report: dict) -> dict[str, float]:
    """The numeric summary as flat metrics (eval/accuracy, eval/category/<name>, data/skipped_*), with
    the report's own names; `log_to_mlflow` makes them valid for MLflow."""
    summary = report["summary"]
    metrics = {f"eval/{k}": float(v) for k, v in summary.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.update({f"eval/category/{name}": float(c["accuracy"]) for name, c in summary["per_category"].items()})
    metrics.update(skip_metrics(summary["skipped_rows"]))
    return metrics


def log_to_mlflow(report: dict, report_path: Path, experiment: str) -> str:
    """One MLflow run with the options as params, the summary as metrics and the report as an artifact."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import mlflow_safe_keys, resolve_tracking_uri

    client = MlflowClient(tracking_uri=resolve_tracking_uri(""))
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    options = report["summary"]["options"]
    run = client.create_run(experiment_id, run_name=f"eval-{Path(str(options['model'])).name}")
    run_id = run.info.run_id
    stamp = int(time.time() * 1000)
    params = mlflow_safe_keys({k: str(v)[:6000] for k, v in sorted(options.items())})
    metrics = mlflow_safe_keys(dict(sorted(report_metrics(report).items())))
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                     metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()])
    client.log_artifact(run_id, str(report_path))
    client.set_terminated(run_id)
    return run_id


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(
        model=args.model, dataset=args.dataset, split=args.split, listener=args.listener, out=Path(args.out),
        samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
        anchor=args.anchor, both_orders=args.both_orders, max_groups=args.max_groups, seed=args.seed,
        format=args.format, subset=args.subset, ties=args.ties, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels, max_image_pixels=args.max_image_pixels, dtype=args.dtype,
        max_model_len=args.max_model_len, threads=args.threads,
    )


def evaluate_command(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    report = evaluate(opts)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=1) + "\n")
    run_id = log_to_mlflow(report, opts.out, opts.experiment)
    s = report["summary"]
    if "accuracy_vote_weighted" in s:
        print(f"vote-weighted accuracy {s['accuracy_vote_weighted']:.4f} (weighting: {s['options']['weighting']})")
    print(f"accuracy {s['accuracy']:.4f} (pair-weighted; prompt-weighted {s['accuracy_prompt_weighted']:.4f}) "
          f"over {s['pairs']} pairs of {s['prompts']} prompts; unparsable {s['unparsable_rate']:.3f}; "
          f"contradictions {s['contradiction_rate']}; skipped {s['skipped_rows']}; report {opts.out}; "
          f"MLflow run {run_id}")
    return 0
