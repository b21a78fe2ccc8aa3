"""Built-in synthetic data: a 2-D mixture of Gaussians for the test model and demos.

Every global batch is a pure function of (seed, batch index), so the stream is
identical for any number of ranks and a resumed run continues exactly where it stopped.
Shapes: N samples, D = 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from configlib import option
from data_pipeline.sources import agreed_position


@dataclass
class GaussianMixture2DConfig:
    name: str = option("gaussian_mixture2d", "Data source.")
    num_modes: int = option(8, "Gaussians placed evenly on a circle.", ge=1)
    radius: float = option(4.0, "Radius of the circle of means.", gt=0)
    std: float = option(0.35, "Standard deviation of each Gaussian.", gt=0)


class GaussianMixture2D:
    """The mixture itself: means, sampling, and a distance to it."""

    def __init__(self, cfg: GaussianMixture2DConfig):
        angles = 2 * math.pi * np.arange(cfg.num_modes) / cfg.num_modes
        self.means_KD = cfg.radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        self.std = cfg.std

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        modes = rng.integers(0, len(self.means_KD), size=count)
        return (self.means_KD[modes] + self.std * rng.standard_normal((count, 2))).astype(
            np.float32
        )


def sliced_wasserstein(
    a_ND: np.ndarray, b_ND: np.ndarray, num_projections: int = 256, seed: int = 0
) -> float:
    """Sliced 1-Wasserstein distance between two equal-size point clouds."""
    assert a_ND.shape == b_ND.shape
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((a_ND.shape[1], num_projections))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    pa = np.sort(a_ND @ dirs, axis=0)
    pb = np.sort(b_ND @ dirs, axis=0)
    return float(np.abs(pa - pb).mean())


def scatter_png(
    points_ND: np.ndarray, reference_ND: np.ndarray, path: Path, extent: float, size: int = 384
) -> None:
    """A scatter plot: reference in grey, samples in blue (written atomically)."""
    from PIL import Image

    img = np.full((size, size, 3), 255, dtype=np.uint8)

    def plot(pts: np.ndarray, color: tuple[int, int, int]) -> None:
        pix = ((pts / extent + 1) / 2 * (size - 1)).round().astype(int)
        keep = (pix >= 0).all(1) & (pix < size).all(1)
        pix = pix[keep]
        for dy in (0, 1):  # 2x2 dots: single pixels are hard to see
            for dx in (0, 1):
                img[
                    np.clip(size - 1 - pix[:, 1] - dy, 0, size - 1),
                    np.clip(pix[:, 0] + dx, 0, size - 1),
                ] = color

    plot(reference_ND, (190, 190, 190))
    plot(points_ND, (31, 90, 200))
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(img).save(tmp)
    tmp.replace(path)


class GaussianMixtureSource:
    """Rank-sliced micro-batches of the mixture; position = global batches consumed."""

    def __init__(
        self,
        cfg: GaussianMixture2DConfig,
        *,
        seed: int,
        rank: int,
        world_size: int,
        micro_batch: int,
        accum_steps: int,
    ):
        self.mixture = GaussianMixture2D(cfg)
        self.extent = cfg.radius + 4 * cfg.std
        self.seed = seed
        self.rank = rank
        self.micro_batch = micro_batch
        self.accum_steps = accum_steps
        self.global_batch = micro_batch * accum_steps * world_size
        self.batches_done = 0
        self.micro_index = 0
        self._current: np.ndarray | None = None

    def _global_batch(self, index: int) -> np.ndarray:
        return self.mixture.sample(
            self.global_batch, np.random.default_rng([self.seed, 7919, index])
        )

    def next_batch(self) -> dict[str, Any]:
        if self._current is None:
            self._current = self._global_batch(self.batches_done)
        per_rank = self.micro_batch * self.accum_steps
        start = self.rank * per_rank + self.micro_index * self.micro_batch
        batch = torch.from_numpy(self._current[start : start + self.micro_batch].copy())
        first = self.batches_done * self.global_batch + start
        index = torch.arange(first, first + self.micro_batch, dtype=torch.int64)
        self.micro_index += 1
        if self.micro_index == self.accum_steps:
            self.micro_index = 0
            self.batches_done += 1
            self._current = None
        return {"x": batch, "index": index}

    def state_dict(self) -> dict[str, Any]:
        return {"batches_done": self.batches_done, "micro_index": self.micro_index}

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        self.batches_done, self.micro_index = agreed_position(states), 0
        self._current = None

    # ---------------------------------------------------------------- evaluation hooks
    def sample_shape(self) -> tuple[int, ...]:
        return (2,)

    def eval_conditions(self, count: int, *, prompts: bool) -> dict[str, Any]:
        """Unconditional points: nothing to generate them for."""
        if prompts:
            raise ValueError("the Gaussian mixture has no captions to prompt with")
        return {}

    def evaluate_samples(
        self, samples_ND: np.ndarray, out_dir: Path | None, step: int, conditions=None
    ) -> dict[str, float]:
        """Distance of generated samples to the mixture, and a scatter plot."""
        reference = self.mixture.sample(len(samples_ND), np.random.default_rng([self.seed, 104729]))
        metrics = {"eval/sliced_w1": sliced_wasserstein(samples_ND, reference)}
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            scatter_png(samples_ND, reference, out_dir / f"samples_step{step:08d}.png", self.extent)
        return metrics
