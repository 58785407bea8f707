"""Fuzzing the answer parser and the answer masking (pipeline/prompts.py) with hypothesis, plus the corpus.

Properties, for any text: `parse_completion` and `mask_answer` never raise; a parse is well formed iff it
has an answer, and then the answer is 1 or 2 and the reasoning is non-empty and tag-free; masking leaves
no answer tag, ends in no verdict (as the module itself judges one) and is idempotent; `format_target`
round-trips. Texts are drawn from the grammar's own atoms (tags, image names, verdict words, sentence ends,
odd whitespace) mixed with arbitrary unicode, which finds far more than unicode alone.

Cases that once failed, or that pin an edge, live in tests/corpus/completions.json and run as regression
tests. A longer, randomised run: `FUZZ_EXAMPLES=20000 pytest tests/unit/test_fuzz_prompts.py`.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.prompts import _SENTENCE_END_RE, _is_verdict, format_target, mask_answer, parse_completion

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


def ends_in_verdict(masked: str) -> bool:
    sentences = [s for s in _SENTENCE_END_RE.split(masked) if s.strip()]
    return bool(sentences) and _is_verdict(sentences[-1])


def check_parse(text: str) -> None:
    parsed = parse_completion(text)
    assert parsed.well_formed == (parsed.answer is not None)
    if parsed.well_formed:
        assert parsed.answer in (1, 2)
        assert parsed.reasoning.strip() and not _ANY_TAG.search(parsed.reasoning)


def check_mask(text: str) -> str:
    masked = mask_answer(text)
    assert not _ANSWER_TAG.search(masked), masked
    assert not ends_in_verdict(masked), masked  # the listener never reads a final verdict naming an image
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


@pytest.mark.parametrize("text", [
    "<think>" * 5000, "<answer>" * 5000 + "1", "so image 1.\n\n" * 2000, "a\n\n" * 5000 + "image 2 is better",
    "answer " * 3000 + "2", "<think>" + "x" * 100_000 + "</think>" * 1000 + "<answer>1</answer>",
])
def test_long_adversarial_completions_are_handled_in_linear_time(text: str) -> None:
    start = time.perf_counter()
    check_parse(text)
    check_mask(text)
    assert time.perf_counter() - start < 2.0  # no catastrophic regex backtracking (seconds would mean O(n^2))
