"""Autoregressive baseline on the diffusion LMs' backbone: a causal attention mask and
next-token cross-entropy.

Each window of L tokens is scored in full: the network reads BOS ++ x[:-1] and predicts
x, so the first token is predicted from BOS alone (the model's first-position
prediction) and every later one from all tokens before it. The loss is the mean NLL in
nats per token and ``nelbo`` the exact NLL per sequence, so bits per token and
perplexity compare directly with the diffusion objectives' bounds over the same L
tokens. The network must not be time-conditioned (it is never given sigma).

Shapes: B batch, L sequence length, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from configlib import option
from trainer.objectives.discrete import (
    TokenLMConfig,
    TokenObjective,
    TokenRequest,
    time_conditioning,
)
from trainer.samplers.discrete import autoregressive


@dataclass(kw_only=True)
class ARConfig(TokenLMConfig):
    name: str = option("ar", "Training objective.")
    temperature: float = option(
        1.0, "Sampling temperature of evaluation samples (0 = greedy).", ge=0
    )


def causal_mask(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


class AR(TokenObjective):
    needs_mask = False
    exact_likelihood = True  # nelbo is the exact NLL (evaluation reports ppl, not a bound)

    def __init__(self, cfg: ARConfig, *, seed: int, rank: int, device: torch.device):
        super().__init__(cfg, seed=seed, rank=rank, device=device)
        if self.tokenizer.bos_id is None:
            raise ValueError(f"objective.tokenizer: {cfg.tokenizer} defines no BOS id")
        self.bos_id = self.tokenizer.bos_id

    def check_model(self, model: nn.Module) -> None:
        super().check_model(model)
        if time_conditioning(model):
            raise ValueError(
                "the AR objective gives the model no noise level: set "
                "model.time_conditioning: false"
            )

    def token_nll(self, model: nn.Module, tokens_BL: torch.Tensor) -> torch.Tensor:
        """-log p(x_l | BOS, x_<l) for every position (B, L)."""
        x_BL = tokens_BL.to(self.device)
        bos = torch.full_like(x_BL[:, :1], self.bos_id)
        inputs = torch.cat([bos, x_BL[:, :-1]], dim=1)
        logits = model(inputs, attn_mask=causal_mask(x_BL.shape[1], self.device)).float()
        nll = F.cross_entropy(logits.flatten(0, 1), x_BL.flatten(), reduction="none")
        return nll.view(x_BL.shape)

    def loss(
        self, phase: str, modules: dict[str, nn.Module], batch: dict[str, Any], step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        model = modules["model"]
        self.check_model(model)
        return self.token_nll(model, batch["tokens"]).mean(), {}

    @torch.no_grad()
    def nelbo(
        self,
        model: nn.Module,
        tokens_BL: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        num_t: int = 1,
    ) -> torch.Tensor:
        """Exact NLL in nats per sequence (B,): first token given BOS, the rest given
        everything before them. ``generator`` and ``num_t`` are accepted and unused."""
        self.check_model(model)
        return self.token_nll(model, tokens_BL).sum(1)

    def sample_tokens(
        self, req: TokenRequest, *, temperature: float | None = None, kv_cache: bool = True
    ) -> torch.Tensor:
        """One token per network call (``req.steps`` is ignored); ``kv_cache`` false
        recomputes the prefix each step."""
        return autoregressive(
            req.model,
            req.num,
            req.length,
            bos_id=self.bos_id,
            generator=req.generator,
            temperature=self.cfg.temperature if temperature is None else temperature,
            top_p=req.top_p,
            kv_cache=kv_cache,
            device=self.device,
        )
