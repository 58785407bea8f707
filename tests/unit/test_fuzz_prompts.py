"""Fuzzing the answer parser and the answer masking (pipeline/prompts.py) with hypothesis, plus the corpus.

Properties, for any text: `parse_completion` and `mask_answer` never raise; a parse is well formed iff it
has an answer, and then the answer is 1 or 2 and the reasoning is non-empty and tag-free; masking leaves
no answer tag, only drops words from the end of the reasoning (its words are a prefix of the reasoning's)
and is idempotent; `format_target` round-trips. Texts are drawn from the grammar's own atoms (tags, image
names, verdict words, sentence ends, odd whitespace) mixed with arbitrary unicode, which finds far more than
unicode alone.

The verdict oracle is the test's own construction, not the module's rule: a reasoning is built from
descriptive sentences that carry no verdict cue, then verdict sentences from the test's own list are
appended; masking must give back exactly the descriptions. Long adversarial inputs are checked for the
result only; their speed is bench material, hypothesis' own deadline is off.

Cases that once failed, or that pin an edge, live in tests/corpus/completions.json and run as regression
tests. A longer, randomised run: `FUZZ_EXAMPLES=20000 pytest tests/unit/test_fuzz_prompts.py`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.prompts import extract_reasoning, format_target, mask_answer, parse_completion

CORPUS = json.loads((Path(__file__).resolve().parents[1] / "corpus" / "completions.json").read_text())
_LONG_RUN = "FUZZ_EXAMPLES" in os.environ
# CI: a fixed, fast set of examples (derandomized, so a red build is reproducible); FUZZ_EXAMPLES: explore.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 200)), deadline=None, derandomize=not _LONG_RUN,
                database=None if not _LONG_RUN else settings.default.database,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
ATOMS = ["<think>", "</think>", "<answer>", "</answer>", "<THINK>", "</Answer>", "<answer", "think>", "1", "2",
         "12", "3", "\uff11", "image 1", "Image 2", "picture #2", "the first image", "second one", "option 2",
         "so", "So", "answer", "is better", "I prefer", "I choose", "therefore", "wins", ".", "!", "?", ":",
         "\n", "\n\n", "\r\n", " ", "\t", "\u00a0", "\u2028", "\x85", "red circle"]
texts = st.lists(st.one_of(st.sampled_from(ATOMS), st.text(max_size=4)), max_size=30).map("".join)
_ANSWER_TAG = re.compile(r"</?answer>", re.IGNORECASE)
_ANY_TAG = re.compile(r"</?(think|answer)>", re.IGNORECASE)


# The oracle's material. Descriptions: words with no verdict cue, image names and counts allowed.
DESCRIPTION_WORDS = ["red", "blue", "circle", "square", "triangle", "left", "shows", "has", "the", "a", "image 1",
                     "image 2", "picture 1", "the first image", "the second one", "3", "small", "large", "sharp",
                     "colour", "prompt", "asks", "for", "and", "with", "红色", "näive", "🎨"]
# Verdicts naming image {n}, as reasoners write them (each ends its sentence or the reasoning).
VERDICTS = ["So image {n} is better.", "In conclusion, I'd go with Image {n}", "Overall, the {ord} image matches.",
            "hence Image {n}.", "Final: {n}", "Therefore the {ord} image wins!", "The answer is {n}.",
            "I choose {n}", "I prefer image {n}.", "Option {n} is best.", "My pick: picture #{n}.",
            "The better one is:\n\nImage {n}", "So the answer\nis {n}"]
ORDINAL = {1: "first", 2: "second"}
descriptions = st.lists(st.lists(st.sampled_from(DESCRIPTION_WORDS), min_size=1, max_size=8).map(" ".join)
                        .map(lambda words: words[0].upper() + words[1:] + "."), min_size=1, max_size=5)
separators = st.sampled_from([" ", "\n", "\n\n", "  ", "\r\n"])


def check_parse(text: str) -> None:
    parsed = parse_completion(text)
    assert parsed.well_formed == (parsed.answer is not None)
    if parsed.well_formed:
        assert parsed.answer in (1, 2)
        assert parsed.reasoning.strip() and not _ANY_TAG.search(parsed.reasoning)


def check_mask(text: str) -> str:
    masked = mask_answer(text)
    assert not _ANSWER_TAG.search(masked), masked
    words = extract_reasoning(text).split()
    assert masked.split() == words[:len(masked.split())], masked  # only trailing sentences are dropped
    assert mask_answer(masked) == masked
    return masked


@FUZZ
@given(texts)
def test_parser_and_masking_properties_hold_for_any_text(text: str) -> None:
    check_parse(text)
    check_mask(text)


@FUZZ
@given(texts, st.sampled_from([1, 2]))
def test_format_target_round_trips(reasoning: str, answer: int) -> None:
    parsed = parse_completion(format_target(reasoning, answer))
    if reasoning.strip() and not _ANY_TAG.search(reasoning):
        assert (parsed.answer, parsed.reasoning) == (answer, reasoning.strip())
    else:  # empty reasoning or a tag inside it: a bad format, never a wrong answer
        assert parsed.answer is None
    assert not _ANSWER_TAG.search(mask_answer(format_target(reasoning, answer)))


@FUZZ
@given(descriptions, st.lists(st.tuples(st.sampled_from(VERDICTS), st.sampled_from([1, 2])), min_size=1,
                              max_size=3), separators, st.sampled_from([1, 2]))
def test_appended_verdicts_are_masked_and_descriptions_kept(body, verdicts, sep, answer) -> None:
    said = [template.format(n=n, ord=ORDINAL[n]) for template, n in verdicts]
    # each verdict but the last ends its sentence (a line break alone does not: "Image 1\nSo ..." is one)
    said = [v if i == len(said) - 1 or v[-1] in ".!?" else v + "." for i, v in enumerate(said)]
    reasoning = sep.join(body) + sep + "\n".join(said)
    masked = mask_answer(format_target(reasoning, answer))
    assert masked == " ".join(body), (reasoning, masked)


@pytest.mark.parametrize("case", CORPUS, ids=lambda case: repr(case["text"][:40]))
def test_corpus_case(case: dict) -> None:
    check_parse(case["text"])
    masked = check_mask(case["text"])
    parsed = parse_completion(case["text"])
    if "answer" in case:
        assert parsed.answer == case["answer"]
    if "reasoning" in case:
        assert parsed.reasoning == case["reasoning"]
    if "masked" in case:
        assert masked == case["masked"]


@pytest.mark.parametrize("text, masked", [
    ("<think>" * 5000, ""), ("<answer>" * 5000 + "1", ""), ("so image 1.\n\n" * 2000, ""),
    ("a\n\n" * 5000 + "image 2 is better", " ".join(["a"] * 5000)), ("answer " * 3000 + "2", ""),
    ("<think>" + "x" * 100_000 + "</think>" * 1000 + "<answer>1</answer>", "x" * 100_000),
])
def test_long_adversarial_completions_keep_the_properties(text: str, masked: str) -> None:
    check_parse(text)
    assert check_mask(text) == masked
