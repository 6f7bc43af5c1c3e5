"""A small generated ImageFolder of 64x64 RGB pictures in two classes a small classifier tells apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.data.test_cache import write_imagefolder


def shape_images(n: int, label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, 3, size, size]: class 0 a warm disc, class 1 a cool horizontal bar, near the centre (placed
    off it at random, so neither is left-right symmetric) on a dark, noisy background."""
    yy, xx = np.mgrid[:size, :size]
    images = []
    for _ in range(n):
        image = rng.uniform(0.0, 0.2, size=(3, 1, 1)) + rng.normal(0.0, 0.05, size=(3, size, size))
        cy, cx = size // 2 + rng.integers(-size // 8, size // 8 + 1, size=2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2 if label == 0 else \
            (abs(yy - cy) < size // 10) & (abs(xx - cx) < size // 3)
        hue = np.array([1.0, 0.6, 0.2]) if label == 0 else np.array([0.2, 0.6, 1.0])
        image[:, mask] = (rng.uniform(0.6, 1.0, size=3) * hue)[:, None]
        images.append(np.clip(image * 255, 0, 255).astype(np.uint8))
    return np.stack(images)


def shapes_folder(root: Path, train_per_class: int, val_per_class: int, size: int = 64, seed: int = 0) -> Path:
    """``root/{train,val}/class_<k>/<i>.png``; returns ``root``."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        images = [shape_images(per_class, label, size, rng) for label in (0, 1)]
        splits[split] = (np.concatenate(images), [0] * per_class + [1] * per_class)
    write_imagefolder(root, splits)
    return root
