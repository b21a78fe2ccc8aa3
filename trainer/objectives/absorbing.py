"""The absorbing-state ("masked") forward process that the discrete-diffusion objectives
and their samplers share: noise schedules sigma_bar(t), the real-token logits, and the
block attention masks of block diffusion. Imports nothing of the objectives or samplers,
so both can import it (see trainer/objectives/discrete.py for the maths).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


class NoiseSchedule(ABC):
    """sigma_bar(t) and its rate; alpha, mask probability and the NELBO weight follow.

    Methods take and return float64 tensors (probabilities near 0 and 1 need the range).
    """

    @abstractmethod
    def total(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise sigma_bar(t)."""

    @abstractmethod
    def rate(self, t: torch.Tensor) -> torch.Tensor:
        """Its time derivative d sigma_bar / dt."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still clean at time t."""
        return torch.exp(-self.total(t))

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.expm1(-self.total(t))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) = -alpha'_t / (1 - alpha_t) = dsigma / expm1(sigma_bar)."""
        return self.rate(t) / torch.expm1(self.total(t))


@dataclass(frozen=True)
class LogLinearSchedule(NoiseSchedule):
    """alpha_t = 1 - (1 - eps) t (MDLM, SEDD, BD3-LM): mask probability linear in t;
    eps keeps sigma_bar(1) = -log eps finite for the network's input."""

    eps: float = 1e-3

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.log1p(-(1 - self.eps) * t)

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - (1 - self.eps) * t

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return (1 - self.eps) * t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1 / t  # (1 - eps) / (1 - (1 - eps) t) / ((1 - eps) t / (1 - (1 - eps) t))


@dataclass(frozen=True)
class GeometricSchedule(NoiseSchedule):
    """sigma_bar(t) = sigma_min^(1 - t) sigma_max^t (SEDD's geometric noise)."""

    sigma_min: float = 1e-4
    sigma_max: float = 20.0

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp((1 - t) * math.log(self.sigma_min) + t * math.log(self.sigma_max))

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        return self.total(t) * math.log(self.sigma_max / self.sigma_min)


def as_times(t: float | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def real_logits(logits_BLV: torch.Tensor, mask_id: int) -> torch.Tensor:
    """float32 logits with the [MASK] entry at -inf: clean data never holds [MASK]."""
    logits = logits_BLV.float()
    is_mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    is_mask[mask_id] = True
    return logits.masked_fill(is_mask, float("-inf"))


def block_diffusion_mask(
    length: int, block_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(2L, 2L) bool, True = may attend, for the training pass over x_t ++ x_0.

    Query / key i < L is noisy token i, i >= L clean token i - L; block = token // block_size.
    Allowed: same block and same half (block-diagonal), noisy query to clean keys of
    earlier blocks (offset block-causal), clean query to clean keys of blocks up to its
    own (block-causal).
    """
    index = torch.arange(2 * length, device=device)
    clean = index >= length
    block = torch.where(clean, index - length, index) // block_size
    block_q, block_k = block[:, None], block[None, :]
    clean_q, clean_k = clean[:, None], clean[None, :]
    diagonal = (block_q == block_k) & (clean_q == clean_k)
    offset_causal = (block_q > block_k) & clean_k & ~clean_q
    causal = (block_q >= block_k) & clean_k & clean_q
    return diagonal | offset_causal | causal


def block_causal_mask(
    length: int, block_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(L, L) bool: token i may attend to token j when block(j) <= block(i); block size 1
    is the causal mask. The sampler's no-cache reference uses it over prefix ++ block."""
    block = torch.arange(length, device=device) // block_size
    return block[:, None] >= block[None, :]
