"""Synthetic pairs: deterministic per seed, the preferred image is decidable from prompt and pixels."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.synthetic import (BACKGROUND, COLOURS, DRAWN_COLOURS, UNRENDERED_COLOUR, synthetic_pair,
                                synthetic_pairs)


def _colours_present(image) -> set[str]:
    pixels = {tuple(p) for p in np.asarray(image).reshape(-1, 3)}
    return {name for name, rgb in COLOURS.items() if rgb in pixels}


def test_same_seed_and_index_give_identical_pairs() -> None:
    a, b = synthetic_pair(3, 17), synthetic_pair(3, 17)
    assert (a.prompt, a.preferred, a.pair_id) == (b.prompt, b.preferred, b.pair_id)
    assert a.image_1.tobytes() == b.image_1.tobytes() and a.image_2.tobytes() == b.image_2.tobytes()


def test_different_seeds_give_different_streams() -> None:
    a = [p.prompt for p in synthetic_pairs(0, 20)]
    b = [p.prompt for p in synthetic_pairs(1, 20)]
    assert a != b


def test_any_slice_of_the_stream_is_the_same_pairs() -> None:
    whole = [p.pair_id for p in synthetic_pairs(0, 10)]
    tail = [p.pair_id for p in synthetic_pairs(0, 5, start=5)]
    assert whole[5:] == tail


def _shape_of(image) -> str:
    """Classify the one shape by how much of its bounding box it fills (square 1, circle pi/4, triangle 1/2)."""
    mask = (np.asarray(image) != np.array(BACKGROUND)).any(axis=-1)
    rows, cols = np.nonzero(mask)
    fill = mask.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    return "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"


def test_the_preferred_image_shows_the_prompt_and_the_other_does_not() -> None:
    for pair in synthetic_pairs(0, 60, image_size=56):
        colour, shape = pair.prompt.split()[1:]
        preferred = pair.image_1 if pair.preferred == 1 else pair.image_2
        other = pair.image_2 if pair.preferred == 1 else pair.image_1
        assert (_colours_present(preferred), _shape_of(preferred)) == ({colour}, shape)
        other_colours, other_shape = _colours_present(other), _shape_of(other)
        assert len(other_colours) == 1
        assert (other_colours == {colour}) != (other_shape == shape), "exactly one attribute differs"
        assert pair.category == shape


def test_positions_are_balanced() -> None:
    labels = [p.preferred for p in synthetic_pairs(0, 400)]
    assert 160 < labels.count(1) < 240


def test_render_pairs_reject_the_prompts_shape_drawn_in_grey() -> None:
    pairs = list(synthetic_pairs(0, 60, task="render"))
    for pair in pairs:
        colour, shape = pair.prompt.split()[1:]
        preferred, other = (pair.image_1, pair.image_2) if pair.preferred == 1 else (pair.image_2, pair.image_1)
        assert (_colours_present(preferred), _shape_of(preferred)) == ({colour}, shape)
        assert _colours_present(other) == set() and _shape_of(other) == shape  # grey is not a prompt colour
        assert tuple(np.asarray(other).reshape(-1, 3).max(axis=0)) == DRAWN_COLOURS[UNRENDERED_COLOUR]
    assert 20 < sum(p.preferred == 1 for p in pairs) < 40
    assert not {p.pair_id for p in pairs} & {p.pair_id for p in synthetic_pairs(0, 60)}  # streams kept apart


def test_match_stream_is_unchanged_by_the_task_argument() -> None:
    a, b = synthetic_pair(3, 17), synthetic_pair(3, 17, task="match")
    assert a.pair_id == b.pair_id and a.image_1.tobytes() == b.image_1.tobytes()


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown synthetic task 'blur'"):
        synthetic_pair(0, 0, task="blur")


def test_render_ood_uses_only_colours_no_training_task_draws() -> None:
    from pipeline.sft import describe_synthetic_image
    from pipeline.synthetic import COLOURS, OOD_COLOURS, TRAINING_TASKS

    assert "render-ood" not in TRAINING_TASKS and not set(OOD_COLOURS) & set(COLOURS)
    pairs = list(synthetic_pairs(0, 60, task="render-ood"))
    for pair in pairs:
        colour, shape = pair.prompt.split()[1:]
        assert colour in OOD_COLOURS
        preferred, other = (pair.image_1, pair.image_2) if pair.preferred == 1 else (pair.image_2, pair.image_1)
        assert (describe_synthetic_image(preferred), describe_synthetic_image(other)) == (
            f"{colour} {shape}", f"{UNRENDERED_COLOUR} {shape}")
    assert {p.prompt.split()[1] for p in pairs} == set(OOD_COLOURS)
    assert not {p.pair_id for p in pairs} & {p.pair_id for p in synthetic_pairs(0, 60, task="render")}
