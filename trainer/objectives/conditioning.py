"""SD3-style text conditioning: CLIP and T5 encoders -> the MMDiT's ``cond`` dict.

* context (B, L_clip + L_t5, context_dim): the CLIP encoders' token sequences
  concatenated along channels, zero-padded to ``context_dim``, followed along the
  sequence by the T5 tokens (also padded to ``context_dim``);
* pooled (B, sum of CLIP widths): the CLIP pooled vectors concatenated.

Classifier-free guidance training drops each encoder's contribution independently
(zeroed, as in SD3) with its probability; the unconditional input at sampling time is
the all-dropped (all-zero) condition. Drops are drawn per sample from (seed, step,
sample index), so they are identical across resumes and rank counts. T5 can be left out
at inference (``drop_t5``), as SD3 allows.

With ``source: precomputed`` the encoders are not built: the batch carries ``clip``
(B, L, sum widths), ``clip_pooled`` and ``t5`` arrays written by data_pipeline.precompute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from configlib import option
from data_pipeline.text_encoders import ClipTextEncoderConfig, T5EncoderConfig


@dataclass(kw_only=True)
class ConditioningConfig:
    source: Literal["encoders", "precomputed"] = option(
        "encoders",
        "Run the text encoders on captions, or read precomputed embeddings from the shards.",
    )
    clip: list[ClipTextEncoderConfig] = option(
        factory=list, doc="CLIP text encoders (SD3: CLIP-L and CLIP-G)."
    )
    t5: T5EncoderConfig | None = option(None, "T5 encoder (SD3: T5-XXL); null leaves it out.")
    context_dim: int = option(
        4096, "Width the token sequences are zero-padded to (= model.context_dim).", ge=1
    )
    clip_drop_prob: float = option(
        0.1, "Probability of dropping each CLIP encoder's condition in training.", ge=0, le=1
    )
    t5_drop_prob: float = option(
        0.1, "Probability of dropping the T5 condition in training.", ge=0, le=1
    )
    shard_encoders: bool = option(
        False, "Shard the frozen encoders with FSDP2 like the model (for T5-XXL scale)."
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = []
        if self.source == "encoders" and not self.clip and self.t5 is None:
            out.append(
                (
                    "clip",
                    "configure at least one text encoder (clip or t5), or use source: precomputed",
                )
            )
        if self.source == "precomputed":
            for key in ("clip", "t5", "shard_encoders"):
                if key in given:
                    out.append((key, "has no effect when source is 'precomputed'"))
        if self.t5 is None and self.source == "encoders" and "t5_drop_prob" in given:
            out.append(("t5_drop_prob", "has no effect without a t5 encoder"))
        return out


def _build(name: str, cfg: ClipTextEncoderConfig | T5EncoderConfig) -> nn.Module:
    """The encoder; weights or a tokenizer not at their path are an InputError naming it."""
    from data_pipeline.storage import InputError
    from data_pipeline.text_encoders import build_text_encoder

    try:
        return build_text_encoder(cfg)
    except FileNotFoundError as err:
        raise InputError(f"objective.conditioning.{name}: {err}") from None


def _uniforms(seed: int, step: int, index: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) uniforms, a pure function of (seed, step, sample index)."""
    from trainer.objectives.base import sample_seed

    out = torch.empty(len(index), count)
    gen = torch.Generator()
    for row, i in enumerate(index.tolist()):
        gen.manual_seed(sample_seed(seed + 7, step, i))
        out[row] = torch.rand(count, generator=gen)
    return out


def _pad(x_BLD: torch.Tensor, width: int) -> torch.Tensor:
    if x_BLD.shape[-1] > width:
        raise ValueError(
            f"text embedding width {x_BLD.shape[-1]} exceeds conditioning.context_dim {width}"
        )
    return F.pad(x_BLD, (0, width - x_BLD.shape[-1]))


class TextConditioner(nn.Module):
    """Frozen encoders + assembly of the MMDiT condition (see module docstring)."""

    def __init__(self, cfg: ConditioningConfig, seed: int):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.clip = nn.ModuleList()
        self.t5 = None
        if cfg.source == "encoders":
            self.clip.extend(_build(f"clip[{i}]", c) for i, c in enumerate(cfg.clip))
            self.t5 = _build("t5", cfg.t5) if cfg.t5 is not None else None
        self.requires_grad_(False)

    def shard_for(self, mesh) -> None:
        if self.cfg.shard_encoders:
            from data_pipeline.text_encoders import shard_frozen_module

            for encoder in [*self.clip, *([self.t5] if self.t5 is not None else [])]:
                shard_frozen_module(encoder, mesh)

    @torch.no_grad()
    def encode(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """Per-encoder embeddings before dropping: clip sequences/pooled (lists), t5."""
        if self.cfg.source == "precomputed":
            return {
                "clip": [batch["clip"].to(device).float()] if "clip" in batch else [],
                "clip_pooled": [batch["clip_pooled"].to(device).float()]
                if "clip_pooled" in batch
                else [],
                "t5": batch["t5"].to(device).float() if "t5" in batch else None,
            }
        captions = list(batch["caption"])
        outs = [enc(captions) for enc in self.clip]
        return {
            "clip": [o["sequence"].to(device).float() for o in outs],
            "clip_pooled": [o["pooled"].to(device).float() for o in outs],
            "t5": self.t5(captions)["sequence"].to(device).float() if self.t5 is not None else None,
        }

    def assemble(
        self, parts: dict[str, Any], keep_clip: torch.Tensor | None, keep_t5: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """keep_clip (B, num_clip) and keep_t5 (B,) are 0/1 masks; None keeps everything."""
        width = self.cfg.context_dim
        clip_seqs, pooled = [], []
        for i, (seq, pool) in enumerate(zip(parts["clip"], parts["clip_pooled"])):
            if keep_clip is not None:
                seq = seq * keep_clip[:, i, None, None]
                pool = pool * keep_clip[:, i, None]
            clip_seqs.append(seq)
            pooled.append(pool)
        sequences = []
        if clip_seqs:
            sequences.append(_pad(torch.cat(clip_seqs, dim=-1), width))
        if parts["t5"] is not None:
            t5 = parts["t5"] if keep_t5 is None else parts["t5"] * keep_t5[:, None, None]
            sequences.append(_pad(t5, width))
        context = torch.cat(sequences, dim=1)
        if pooled:
            pooled_vec = torch.cat(pooled, dim=-1)
        else:  # T5 only: no pooled vector; a zero one keeps the interface
            pooled_vec = context.new_zeros(context.shape[0], 1)
        return {"context": context, "pooled": pooled_vec}

    def forward(
        self,
        batch: dict[str, Any],
        *,
        training: bool,
        step: int = 0,
        device: torch.device | None = None,
    ) -> dict[str, torch.Tensor]:
        device = device or (batch["x"].device if "x" in batch else torch.device("cpu"))
        parts = self.encode(batch, device)
        if not training:
            return self.assemble(parts, None, None)
        num_clip = len(parts["clip"])
        u = _uniforms(self.seed, step, batch["index"], num_clip + 1).to(device)
        keep_clip = (u[:, :num_clip] >= self.cfg.clip_drop_prob).float()
        keep_t5 = (u[:, num_clip] >= self.cfg.t5_drop_prob).float()
        return self.assemble(parts, keep_clip, keep_t5)

    @torch.no_grad()
    def for_prompts(
        self, prompts: list[str], device: torch.device, *, drop_t5: bool = False
    ) -> tuple[dict, dict]:
        """(conditional, unconditional) conditions for sampling with guidance."""
        if self.cfg.source == "precomputed":
            raise ValueError(
                "sampling from prompts needs the text encoders (conditioning.source: encoders)"
            )
        parts = self.encode({"caption": prompts}, device)
        b = len(prompts)
        ones_clip = torch.ones(b, len(parts["clip"]), device=device)
        keep_t5 = torch.zeros(b, device=device) if drop_t5 else torch.ones(b, device=device)
        cond = self.assemble(parts, ones_clip, keep_t5)
        uncond = self.assemble(parts, torch.zeros_like(ones_clip), torch.zeros(b, device=device))
        return cond, uncond
