"""Synthetic preference pairs whose answer is decidable from the prompt and the pixels.

The prompt names a colour and a shape ("a red circle"); exactly one of the two images shows that colour
and shape. What the other one shows depends on the task:
- `match`: it changes one attribute (the colour or the shape). Telling them apart means comparing the
  prompt with the image: the label is an XOR of prompt and image features, with no correlation to any one
  of them, which a 1M-parameter model does not reliably learn in CPU minutes (see BENCHMARKS.md).
- `render`: the generator failed to render the colour: the prompt's shape, drawn in grey. The failure is
  visible in the rejected image alone, as the defects people reject generations for often are.
- `render-ood`: `render` with prompt colours no training task uses (`OOD_COLOURS`): an out-of-distribution
  evaluation set (`data.ood_task`); no warm start or default training run sees it. Its colour words are not
  in the tiny tokenizer's corpus (2-3 tokens each), which confounds it with tokenisation.
- `render-saturated` / `render-white`: `render` split by prompt colour, the split of the listener experiment
  (docs/listener.md): GRPO trains on the saturated colours (`SATURATED_COLOURS`) and is evaluated out of
  distribution on white vs grey. "white" is a word the tokenizer has and the warm starts describe (it is in
  `COLOURS`), but a policy that learned "the image with a hue" has no such cue between two achromatic shapes.
The preferred image's position is random. Pair `index` of seed `seed` is a pure function of (seed, index),
so any size can be generated, in any order, identically on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import get_args

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import SyntheticTask
from pipeline.types import PreferencePair

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 60, 220),
    "yellow": (235, 220, 40),
    "purple": (140, 40, 170),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# `render-ood`'s prompt colours: kept out of COLOURS, which the tiny tokenizer's corpus is built from.
OOD_COLOURS: dict[str, tuple[int, int, int]] = {
    "orange": (240, 140, 20),
    "cyan": (30, 200, 210),
    "pink": (240, 120, 180),
}
SATURATED_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")  # `render-saturated`'s
HELDOUT_COLOUR = "white"  # `render-white`'s only prompt colour
BACKGROUND = (40, 40, 40)
UNRENDERED_COLOUR = "grey"  # what a `render` failure is drawn in; never a prompt's colour
DRAWN_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, UNRENDERED_COLOUR: (128, 128, 128), **OOD_COLOURS}
SYNTHETIC_TASKS: tuple[str, ...] = get_args(SyntheticTask)
TRAINING_TASKS: tuple[str, ...] = ("match", "render")  # what the warm starts see; not `render-ood`


def draw_shape(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
    """A `size` x `size` RGB image with one filled shape, jittered in place and scale."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    extent = rng.uniform(0.45, 0.7) * size
    x0 = rng.uniform(0, size - extent)
    y0 = rng.uniform(0, size - extent)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = DRAWN_COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return image


def synthetic_pair(seed: int, index: int, image_size: int = 56, task: SyntheticTask = "match") -> PreferencePair:
    """Pair `index` of the stream for (`seed`, `task`)."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {SYNTHETIC_TASKS}")
    stream = "synthetic" if task == "match" else f"synthetic-{task}"  # `match` keeps the stream it always had
    rng = random.Random(f"{stream}:{seed}:{index}")
    colour = rng.choice(prompt_colours(task))
    shape = rng.choice(SHAPES)
    if task != "match":
        wrong_colour, wrong_shape = UNRENDERED_COLOUR, shape
    elif rng.random() < 0.5:
        wrong_colour, wrong_shape = rng.choice([c for c in sorted(COLOURS) if c != colour]), shape
    else:
        wrong_colour, wrong_shape = colour, rng.choice([s for s in SHAPES if s != shape])
    right = draw_shape(colour, shape, image_size, rng)
    wrong = draw_shape(wrong_colour, wrong_shape, image_size, rng)
    preferred = 1 if rng.random() < 0.5 else 2
    image_1, image_2 = (right, wrong) if preferred == 1 else (wrong, right)
    return PreferencePair(
        pair_id=f"{stream}-{seed}-{index}",
        prompt=f"a {colour} {shape}",
        image_1=image_1,
        image_2=image_2,
        preferred=preferred,
        prompt_id=f"{stream}-{seed}-{index}",
        category=shape,
    )


def prompt_colours(task: SyntheticTask) -> list[str]:
    """The colours a task's prompts draw from, in the order its generator picks by."""
    if task == "render-ood":
        return sorted(OOD_COLOURS)
    if task == "render-saturated":
        return sorted(SATURATED_COLOURS)
    if task == "render-white":
        return [HELDOUT_COLOUR]
    return sorted(COLOURS)


def describe_synthetic_image(image: Image.Image) -> str:
    """"red circle": the colour and shape of a synthetic image, read off its pixels.

    The colour is the most frequent non-background colour (shapes are drawn without anti-aliasing, so
    their pixels are exactly one of `DRAWN_COLOURS`); the shape follows from how much of its bounding box
    the shape fills: a square about 1, a circle pi/4, a triangle 1/2.
    """
    rgb_HW3 = np.asarray(image.convert("RGB")).astype(np.int32)
    packed_HW = (rgb_HW3[..., 0] << 16) | (rgb_HW3[..., 1] << 8) | rgb_HW3[..., 2]  # one int per pixel
    values, counts = np.unique(packed_HW, return_counts=True)  # one pass, not one per known colour
    count_of = dict(zip(values.tolist(), counts.tolist()))
    counts_by_colour = {name: count_of.get(_packed(rgb), 0) for name, rgb in DRAWN_COLOURS.items() if rgb != BACKGROUND}
    colour = max(counts_by_colour, key=counts_by_colour.get)
    if counts_by_colour[colour] == 0:
        raise ValueError("no shape of a known colour in the image")
    mask_HW = packed_HW == _packed(DRAWN_COLOURS[colour])
    rows, cols = np.flatnonzero(mask_HW.any(axis=1)), np.flatnonzero(mask_HW.any(axis=0))
    fill = mask_HW.sum() / ((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return f"{colour} {shape}"


def _packed(rgb: tuple[int, int, int]) -> int:
    return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]


def synthetic_pairs(seed: int, count: int, start: int = 0, image_size: int = 56,
                    task: SyntheticTask = "match") -> Iterator[PreferencePair]:
    """Pairs `start .. start + count - 1` of the stream for (`seed`, `task`)."""
    for index in range(start, start + count):
        yield synthetic_pair(seed, index, image_size, task)
