"""The format warm start's targets (pipeline/sft.py) and its loss (pipeline/grpo.py `sft_loss`)."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import torch

from pipeline.grpo import LossNormalizer, sft_loss
from pipeline.prompts import format_target, mask_answer, parse_completion
from pipeline.sft import (SftSettings, describe_synthetic_image, sft_answer, sft_examples, sft_faithful, sft_pairs,
                          sft_reasoning)
from pipeline.synthetic import draw_shape, synthetic_pairs


def test_descriptions_read_off_the_pixels_match_the_generator() -> None:
    import random

    for colour in ("red", "white", "purple"):
        for shape in ("circle", "square", "triangle"):
            for trial in range(5):
                image = draw_shape(colour, shape, 56, random.Random(trial))
                assert describe_synthetic_image(image) == f"{colour} {shape}"
    for pair in synthetic_pairs(seed=3, count=100):
        preferred, other = (pair.image_1, pair.image_2) if pair.preferred == 1 else (pair.image_2, pair.image_1)
        assert f"a {describe_synthetic_image(preferred)}" == pair.prompt
        assert f"a {describe_synthetic_image(other)}" != pair.prompt


def test_reasoning_describes_without_a_verdict_and_parses() -> None:
    pair = next(synthetic_pairs(seed=0, count=1))
    reasoning = sft_reasoning(pair)
    assert reasoning.startswith(f"The prompt asks for {pair.prompt}. Image 1 shows a ")
    target = format_target(reasoning, 2)
    assert parse_completion(target).answer == 2
    assert mask_answer(target) == reasoning  # the listener sees all of it: nothing names a verdict


def test_answers_are_seeded_coins_right_about_half_the_time() -> None:
    settings = SftSettings(pairs_per_step=50)
    pairs = [p for step in range(4) for p in sft_pairs(settings, step)]
    answers = [sft_answer(pair, settings.seed, i, 0.5) for i, pair in pairs]
    assert answers == [sft_answer(pair, settings.seed, i, 0.5) for i, pair in pairs]  # reproducible
    right = sum(a == pair.preferred for a, (_, pair) in zip(answers, pairs)) / len(pairs)
    assert 0.4 < right < 0.6
    assert all(sft_answer(pair, 0, i, 1.0) == pair.preferred for i, pair in pairs)
    assert all(sft_answer(pair, 0, i, 0.0) != pair.preferred for i, pair in pairs)


def test_reasoner_targets_are_all_faithful_at_rate_one() -> None:
    settings = SftSettings(pairs_per_step=40, faithful_rate=1.0)  # the listener experiment's (docs/listener.md)
    pairs = sft_pairs(settings, 0)
    for (_, pair), (_, _, target) in zip(pairs, sft_examples(pairs, settings)):
        reasoning = parse_completion(target).reasoning
        assert reasoning == sft_reasoning(pair)
        assert f"Image 1 shows a {describe_synthetic_image(pair.image_1)}." in reasoning


def test_reasoner_targets_describe_faithfully_by_a_coin_independent_of_the_answer() -> None:
    settings = SftSettings(pairs_per_step=100)
    assert settings.faithful_rate == 0.5  # the default: tiny://reasoner-sft, the demo and CI
    pairs = sft_pairs(settings, 0)
    targets = [parse_completion(target) for _, _, target in sft_examples(pairs, settings)]
    faithful = [sft_faithful(settings.seed, i, settings.faithful_rate) for i, _ in pairs]
    for (_, pair), target, honest in zip(pairs, targets, faithful):
        assert target.reasoning == sft_reasoning(pair, swap=not honest)
        # read off the pixels: a faithful target gives image 1 its own description, a swapped one image 2's
        first = describe_synthetic_image(pair.image_1 if honest else pair.image_2)
        assert f"Image 1 shows a {first}." in target.reasoning
    assert 0.4 < sum(faithful) / len(faithful) < 0.6
    right = [target.answer == pair.preferred for (_, pair), target in zip(pairs, targets)]
    # independent coins: each of the four (faithful, right) combinations about a quarter of the time
    for combination in ((True, True), (True, False), (False, True), (False, False)):
        assert 0.12 < sum((f, r) == combination for f, r in zip(faithful, right)) / len(pairs) < 0.38
    assert all(sft_faithful(0, i, 1.0) for i, _ in pairs) and not any(sft_faithful(0, i, 0.0) for i, _ in pairs)


def test_sft_pairs_are_disjoint_from_training_and_heldout_streams() -> None:
    ids = {pair.pair_id for _, pair in sft_pairs(SftSettings(), 0)}
    assert not ids & {p.pair_id for p in synthetic_pairs(seed=0, count=16)}
    assert not ids & {p.pair_id for p in synthetic_pairs(seed=1_000_003, count=16)}
    assert not ids & {p.pair_id for p in synthetic_pairs(seed=0, count=16, task="render")}


def test_sft_pairs_take_the_tasks_in_turn_and_describe_the_grey_failures() -> None:
    pairs = [pair for _, pair in sft_pairs(SftSettings(), 0)]
    assert [p.pair_id.startswith("synthetic-render-") for p in pairs] == [i % 2 == 1 for i in range(len(pairs))]
    render = pairs[1]
    rejected = render.image_2 if render.preferred == 1 else render.image_1
    assert describe_synthetic_image(rejected) == f"grey {render.prompt.split()[2]}"
    assert [p.pair_id for _, p in sft_pairs(SftSettings(tasks=("match",)), 0)] == [
        f"synthetic-{SftSettings().seed + 2_000_003}-{i}" for i in range(16)]


def test_sft_loss_is_the_token_mean_nll_over_the_whole_batch_by_hand() -> None:
    logp_BT = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.5, -3.0]])
    mask_BT = torch.tensor([[True, True, False], [True, True, True]])
    whole = LossNormalizer(total_tokens=5, total_sequences=2, max_tokens=8)
    assert torch.isclose(sft_loss(logp_BT, mask_BT, whole), torch.tensor(7.0 / 5))
    # Micro-batches' contributions add up to the whole batch's loss (the global normaliser).
    parts = sft_loss(logp_BT[:1], mask_BT[:1], whole) + sft_loss(logp_BT[1:], mask_BT[1:], whole)
    assert torch.isclose(parts, torch.tensor(7.0 / 5))


def test_sft_loss_gradient_is_minus_one_over_total_tokens_on_real_tokens() -> None:
    logp_BT = torch.tensor([[-1.0, -2.0, -4.0]], requires_grad=True)
    mask_BT = torch.tensor([[True, True, False]])
    sft_loss(logp_BT, mask_BT, LossNormalizer(total_tokens=4, total_sequences=2, max_tokens=8)).backward()
    assert torch.equal(logp_BT.grad, torch.tensor([[-0.25, -0.25, 0.0]]))


def test_tiny_reasoner_sft_is_reused_once_built(tmp_path) -> None:
    from pipeline.models import resolve_checkpoint

    built = tmp_path / "tiny-reasoner-sft"
    built.mkdir()
    # written last by warm_start: the build is complete, and made with the default settings
    (built / "sft_manifest.json").write_text(json.dumps({"settings": asdict(SftSettings())}))
    assert resolve_checkpoint("tiny://reasoner-sft", "model.reasoner", tmp_path) == str(built)


def test_a_warm_start_built_with_other_settings_is_not_reused(tmp_path) -> None:
    from pipeline.models import built_with_default_settings

    assert not built_with_default_settings(tmp_path)  # nothing built
    (tmp_path / "sft_manifest.json").write_text(json.dumps({"settings": asdict(SftSettings())}))
    assert built_with_default_settings(tmp_path)
    older = {**asdict(SftSettings()), "tasks": ["match"]}  # the defaults before the render task
    (tmp_path / "sft_manifest.json").write_text(json.dumps({"settings": older}))
    assert not built_with_default_settings(tmp_path)


def test_listener_examples_describe_a_pair_of_their_own_stream_beside_independent_images() -> None:
    from pipeline.prompts import listener_prompt
    from pipeline.sft import LISTENER_SFT, listener_example, listener_reading

    settings = LISTENER_SFT
    pairs = sft_pairs(settings, 0, role="listener")
    assert not {p.pair_id for _, p in pairs} & {p.pair_id for _, p in sft_pairs(settings, 0)}  # not the reasoner's
    examples = sft_examples(pairs, settings, role="listener")
    assert len(examples) == len(pairs) == 32
    texts_match_images = 0
    for (index, described), (shown, prompt, target) in zip(pairs, examples):
        truth = {k: describe_synthetic_image(img) for k, img in ((1, described.image_1), (2, described.image_2))}
        _, text, answer = listener_example(described, settings.seed, index, settings.image_size)
        # the text describes the described pair, whichever order and phrasing was drawn ...
        assert text in {listener_reading(described.prompt, truth[1], truth[2], restate, second)
                        for restate in (True, False) for second in (True, False)}
        assert f"Image 1 shows a {truth[1]}." in text and f"Image 2 shows a {truth[2]}." in text
        # ... the target is the image it says matches the prompt ...
        assert target == str(answer) == str(described.preferred)
        assert f"a {truth[described.preferred]}" == described.prompt
        assert prompt == listener_prompt(described.prompt, text) and shown.prompt == described.prompt
        # ... and the images shown are another pair's
        assert shown.image_1.tobytes() != described.image_1.tobytes()
        texts_match_images += (describe_synthetic_image(shown.image_1), describe_synthetic_image(shown.image_2)) \
            == (truth[1], truth[2])
    assert texts_match_images <= 4  # independent draws: the pixels do not tell the target
    assert 8 < sum(e[2] == "1" for e in examples) < 24
    again = sft_examples(pairs, settings, role="listener")
    assert [(p, t) for _, p, t in again] == [(p, t) for _, p, t in examples]  # seeded: the same every time
    other = sft_examples(sft_pairs(replace(settings, seed=1), 0, role="listener"), replace(settings, seed=1),
                         role="listener")
    assert [p for _, p, _ in other] != [p for _, p, _ in examples]  # another seed, other data


def test_tiny_listener_sft_is_reused_only_when_built_as_a_listener(tmp_path) -> None:
    from pipeline.models import built_with_default_settings, resolve_checkpoint
    from pipeline.sft import LISTENER_SFT

    built = tmp_path / "tiny-listener-sft"
    built.mkdir()
    (built / "sft_manifest.json").write_text(json.dumps({"role": "listener", "settings": asdict(LISTENER_SFT)}))
    assert resolve_checkpoint("tiny://listener-sft", "model.listener", tmp_path) == str(built)
    # a reasoner warm start (no role: written before roles existed) is never taken for the listener
    (built / "sft_manifest.json").write_text(json.dumps({"settings": asdict(LISTENER_SFT)}))
    assert not built_with_default_settings(built, "listener")
    assert built_with_default_settings(built, "reasoner") == (LISTENER_SFT == SftSettings())


def test_warm_starts_to_build_lists_each_unbuilt_tiny_warm_start_once(tmp_path) -> None:
    from pipeline.models import warm_starts_to_build
    from pipeline.sft import LISTENER_SFT

    specs = {"model.reasoner": "tiny://reasoner-sft", "model.listener": "tiny://listener-sft"}
    assert warm_starts_to_build(specs, tmp_path) == ["reasoner", "listener"]  # built side by side
    assert warm_starts_to_build({"a": "tiny://listener-sft", "b": "tiny://listener-sft"}, tmp_path) == ["listener"]
    assert warm_starts_to_build({"a": "tiny://listener", "b": "org/name", "c": str(tmp_path)}, tmp_path) == []
    built = tmp_path / "tiny-listener-sft"
    built.mkdir()
    (built / "sft_manifest.json").write_text(json.dumps({"role": "listener", "settings": asdict(LISTENER_SFT)}))
    assert warm_starts_to_build(specs, tmp_path) == ["reasoner"]
