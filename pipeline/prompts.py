"""Reasoner and listener prompts, the strict answer parser and answer masking (pure, no heavy imports).

The reasoner writes `<think>REASONING</think><answer>N</answer>` with N in {1, 2} (`Image N` is accepted
too). The listener reads the reasoning with the answer block and the trailing verdicts removed (the one
masking rule, `mask_answer`, docs/masking.md), and answers with a single token, `1` or `2`.

Prompts are rendered in the Qwen2.5-VL chat format (`<|im_start|>role ... <|im_end|>`, each image as
`<|vision_start|><|image_pad|><|vision_end|>`); the tiny checkpoints carry the same chat template, so
`processor.apply_chat_template` and `render_chat` agree (tested).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.types import ImageIndex

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
# Tokens that only the processor may place: a completion containing one would be read as an image slot
# by the learner (and break the image-token count), so the rollout never samples them.
VISION_TOKENS: tuple[str, ...] = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                                  "<|video_pad|>")
SYSTEM_PROMPT = "You are a helpful assistant."

REASONER_INSTRUCTION = (
    "Two images were generated for the prompt: \"{prompt}\". Which image matches the prompt better and "
    "would people prefer? Think step by step inside <think></think>, then give the image number inside "
    "<answer></answer>, e.g. <answer>1</answer>."
)
LISTENER_INSTRUCTION = (
    "Two images were generated for the prompt: \"{prompt}\". Here is someone's reasoning about them:\n"
    "{reasoning}\n"
    "Which image is better? Answer with the number only: 1 or 2."
)
LISTENER_ANSWER_TOKENS: tuple[str, str] = ("1", "2")  # the listener's answers for image 1 and image 2

_STRICT_RE = re.compile(
    r"\A\s*<think>(?P<reasoning>.*?)</think>\s*<answer>\s*(?:image\s*)?(?P<answer>[12])\s*</answer>\s*\Z",
    re.IGNORECASE | re.DOTALL,
)
_TAG_RE = re.compile(r"</?(think|answer)>", re.IGNORECASE)
_ANSWER_BLOCK_RE = re.compile(r"<answer>.*?(</answer>|\Z)", re.IGNORECASE | re.DOTALL)
# The one masking rule (docs/masking.md): a sentence is a verdict when it has a verdict cue and refers to
# an image, by name anywhere in the sentence or by a bare 1/2 shortly after the cue.
VERDICT_CUES: tuple[str, ...] = (
    "answer", "choice", "choose", "chose", "chosen", "pick", "picked", "prefer", "preferred", "preference",
    "verdict", "winner", "wins", "win", "better", "best", "so", "therefore", "thus", "hence", "overall",
    "conclusion", "conclude", "final", "finally", "go with", "going with", "went with", "select", "selected",
    "opt", "favour", "favor",
)
_CUE = r"\b(?:" + "|".join(c.replace(" ", r"\s+") for c in VERDICT_CUES) + r")\b"
_CUE_RE = re.compile(_CUE, re.IGNORECASE)
# An image named: "image 2", "picture #1", "option 2", "the first image", "the second one".
_NAMES_IMAGE_RE = re.compile(
    r"\b(?:(?:image|picture|option|choice|candidate)\s*#?\s*(?P<digit>[12])"
    r"|(?P<ordinal>first|second)\s+(?:image|one|picture|option|choice|candidate))\b",
    re.IGNORECASE,
)
# A bare number shortly after a cue: "So the answer is 2.", "I choose 1", "Final: 2", "I'd go with 2".
_BARE_VERDICT_RE = re.compile(_CUE + r"[^.!?\d]{0,15}?#?\b(?P<digit>[12])\b", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"(?<=[.!?\n])\s+")


@dataclass(frozen=True)
class ParsedCompletion:
    """The result of the strict parse: `answer` is None when the format is bad."""

    reasoning: str
    answer: ImageIndex | None

    @property
    def well_formed(self) -> bool:
        return self.answer is not None


def render_chat(system: str, user_text: str, num_images: int) -> str:
    """Qwen2.5-VL chat prompt with `num_images` images before the text, ending at the assistant turn."""
    images = IMAGE_PLACEHOLDER * num_images
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{images}{user_text}<|im_end|>\n"
        f"<|im_start|>assistant\n"
    )


def chat_messages(user_text: str, num_images: int) -> list[dict]:
    """The same prompt as `render_chat`, as messages for `processor.apply_chat_template`."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": user_text}]
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]


def reasoner_prompt(prompt: str) -> str:
    """The reasoner's full chat prompt for one pair (image 1, then image 2)."""
    return render_chat(SYSTEM_PROMPT, REASONER_INSTRUCTION.format(prompt=prompt), num_images=2)


def listener_prompt(prompt: str, masked_reasoning: str) -> str:
    """The listener's full chat prompt: the pair's prompt, both images and the masked reasoning."""
    text = LISTENER_INSTRUCTION.format(prompt=prompt, reasoning=masked_reasoning)
    return render_chat(SYSTEM_PROMPT, text, num_images=2)


def parse_completion(text: str) -> ParsedCompletion:
    """Strict parse: exactly one think block with non-empty reasoning, then exactly one answer, nothing after.

    Anything else (two answers, an answer inside the reasoning, a truncated block, empty reasoning) is a
    bad format: `answer` is None and the completion earns no accuracy or listener credit.
    """
    match = _STRICT_RE.match(text)
    if match is None:
        return ParsedCompletion(reasoning=extract_reasoning(text), answer=None)
    reasoning = match.group("reasoning")
    if _TAG_RE.search(reasoning) or not reasoning.strip():
        return ParsedCompletion(reasoning=extract_reasoning(text), answer=None)
    answer: ImageIndex = 1 if match.group("answer") == "1" else 2
    return ParsedCompletion(reasoning=reasoning.strip(), answer=answer)


def extract_reasoning(text: str) -> str:
    """The reasoning of any completion, well formed or not: the think block's text, else all text."""
    without_answers = _ANSWER_BLOCK_RE.sub(" ", text)
    return _TAG_RE.sub(" ", without_answers).strip()


def mask_answer(text: str) -> str:
    """The reasoning the listener sees: answer blocks and tags removed, then trailing verdicts dropped.

    The one masking rule (docs/masking.md): a sentence is a verdict when it has a verdict cue
    (`VERDICT_CUES`: "better", "prefer", "answer", "so", "hence", "overall", "in conclusion", "go with",
    "final", ...) and refers to an image, either by name anywhere in the sentence ("image 2", "picture #1",
    "option 2", "the second image", "the first one") or by a bare 1 or 2 within 15 characters after a cue
    ("so the answer is 2", "I choose 1", "Final: 2"). Trailing verdict sentences are dropped, one after
    another; an earlier verdict stays (the `answer_leak_rate` metric counts those). Sentences split by a
    paragraph break ("The better one is:\n\nImage 2") are judged as the listener reads them, joined.
    Returns "" when nothing is left: such a completion earns no listener credit (`pipeline.rewards`).
    """
    masked = extract_reasoning(text)
    while True:  # to a fixpoint: joining with " " can merge a line break's two halves into a new verdict
        sentences = _sentences(masked)
        while sentences and is_verdict(sentences[-1]):
            sentences.pop()
        joined = " ".join(s.strip() for s in sentences).strip()
        if joined == masked:
            return joined
        masked = joined


def is_verdict(sentence: str) -> bool:
    """The masking rule on one sentence: a verdict cue and an image named, or a cue then a bare 1/2."""
    if _BARE_VERDICT_RE.search(sentence):
        return True
    return bool(_CUE_RE.search(sentence) and _NAMES_IMAGE_RE.search(sentence))


def verdict_images(sentence: str) -> set[ImageIndex]:
    """The images a verdict sentence points at (empty when it is not a verdict by `is_verdict`)."""
    if not is_verdict(sentence):
        return set()
    found: set[ImageIndex] = set()
    for match in _NAMES_IMAGE_RE.finditer(sentence):
        digit, ordinal = match.group("digit"), match.group("ordinal")
        found.add(1 if digit == "1" or (ordinal or "").lower() == "first" else 2)
    found.update(1 if m.group("digit") == "1" else 2 for m in _BARE_VERDICT_RE.finditer(sentence))
    return found


def answer_leaks(masked: str, answer: ImageIndex) -> bool:
    """Whether the listener's context `masked` still gives `answer` away: some sentence of it (not only
    the last) is a verdict, by the masking rule, pointing at that image ("Picture #2 wins. Image 1 is red.").

    Descriptions name both images in any faithful reasoning ("Image 2 shows a square."), so a leak is a
    verdict naming the answer, not a mere mention of it.
    """
    return any(answer in verdict_images(sentence) for sentence in _sentences(masked))


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END_RE.split(text) if s.strip()]


def format_target(reasoning: str, answer: ImageIndex) -> str:
    """A well-formed completion (for SFT targets and tests); `parse_completion` inverts it."""
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


def listener_p_image_1(logp_1: float, logp_2: float) -> float:
    """p(image 1) renormalised over the two answer tokens: e^l1 / (e^l1 + e^l2) = sigmoid(l1 - l2).

    Both logprobs are required (a token outside the engine's top-k is never guessed); -inf is allowed for
    one of them, not both.
    """
    if math.isnan(logp_1) or math.isnan(logp_2) or logp_1 == logp_2 == -math.inf:
        raise ValueError(f"listener answer logprobs ({logp_1}, {logp_2}) give no distribution over the two")
    diff = logp_1 - logp_2
    if diff >= 0:
        return 1.0 / (1.0 + math.exp(-diff))
    z = math.exp(diff)  # the other branch, so neither exp overflows
    return z / (1.0 + z)
