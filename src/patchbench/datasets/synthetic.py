"""Synthetic datasets with known ground truth: which patches carry the class evidence."""

from __future__ import annotations

import numpy as np

from patchbench.datasets.base import GroundTruthDataset
from patchbench.registry import Registry

DATASETS: Registry[GroundTruthDataset] = Registry("dataset")

# six cell colours; red is the one that is counted
COLOURS = np.array(
    [[0.9, 0.1, 0.1], [0.1, 0.75, 0.1], [0.15, 0.3, 0.95],
     [0.95, 0.9, 0.1], [0.1, 0.85, 0.9], [0.8, 0.2, 0.85]], dtype=np.float32)


@DATASETS.register("toy-count")
class ToyCount(GroundTruthDataset):
    """The Vision DiffMask paper's toy task: a 3x3 grid of single-colour cells.

    Label = number of red cells (0-9, uniform); ground truth = the red cells. Cells are
    8x8 pixels (24x24 images) with a little pixel noise; the other five colours are drawn
    uniformly for the remaining cells.
    """

    name = "toy-count"
    num_classes = 10
    image_size = (24, 24)
    cell = 8

    def generate(self, rng: np.random.Generator) -> tuple[np.ndarray, int, np.ndarray]:
        label = int(rng.integers(0, 10))
        red = np.zeros(9, dtype=bool)
        red[rng.choice(9, size=label, replace=False)] = True
        colour_idx = np.where(red, 0, rng.integers(1, len(COLOURS), size=9))
        cells = COLOURS[colour_idx].reshape(3, 3, 3)
        image = cells.repeat(self.cell, 0).repeat(self.cell, 1)
        image = image + rng.normal(0, 0.04, image.shape).astype(np.float32)
        mask = red.reshape(3, 3).repeat(self.cell, 0).repeat(self.cell, 1)
        return np.clip(image, 0, 1), label, mask


def _glyphs() -> np.ndarray:
    """Six 8x8 binary patterns, one per class."""
    g = np.zeros((6, 8, 8), dtype=bool)
    g[0, 3:5, :] = g[0, :, 3:5] = True                      # plus
    idx = np.arange(8)
    g[1, idx, idx] = g[1, idx, 7 - idx] = True              # cross
    g[1, idx[:-1], idx[1:]] = g[1, idx[1:], idx[:-1]] = True
    g[2, [0, 1, 6, 7], :] = g[2, :, [0, 1, 6, 7]] = True     # ring
    g[3, [0, 1, 4, 5], :] = True                            # horizontal bars
    g[4, :, [0, 1, 4, 5]] = True                            # vertical bars
    g[5] = (idx[:, None] // 2 + idx[None, :] // 2) % 2 == 0  # checkerboard
    return g


@DATASETS.register("glyphs")
class Glyphs(GroundTruthDataset):
    """One class-defining glyph at a random place among distractors.

    32x32 images on a dark noisy background, cut into a 4x4 grid of 8x8 cells. One random
    cell holds the glyph (six shapes = six classes, random colour); three other random
    cells hold solid squares of random colours, which carry no class information.
    Ground truth = the glyph's cell.
    """

    name = "glyphs"
    num_classes = 6
    image_size = (32, 32)
    cell = 8
    distractors = 3
    patterns = _glyphs()

    def generate(self, rng: np.random.Generator) -> tuple[np.ndarray, int, np.ndarray]:
        label = int(rng.integers(0, self.num_classes))
        image = rng.uniform(0.0, 0.15, (32, 32, 3)).astype(np.float32)
        mask = np.zeros((32, 32), dtype=bool)
        cells = rng.choice(16, size=1 + self.distractors, replace=False)
        for k, c in enumerate(cells):
            r, col = divmod(int(c), 4)
            ys, xs = slice(r * 8, r * 8 + 8), slice(col * 8, col * 8 + 8)
            colour = rng.uniform(0.45, 1.0, 3).astype(np.float32)
            if k == 0:
                image[ys, xs][self.patterns[label]] = colour
                mask[ys, xs] = True
            else:
                image[ys, xs] = colour
        return image, label, mask
