"""Synthetic preference pairs whose answer is decidable from the prompt and the pixels.

The prompt names a colour and a shape ("a red circle"); exactly one of the two images shows that colour
and shape. What the other one shows depends on the task:
- `match`: it changes one attribute (the colour or the shape). Telling them apart means comparing the
  prompt with the image: the label is an XOR of prompt and image features, with no correlation to any one
  of them, which a 1M-parameter model does not reliably learn in CPU minutes (see BENCHMARKS.md).
- `render`: the generator failed to render the colour: the prompt's shape, drawn in grey. The failure is
  visible in the rejected image alone, as the defects people reject generations for often are.
- `render-ood`: `render` with prompt colours no training task uses (`OOD_COLOURS`): an out-of-distribution
  evaluation set (`data.ood_task`); no warm start or default training run sees it.
The preferred image's position is random. Pair `index` of seed `seed` is a pure function of (seed, index),
so any size can be generated, in any order, identically on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import get_args

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
    colour = rng.choice(sorted(OOD_COLOURS if task == "render-ood" else COLOURS))
    shape = rng.choice(SHAPES)
    if task in ("render", "render-ood"):
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


def synthetic_pairs(seed: int, count: int, start: int = 0, image_size: int = 56,
                    task: SyntheticTask = "match") -> Iterator[PreferencePair]:
    """Pairs `start .. start + count - 1` of the stream for (`seed`, `task`)."""
    for index in range(start, start + count):
        yield synthetic_pair(seed, index, image_size, task)
