"""pipeline/prompts.py: the strict answer parser, answer masking, prompt rendering, the listener's
renormalised probability. Pure, no model: `pytest tests/unit/test_prompts.py`."""

from __future__ import annotations

import math

import pytest

from pipeline.prompts import (
    IMAGE_PLACEHOLDER,
    LISTENER_ANSWER_TOKENS,
    SYSTEM_PROMPT,
    answer_leaks,
    extract_reasoning,
    format_target,
    is_verdict,
    listener_p_image_1,
    listener_prompt,
    mask_answer,
    parse_completion,
    reasoner_prompt,
    render_chat,
    verdict_images,
)

# ---- the strict parser ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, answer, reasoning", [
    ("<think>A is red.</think><answer>1</answer>", 1, "A is red."),
    (" <think>A is red.</think>\n<answer> Image 2 </answer>\n", 2, "A is red."),  # whitespace, "Image N"
    ("<THINK>x</THINK><ANSWER>2</ANSWER>", 2, "x"),  # tags are case-insensitive
    ("<think>line one\nline two</think><answer>image1</answer>", 1, "line one\nline two"),
    ("<think>红色圆圈 🎨 in image 1 — näive.</think><answer>1</answer>", 1, "红色圆圈 🎨 in image 1 — näive."),
])
def test_parse_accepts_well_formed(text, answer, reasoning):
    parsed = parse_completion(text)
    assert parsed.answer == answer and parsed.well_formed
    assert parsed.reasoning == reasoning


@pytest.mark.parametrize("text", [
    "",  # empty
    "   \n",
    "just text with no tags",
    "<think>a</think><answer>1</answer><answer>2</answer>",  # two answers
    "<think>a</think><answer>1</answer><answer>1</answer>",  # two answers, even if they agree
    "<think>a</think><answer>1 or 2</answer>",
    "<think>I think <answer>1</answer> fits</think><answer>1</answer>",  # answer inside the reasoning
    "<think>a <think>b</think></think><answer>1</answer>",  # nested think
    "<think>red</think><answer>1",  # truncated answer block
    "<think>red circle in the first image",  # truncated reasoning
    "<think>red</think>",  # no answer
    "<answer>1</answer>",  # no reasoning
    "<think></think><answer>1</answer>",  # empty reasoning
    "<think>   </think><answer>2</answer>",  # blank reasoning
    "<think>x</think><answer>3</answer>",  # not an image number
    "<think>x</think><answer>12</answer>",
    "<think>x</think><answer>１</answer>",  # full-width digit
    "<think>x</think><answer>٢</answer>",  # Arabic-Indic digit
    "<think>x</think><answer>1</answer> trailing",  # text after the answer
    "preamble <think>x</think><answer>1</answer>",  # text before the reasoning
    "<answer>1</answer><think>x</think>",  # wrong order
])
def test_parse_rejects_bad_format(text):
    parsed = parse_completion(text)
    assert parsed.answer is None and not parsed.well_formed


def test_format_target_round_trips():
    for answer in (1, 2):
        parsed = parse_completion(format_target("Image 2 shows a square.", answer))
        assert (parsed.answer, parsed.reasoning) == (answer, "Image 2 shows a square.")


def test_extract_reasoning_of_malformed_text_drops_tags_and_answers():
    assert extract_reasoning("<think>red</think><answer>1") == "red"
    assert extract_reasoning("<think>a</think><answer>1</answer><answer>2</answer>") == "a"
    assert "1" not in extract_reasoning("<think>I think <answer>1</answer> fits</think>")


# ---- answer masking ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, masked", [
    ("<think>A is red.</think><answer>1</answer>", "A is red."),
    # a final verdict naming an image goes, the analysis stays
    ("<think>Image 1 has a red circle. Image 2 has a blue one. So image 1 is better.</think><answer>1</answer>",
     "Image 1 has a red circle. Image 2 has a blue one."),
    ("<think>Image 2 shows a triangle.\nSo I prefer image 2</think><answer>2</answer>", "Image 2 shows a triangle."),
    ("<think>The colours differ. Therefore the first image wins!</think>", "The colours differ."),
    ("<think>Shapes differ. Option 2 is better.</think>", "Shapes differ."),
    # several trailing verdicts all go
    ("<think>Red is right. Image 1 is better. I prefer image 1.</think><answer>1</answer>", "Red is right."),
    # a verdict naming a bare number
    ("<think>Red circle left. So the answer is 2.</think>", "Red circle left."),
    ("<think>Red circle left. I choose 1</think>", "Red circle left."),
    # a verdict split over lines is judged as the listener reads it, joined
    ("<think>Red is right. The better one is:\n\nImage 2</think><answer>2</answer>", "Red is right."),
    ("<think>Red is right.\nSo the answer\nis 2</think>", "Red is right."),
    # numbers that are not verdicts stay
    ("<think>Image 1 has 2 red circles.</think><answer>1</answer>", "Image 1 has 2 red circles."),
    ("<think>I prefer the colours. It shows 2 shapes.</think>", "I prefer the colours. It shows 2 shapes."),
    ("<think>I prefer the colours.\nIt shows 2 shapes.</think>", "I prefer the colours. It shows 2 shapes."),
    # answers inside the reasoning, truncated answer blocks, two answers: no answer survives
    ("<think>I think <answer>1</answer> fits</think><answer>1</answer>", "I think   fits"),
    ("<think>red</think><answer>1", "red"),
    ("<think>a</think><answer>1</answer><answer>2</answer>", "a"),
    ("<think>红色圆圈 🎨 matches.</think><answer>1</answer>", "红色圆圈 🎨 matches."),
    # the verdict phrasings of issue 15: conclusions, "overall", "hence", a bare "Final: N"
    ("<think>Image 2 has the red cube. In conclusion, I'd go with Image 2</think><answer>2</answer>",
     "Image 2 has the red cube."),
    ("<think>Both have cubes. Overall, the second image is more faithful.</think><answer>2</answer>",
     "Both have cubes."),
    ("<think>Image 1 is blue. The cube in image 2 is red, hence Image 2.</think><answer>2</answer>",
     "Image 1 is blue."),
    ("<think>Image 1 is blue.\nhence Image 2.</think><answer>2</answer>", "Image 1 is blue."),
    ("<think>Image 1 is blue.\n\nFinal: 2</think><answer>2</answer>", "Image 1 is blue."),
    ("<think>Image 1 is blue. Final answer: image 2.</think><answer>2</answer>", "Image 1 is blue."),
    ("<think>Image 1 is blue. I'd pick the first one.</think><answer>1</answer>", "Image 1 is blue."),
    ("<think>Image 1 is blue. I'd go with 2.</think><answer>2</answer>", "Image 1 is blue."),
    # a cue with no image named stays: "overall" alone names nothing
    ("<think>Overall, both are sharp. Image 2 is red.</think><answer>2</answer>",
     "Overall, both are sharp. Image 2 is red."),
])
def test_mask_answer(text, masked):
    assert mask_answer(text) == masked


@pytest.mark.parametrize("text", [
    "", "   ", "<think></think><answer>1</answer>", "<answer>2</answer>",
    "<think>Image 1 is better.</think><answer>1</answer>",  # the whole reasoning is the verdict
    "<think>So the answer is 2.</think>",
])
def test_mask_answer_leaves_nothing_usable(text):
    assert mask_answer(text) == ""


@pytest.mark.parametrize("sentence, images", [
    ("In conclusion, I'd go with Image 2", {2}), ("Overall, the second image matches.", {2}), ("hence Image 2.", {2}),
    ("Final: 2", {2}), ("So image 1 is better than image 2.", {1, 2}), ("I choose 1", {1}),
    ("Image 2 shows a square.", set()), ("The first one is red.", set()), ("It shows 2 shapes.", set()),
])
def test_verdict_images(sentence, images):
    assert verdict_images(sentence) == images and is_verdict(sentence) is bool(images)


@pytest.mark.parametrize("masked, answer, leaks", [
    ("Picture #2 wins. Image 1 shows red.", 2, True),  # an early verdict survives masking: a leak
    ("Picture #2 wins. Image 1 shows red.", 1, False),  # it names the other image
    ("Image 1 shows red. Image 2 shows blue.", 2, False),  # descriptions name both images: no verdict
    ("The answer is 2, clearly. It is red.", 2, True),
    ("", 1, False),
])
def test_answer_leaks(masked, answer, leaks):
    assert answer_leaks(masked, answer) is leaks


def test_masked_reasoning_never_contains_the_answer_block():
    adversarial = ["<think>x <answer>2</answer></think><answer>2</answer>", "<think>x</think><answer>2",
                   "<answer>2</answer><think>x</think>", "<think>x</think><ANSWER>image 2</ANSWER>"]
    for text in adversarial:
        masked = mask_answer(text)
        assert "<answer" not in masked.lower() and "2" not in masked, (text, masked)


# ---- prompt rendering ----------------------------------------------------------------------------------


def test_reasoner_prompt_is_a_chat_with_two_images_then_the_instruction():
    prompt = reasoner_prompt("a red circle")
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.count(IMAGE_PLACEHOLDER) == 2
    assert prompt.index(IMAGE_PLACEHOLDER) < prompt.index('"a red circle"')


def test_listener_prompt_carries_the_masked_reasoning_and_asks_for_a_number():
    prompt = listener_prompt("a red circle", "Image 1 is red.")
    assert prompt.count(IMAGE_PLACEHOLDER) == 2
    assert "Image 1 is red." in prompt and "<answer>" not in prompt
    assert "1 or 2" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert LISTENER_ANSWER_TOKENS == ("1", "2")


def test_render_chat_image_count():
    assert render_chat("s", "u", num_images=0) == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n" \
                                                  "<|im_start|>assistant\n"
    assert render_chat("s", "u", num_images=3).count(IMAGE_PLACEHOLDER) == 3


# ---- the listener's renormalised probability -----------------------------------------------------------


def test_listener_probability_by_hand():
    assert listener_p_image_1(-1.0, -1.0) == 0.5
    # e^-1 / (e^-1 + e^-2) = 1 / (1 + e^-1)
    assert listener_p_image_1(-1.0, -2.0) == pytest.approx(1 / (1 + math.exp(-1)), abs=1e-12)
    assert listener_p_image_1(-2.0, -1.0) == pytest.approx(1 - 1 / (1 + math.exp(-1)), abs=1e-12)
    # only the difference matters: the two tokens' mass is renormalised away
    assert listener_p_image_1(-30.0, -31.0) == pytest.approx(listener_p_image_1(-1.0, -2.0), abs=1e-12)


def test_listener_probability_extremes_do_not_overflow():
    assert listener_p_image_1(0.0, -math.inf) == 1.0
    assert listener_p_image_1(-math.inf, 0.0) == 0.0
    assert listener_p_image_1(-1000.0, 0.0) == 0.0 and listener_p_image_1(0.0, -1000.0) == 1.0
    for a, b in [(-3.0, -7.0), (-7.0, -3.0), (-0.1, -5.0)]:
        assert listener_p_image_1(a, b) + listener_p_image_1(b, a) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("a, b", [(-math.inf, -math.inf), (math.nan, -1.0), (-1.0, math.nan)])
def test_listener_probability_refuses_no_distribution(a, b):
    with pytest.raises(ValueError):
        listener_p_image_1(a, b)
