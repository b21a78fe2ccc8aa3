"""MDLM, SEDD, BD3-LM and AR objectives against slow, direct reference computations.

* MDLM: the exact expectation of the NELBO estimator, summing explicitly over every
  masking pattern of a length-2 sequence and integrating over t numerically, vs the
  Monte-Carlo mean of ``nelbo``; the integrand at fixed t vs the same explicit sum; the
  bound is tight (NELBO = -log p(x)) for the exact denoiser of a known distribution and
  loose for a context-blind one.
* SEDD: the per-token loss vs the score-entropy formula summed over all states with
  transition ratios from the matrix exponential of the absorbing rate matrix.
* BD3-LM: the attention mask vs its definition as loops; the one-pass loss vs one pass
  per block over (clean prefix ++ noisy block); block_size = L reproduces MDLM's loss.
* AR: loss / NLL vs a pass per position; exact NLL of an exact conditional model.

Tokens: a real SentencePiece model trained on arithmetic lines (V = 20, [MASK] = 4).
Models: the real DLM backbone (tiny, random weights) or small table "models" whose
logits are a fixed function of the input tokens.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from configlib import ConfigError, from_dict
from data_pipeline.tokenizer import Tokenizer, train_tokenizer
from models.dlm import DLMConfig, build
from trainer.objectives.ar import AR, ARConfig
from trainer.objectives.bd3lm import BD3LM, BD3LMConfig, block_causal_mask, block_diffusion_mask
from trainer.objectives.discrete import (
    GeometricSchedule,
    LogLinearSchedule,
    masked_cross_entropy,
    per_token,
    step_offset,
    subs_log_probs,
    weyl_uniforms,
)
from trainer.objectives.mdlm import MDLM, MDLMConfig
from trainer.objectives.sedd import SEDD, SEDDConfig, score_entropy

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    lines = []
    for _ in range(300):
        a, b = rng.randrange(100), rng.randrange(100)
        lines.append(f"{a} + {b} = {a + b}")
    (folder / "arith.txt").write_text("\n".join(lines) + "\n")
    train_tokenizer(
        [str(folder / "arith.txt")], str(folder / "tok"), 20, model_type="bpe", progress=False
    )
    return str(folder / "tok.model")


@pytest.fixture(scope="module")
def vocab(tok_path) -> tuple[int, int]:
    tok = Tokenizer.load(tok_path)
    return tok.vocab_size, tok.token_id("[MASK]")


def objective(cls, cfg_cls, tok_path: str, seed: int = 0, **options):
    return cls(cfg_cls(tokenizer=tok_path, **options), seed=seed, rank=0, device=CPU)


def dlm(vocab_size: int, time_conditioning: bool, seed: int = 0, max_seq_len: int = 32):
    """Tiny DLM with random weights everywhere (init_weights zeroes the head)."""
    cfg = DLMConfig(
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        width=32,
        depth=2,
        num_heads=4,
        cond_dim=16 if time_conditioning else None,
        time_conditioning=time_conditioning,
    )
    model = build(cfg)
    model.init_weights(0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


# ----------------------------------------------------------------- table models

REAL = (7, 8, 11)  # three real token ids of the tokenizer ("▁", "1", "2")


class TableModel(nn.Module):
    """A fixed "network" over length-2 inputs from REAL + [MASK]: logits[x_t] from a table
    (the clean / masked pattern and the visible tokens pick the row)."""

    def __init__(self, vocab_size: int, mask_id: int, table_SLV: torch.Tensor):
        super().__init__()
        self.vocab_size, self.mask_id = vocab_size, mask_id
        self.time_conditioning = False
        self.table = table_SLV  # (16 states, 2 positions, V)

    @staticmethod
    def state(x_BL: torch.Tensor, mask_id: int) -> torch.Tensor:
        codes = torch.full_like(x_BL, 3)
        for code, token in enumerate(REAL):
            codes[x_BL == token] = code
        assert bool(((codes < 3) | (x_BL == mask_id)).all())
        return codes[:, 0] * 4 + codes[:, 1]

    def forward(self, tokens_BL, sigma=None, **_):
        return self.table[self.state(tokens_BL, self.mask_id)]


def random_table(vocab_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    table = torch.full((16, 2, vocab_size), float("-inf"))
    table[:, :, list(REAL)] = torch.randn(16, 2, 3, generator=gen) * 1.5
    return table


def table_from_conditionals(vocab_size: int, probs_33: np.ndarray) -> torch.Tensor:
    """The exact denoiser of data x ~ probs_33[a, b]: marginals when both positions are
    masked, p(x_l | other) when one is; clean positions get anything (carried over)."""
    table = torch.full((16, 2, vocab_size), float("-inf"))
    table[:, :, list(REAL)] = 0.0

    def logp(p: np.ndarray) -> torch.Tensor:
        with np.errstate(divide="ignore"):  # impossible tokens get -inf
            return torch.tensor(np.log(p / p.sum()), dtype=torch.float32)

    table[3 * 4 + 3, 0, list(REAL)] = logp(probs_33.sum(1))
    table[3 * 4 + 3, 1, list(REAL)] = logp(probs_33.sum(0))
    for code in range(3):
        table[3 * 4 + code, 0, list(REAL)] = logp(probs_33[:, code])  # first masked
        table[code * 4 + 3, 1, list(REAL)] = logp(probs_33[code, :])  # second masked
    return table


def reference_integrand(table, x0: tuple[int, int], t: float, eps: float, mask_id: int) -> float:
    """w(t) E_{x_t}[sum over masked l of -log p(x0_l | x_t)], every masking pattern
    written out, SUBS by hand (logits over REAL only; [MASK] never predicted)."""
    p = (1 - eps) * t
    total = 0.0
    for pattern in itertools.product([0, 1], repeat=2):
        prob = math.prod(p if m else 1 - p for m in pattern)
        codes = [3 if m else REAL.index(x) for m, x in zip(pattern, x0)]
        row = table[codes[0] * 4 + codes[1]].double()
        for pos, m in enumerate(pattern):
            if m:
                logits = row[pos, list(REAL)]
                total += prob * -float(logits.log_softmax(-1)[REAL.index(x0[pos])])
    return total / t


def reference_nelbo(table, x0, eps: float, time_min: float, mask_id: int) -> float:
    """1 / (1 - time_min) int_{time_min}^1 of the integrand: the estimator's expectation
    (Simpson's rule; the integrand is a polynomial in t)."""
    grid = np.linspace(time_min, 1.0, 2001)
    grid[0] = max(grid[0], 1e-9)
    values = np.array([reference_integrand(table, x0, float(t), eps, mask_id) for t in grid])
    h = grid[1] - grid[0]
    integral = (
        h / 3 * (values[0] + values[-1] + 4 * values[1:-1:2].sum() + 2 * values[2:-1:2].sum())
    )
    return integral / (1.0 - time_min)


# ------------------------------------------------------------------------ MDLM


def test_mdlm_nelbo_matches_explicit_expectation(tok_path, vocab):
    vocab_size, mask_id = vocab
    obj = objective(MDLM, MDLMConfig, tok_path)
    model = TableModel(vocab_size, mask_id, random_table(vocab_size, seed=1))
    gen = torch.Generator().manual_seed(0)
    for x0 in [(7, 8), (11, 11)]:
        reference = reference_nelbo(model.table, x0, 1e-3, 1e-3, mask_id)
        tokens = torch.tensor([x0]).repeat(2000, 1)
        estimates = obj.nelbo(model, tokens, generator=gen, num_t=8).double()
        mean, stderr = float(estimates.mean()), float(estimates.std() / math.sqrt(len(estimates)))
        assert stderr < 0.03 * reference  # the comparison below has teeth
        assert abs(mean - reference) < 4 * stderr, (x0, mean, reference, stderr)

    # the integrand at fixed t: every masking pattern forced through the uniforms
    x0 = (8, 11)
    for t in (0.05, 0.4, 0.93):
        p = (1 - 1e-3) * t
        expected = 0.0
        for pattern in itertools.product([0, 1], repeat=2):
            u_mask = torch.tensor([[0.0 if m else 0.999999 for m in pattern]])
            terms, masked = obj.nelbo_terms(
                model, torch.tensor([x0]), torch.tensor([[t]], dtype=torch.float64), u_mask
            )
            assert masked.tolist() == [[bool(m) for m in pattern]]
            assert bool((terms[~masked] == 0).all())
            prob = math.prod(p if m else 1 - p for m in pattern)
            expected += prob * float(terms.sum())
        assert expected == pytest.approx(
            reference_integrand(model.table, x0, t, 1e-3, mask_id), rel=1e-5
        )


def test_subs_parameterisation(vocab):
    vocab_size, mask_id = vocab
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, vocab_size, generator=gen)
    x0 = torch.randint(5, vocab_size, (2, 5), generator=gen)
    x_t = torch.where(torch.rand(2, 5, generator=gen) < 0.5, torch.full_like(x0, mask_id), x0)
    logp = subs_log_probs(logits, x_t, mask_id)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 5))
    assert bool((logp[..., mask_id] == float("-inf")).all())  # never predicts [MASK]
    clean = x_t != mask_id
    assert bool((logp[clean].gather(-1, x_t[clean][:, None]) == 0).all())  # carry-over
    by_hand = torch.cat([logits[..., :mask_id], logits[..., mask_id + 1 :]], -1).log_softmax(-1)
    masked = ~clean
    assert torch.allclose(logp[masked][:, mask_id + 1 :], by_hand[masked][:, mask_id:])
    ce = masked_cross_entropy(logits, x0, mask_id)
    assert torch.allclose(ce[masked], -logp[masked].gather(-1, x0[masked][:, None])[:, 0])


def test_mdlm_bound_is_tight_for_the_exact_denoiser(tok_path, vocab):
    vocab_size, mask_id = vocab
    probs = np.array([[0.30, 0.05, 0.0], [0.10, 0.0, 0.25], [0.0, 0.20, 0.10]])
    exact = table_from_conditionals(vocab_size, probs)
    # context-blind: both positions predicted from their marginals whatever is visible
    blind = exact.clone()
    blind[:, 0] = exact[15, 0]
    blind[:, 1] = exact[15, 1]
    support = [(a, b) for a in range(3) for b in range(3) if probs[a, b] > 0]
    entropy, nelbo_exact, nelbo_blind = 0.0, 0.0, 0.0
    for a, b in support:
        x0 = (REAL[a], REAL[b])
        exact_bound = reference_nelbo(exact, x0, eps=1e-7, time_min=0.0, mask_id=mask_id)
        # tight: the exact denoiser's NELBO is -log p(x) for every x (up to eps)
        assert exact_bound == pytest.approx(-math.log(probs[a, b]), abs=1e-5)
        entropy -= probs[a, b] * math.log(probs[a, b])
        nelbo_exact += probs[a, b] * exact_bound
        nelbo_blind += probs[a, b] * reference_nelbo(blind, x0, 1e-7, 0.0, mask_id)
    assert nelbo_exact == pytest.approx(entropy, abs=1e-5)
    assert nelbo_blind > entropy + 0.1  # a bound, not an equality, for a worse model
    # the estimator itself (default time_min and eps) lands on the entropy for the exact model
    obj = objective(MDLM, MDLMConfig, tok_path)
    model = TableModel(vocab_size, mask_id, exact)
    gen = torch.Generator().manual_seed(3)
    weights = torch.tensor([probs[a, b] for a, b in support])
    draws = torch.multinomial(weights, 4000, replacement=True, generator=gen)
    tokens = torch.tensor([[REAL[support[i][0]], REAL[support[i][1]]] for i in draws])
    estimates = obj.nelbo(model, tokens, generator=gen, num_t=4).double()
    stderr = float(estimates.std() / math.sqrt(len(estimates)))
    assert float(estimates.mean()) == pytest.approx(entropy, abs=4 * stderr + 5e-3)


def test_mdlm_loss_draws_are_rank_independent_and_spread(tok_path, vocab):
    vocab_size, _ = vocab
    obj = objective(MDLM, MDLMConfig, tok_path, seed=5)
    model = dlm(vocab_size, time_conditioning=True)
    tokens = torch.randint(5, vocab_size, (8, 12), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "index": torch.arange(40, 48)}
    whole, logs = obj.loss("model", {"model": model}, batch, step=3)
    # two "ranks" holding half the global batch each see the same draws
    halves = [
        obj.loss("model", {"model": model}, {k: v[s] for k, v in batch.items()}, step=3)[0].detach()
        for s in (slice(0, 4), slice(4, 8))
    ]
    assert float(whole.detach()) == pytest.approx(float(sum(halves) / 2), rel=1e-5)
    assert 0 < logs["masked_frac"] < 1
    # the times of a global batch are evenly spread: no gap above 1/4 between 8 of them
    u_time, _ = obj.draw_uniforms(batch, 3, 8, 12)
    assert torch.equal(u_time[:, 0], weyl_uniforms(range(40, 48), step_offset(5, 3)))
    u = u_time[:, 0].sort().values
    gaps = torch.cat([u.diff(), (1 + u[:1]) - u[-1:]])
    assert float(gaps.max()) < 0.25
    # a different step draws differently
    other, _ = obj.loss("model", {"model": model}, batch, step=4)
    assert float(other.detach()) != float(whole.detach())
    whole.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_without_indices_the_generator_state_resumes(tok_path, vocab):
    vocab_size, _ = vocab
    model = dlm(vocab_size, time_conditioning=False)
    batch = {"tokens": torch.randint(5, vocab_size, (4, 8), generator=torch.Generator())}
    first = objective(MDLM, MDLMConfig, tok_path, seed=1)
    first.loss("model", {"model": model}, batch, 0)
    saved = first.state_dict()
    expected = float(first.loss("model", {"model": model}, batch, 1)[0].detach())
    resumed = objective(MDLM, MDLMConfig, tok_path, seed=1)
    resumed.load_state_dict(saved)
    assert float(resumed.loss("model", {"model": model}, batch, 1)[0].detach()) == expected


@pytest.mark.parametrize(
    "schedule", [LogLinearSchedule(1e-3), LogLinearSchedule(0.1), GeometricSchedule(1e-4, 20.0)]
)
def test_schedules_are_consistent(schedule):
    t = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)
    h = 1e-6
    d_total = (schedule.total(t + h) - schedule.total(t - h)) / (2 * h)
    d_alpha = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    assert torch.allclose(schedule.rate(t), d_total, rtol=1e-6)
    assert torch.allclose(schedule.alpha(t), torch.exp(-schedule.total(t)), rtol=1e-12)
    assert torch.allclose(schedule.mask_prob(t), 1 - schedule.alpha(t), rtol=1e-9)
    assert torch.allclose(schedule.weight(t), -d_alpha / (1 - schedule.alpha(t)), rtol=1e-6)


# ------------------------------------------------------------------------ SEDD


def sedd_reference(logits_V, x_t: int, x0: int, sigma_bar: float, dsigma: float, mask_id: int):
    """Score entropy of one position summed over all states, float64: weights from the
    absorbing rate matrix, ratios p_t(y | x0) / p_t(x_t | x0) from its matrix exponential."""
    vocab_size = logits_V.shape[0]
    rate = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)  # rate[from, to]
    for i in range(vocab_size):
        if i != mask_id:
            rate[i, mask_id], rate[i, i] = 1.0, -1.0
    transition = torch.linalg.matrix_exp(sigma_bar * rate)  # [x0, y] = p_t(y | x0)
    logits = logits_V.double()
    log_score = logits - math.log(vocab_size - 1) - math.log(math.expm1(sigma_bar))
    total = 0.0
    for y in range(vocab_size):
        if y == x_t or rate[y, x_t] == 0:
            continue
        ratio = float(transition[x0, y] / transition[x0, x_t])
        const = ratio * (math.log(ratio) - 1) if ratio > 0 else 0.0
        score = float(log_score[y])
        total += dsigma * rate[y, x_t].item() * (math.exp(score) - ratio * score + const)
    return total


@pytest.mark.parametrize("sigma_bar", [1e-4, 0.7, 4.0])
def test_sedd_score_entropy_matches_sum_over_states(vocab, sigma_bar):
    vocab_size, mask_id = vocab
    gen = torch.Generator().manual_seed(int(sigma_bar * 1e4))
    batch, length = 3, 5
    x0 = torch.randint(5, vocab_size, (batch, length), generator=gen)
    masked = torch.rand(batch, length, generator=gen) < 0.6
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = torch.randn(batch, length, vocab_size, generator=gen) * 2
    # a near-optimal network for one row: log-scores at the true ratios (cancellation case)
    logits[0] = -30.0
    logits[0].scatter_(-1, x0[0, :, None], math.log(vocab_size - 1))
    dsigma = 1.3
    ours = score_entropy(logits, x_t, x0, torch.tensor(sigma_bar), torch.tensor(dsigma), mask_id)
    assert torch.isfinite(ours).all()
    for b, pos in itertools.product(range(batch), range(length)):
        ref = sedd_reference(
            logits[b, pos], int(x_t[b, pos]), int(x0[b, pos]), sigma_bar, dsigma, mask_id
        )
        scale = dsigma / math.expm1(sigma_bar)
        assert float(ours[b, pos]) == pytest.approx(ref, rel=1e-5, abs=1e-6 * scale), (b, pos)
    assert bool((ours[~masked] == 0).all()) and bool((ours[masked] > 0).all())


def test_sedd_equals_mdlm_for_normalised_scores_and_needs_time_conditioning(tok_path, vocab):
    vocab_size, mask_id = vocab
    sedd = objective(SEDD, SEDDConfig, tok_path)
    mdlm = objective(MDLM, MDLMConfig, tok_path)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, vocab_size, generator=gen)
    x0 = torch.randint(5, vocab_size, (2, 6), generator=gen)
    t_BN = torch.tensor([[0.3], [0.8]], dtype=torch.float64)
    u_mask = torch.rand(2, 6, generator=gen)

    class Fixed(nn.Module):
        time_conditioning = True

        def __init__(self, out):
            super().__init__()
            self.out, self.vocab_size = out, vocab_size

        def forward(self, tokens, sigma=None, **_):
            return self.out

    # S = 1: the log-scores are log softmax + log(V - 1), and the SEDD term is MDLM's
    normalised = logits.masked_fill(torch.arange(vocab_size) == mask_id, float("-inf")).log_softmax(
        -1
    ) + math.log(vocab_size - 1)
    s_terms, s_masked = sedd.nelbo_terms(Fixed(normalised), x0, t_BN, u_mask)
    m_terms, m_masked = mdlm.nelbo_terms(Fixed(logits), x0, t_BN, u_mask)
    assert torch.equal(s_masked, m_masked) and bool(s_masked.any())
    assert torch.allclose(s_terms, m_terms, rtol=1e-5, atol=1e-6)
    # unnormalised scores cost more than the MDLM term of the same logits
    raw_terms, _ = sedd.nelbo_terms(Fixed(logits + 1.0), x0, t_BN, u_mask)
    assert bool((raw_terms[s_masked] > m_terms[s_masked]).all())
    with pytest.raises(ValueError, match="time_conditioning: true"):
        sedd.check_model(dlm(vocab_size, time_conditioning=False))
    sedd.check_model(dlm(vocab_size, time_conditioning=True))
    loss, _ = sedd.loss(
        "model", {"model": dlm(vocab_size, True)}, {"tokens": x0, "index": torch.arange(2)}, 0
    )
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------ BD3-LM


def test_block_diffusion_mask_matches_its_definition():
    for length, block in [(6, 2), (7, 3), (4, 4), (5, 1)]:
        mask = block_diffusion_mask(length, block)
        for q, k in itertools.product(range(2 * length), repeat=2):
            q_clean, k_clean = q >= length, k >= length
            q_block, k_block = (q % length) // block, (k % length) // block
            if not q_clean:  # noisy query: own noisy block, clean blocks strictly before
                allowed = (not k_clean and k_block == q_block) or (k_clean and k_block < q_block)
            else:  # clean query: clean blocks up to its own, never a noisy token
                allowed = k_clean and k_block <= q_block
            assert bool(mask[q, k]) == allowed, (length, block, q, k)
        causal = block_causal_mask(length, block)
        for q, k in itertools.product(range(length), repeat=2):
            assert bool(causal[q, k]) == (k // block <= q // block)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_bd3lm_one_pass_loss_equals_per_block_passes(tok_path, vocab, time_conditioning):
    vocab_size, mask_id = vocab
    length, block = 12, 4
    obj = objective(BD3LM, BD3LMConfig, tok_path, seed=2, block_size=block)
    model = dlm(vocab_size, time_conditioning)
    x0 = torch.randint(5, vocab_size, (3, length), generator=torch.Generator().manual_seed(1))
    batch = {"tokens": x0, "index": torch.tensor([10, 11, 12])}
    u_time, u_mask = obj.draw_uniforms(batch, 7, 3, length)
    assert u_time.shape == (3, 3)
    t_BN = obj.to_times(u_time, obj.train_range())
    with torch.no_grad():
        terms, masked = obj.nelbo_terms(model, x0, t_BN, u_mask)
        # reference: block b alone, after the clean blocks before it, block-causal mask
        schedule = LogLinearSchedule(1e-3)
        t_BL = per_token(t_BN, length, block)
        x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
        assert torch.equal(masked, u_mask.double() < schedule.mask_prob(t_BL))
        reference = torch.zeros(3, length)
        for start in range(0, length, block):
            tokens = torch.cat([x0[:, :start], x_t[:, start : start + block]], dim=1)
            sigma = torch.zeros(tokens.shape)
            sigma[:, start:] = schedule.total(t_BL[:, start : start + block]).float()
            logits = model(tokens, sigma, attn_mask=block_causal_mask(tokens.shape[1], block))
            logits = logits[:, start:].double()
            logits[..., mask_id] = float("-inf")
            nll = -logits.log_softmax(-1).gather(-1, x0[:, start : start + block, None])[..., 0]
            weight = 1 / t_BL[:, start : start + block]
            reference[:, start : start + block] = torch.where(
                masked[:, start : start + block], weight * nll, 0.0
            ).float()
    assert bool(masked.any()) and bool((~masked).any())
    assert torch.allclose(terms, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_bd3lm_with_one_block_is_mdlm(tok_path, vocab, time_conditioning):
    vocab_size, _ = vocab
    length = 10
    model = dlm(vocab_size, time_conditioning)
    x0 = torch.randint(5, vocab_size, (4, length), generator=torch.Generator().manual_seed(2))
    batch = {"tokens": x0, "index": torch.arange(100, 104)}
    mdlm = objective(MDLM, MDLMConfig, tok_path, seed=9)
    bd3 = objective(BD3LM, BD3LMConfig, tok_path, seed=9, block_size=length)
    small = objective(BD3LM, BD3LMConfig, tok_path, seed=9, block_size=2)
    with torch.no_grad():
        m_loss, m_logs = mdlm.loss("model", {"model": model}, batch, step=2)
        b_loss, b_logs = bd3.loss("model", {"model": model}, batch, step=2)
        small_loss = small.loss("model", {"model": model}, batch, step=2)[0]
    assert m_logs == b_logs
    assert float(b_loss) == pytest.approx(float(m_loss), rel=1e-5)
    # and the NELBO estimates agree draw for draw
    m_nelbo = mdlm.nelbo(model, x0, generator=torch.Generator().manual_seed(4), num_t=2)
    b_nelbo = bd3.nelbo(model, x0, generator=torch.Generator().manual_seed(4), num_t=2)
    assert torch.allclose(m_nelbo, b_nelbo, rtol=1e-5)
    # smaller blocks give a different (block-wise) objective
    assert float(small_loss) != float(b_loss)


def test_bd3lm_noise_clip_and_config_checks(tok_path):
    obj = objective(BD3LM, BD3LMConfig, tok_path, block_size=2, noise_clip=(0.3, 0.8))
    batch = {"tokens": torch.zeros(64, 8, dtype=torch.long), "index": torch.arange(64)}
    u_time, _ = obj.draw_uniforms(batch, 0, 64, 8)
    t = obj.to_times(u_time, obj.train_range())
    assert float(t.min()) >= 0.3 and float(t.max()) <= 0.8 and float(t.max() - t.min()) > 0.45
    assert obj.eval_range() == (1e-3, 1.0)

    def problems(cls, **raw):
        with pytest.raises(ConfigError) as err:
            from_dict(cls, {"tokenizer": tok_path, **raw})
        return str(err.value)

    assert "noise_clip: needs 0 < lo < hi <= 1" in problems(BD3LMConfig, noise_clip=[0.8, 0.3])
    assert "sigma_min: has no effect unless noise is 'geometric'" in problems(
        MDLMConfig, sigma_min=1e-3
    )
    assert "noise_eps: has no effect" in problems(SEDDConfig, noise="geometric", noise_eps=0.1)
    assert "sampler" in problems(SEDDConfig, sampler="tweedie")
    assert from_dict(SEDDConfig, {"tokenizer": tok_path, "noise": "geometric"}).noise == "geometric"


# ------------------------------------------------------------------------ AR


def test_ar_loss_is_per_position_nll(tok_path, vocab):
    vocab_size, _ = vocab
    obj = objective(AR, ARConfig, tok_path)
    model = dlm(vocab_size, time_conditioning=False)
    x0 = torch.randint(5, vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    loss, _ = obj.loss("model", {"model": model}, {"tokens": x0, "index": torch.arange(2)}, 0)
    nll = obj.nelbo(model, x0, generator=torch.Generator())
    with torch.no_grad():  # one pass per position over BOS ++ x[:l], no look-ahead possible
        reference = torch.zeros(2, dtype=torch.float64)
        for pos in range(9):
            prefix = torch.cat([torch.full((2, 1), 3), x0[:, :pos]], dim=1)
            logits = model(prefix, attn_mask=block_causal_mask(pos + 1, 1))[:, -1].double()
            reference -= logits.log_softmax(-1).gather(-1, x0[:, pos, None])[:, 0]
    assert torch.allclose(nll.double(), reference, rtol=1e-5)
    assert float(loss.detach()) == pytest.approx(float(reference.sum() / 18), rel=1e-5)
    with pytest.raises(ValueError, match="time_conditioning: false"):
        obj.check_model(dlm(vocab_size, time_conditioning=True))
    with pytest.raises(ValueError, match="model.vocab_size: 20"):
        obj.check_model(dlm(vocab_size + 1, time_conditioning=False))
    # the same line for the recipe's model section, before the run reads any data
    (problem,) = obj.model_problems(dlm(vocab_size + 1, time_conditioning=False).cfg)
    assert problem.startswith(f"model.vocab_size is {vocab_size + 1} but the tokenizer")


def test_ar_nll_is_exact_for_exact_conditionals(tok_path, vocab):
    vocab_size, _ = vocab
    probs = np.array([[0.30, 0.05, 0.0], [0.10, 0.0, 0.25], [0.0, 0.20, 0.10]])

    class Conditionals(nn.Module):
        time_conditioning = False

        def __init__(self):
            super().__init__()
            self.vocab_size = vocab_size

        def forward(self, tokens, sigma=None, attn_mask=None, **_):
            assert attn_mask is not None and not bool(attn_mask[0, 1])  # causal
            out = torch.full((*tokens.shape, vocab_size), -50.0)
            out[:, 0, list(REAL)] = torch.tensor(np.log(probs.sum(1)), dtype=torch.float32)
            for b in range(tokens.shape[0]):
                first = REAL.index(int(tokens[b, 1]))
                row = probs[first] / probs[first].sum()
                out[b, 1, list(REAL)] = torch.tensor(np.log(row + 1e-30), dtype=torch.float32)
            return out

    obj = objective(AR, ARConfig, tok_path)
    for a, b in [(0, 0), (1, 2), (2, 1)]:
        nll = obj.nelbo(Conditionals(), torch.tensor([[REAL[a], REAL[b]]]))
        assert float(nll) == pytest.approx(-math.log(probs[a, b]), rel=1e-5)


def test_tokenizer_without_mask_is_a_clear_error(tmp_path, tok_path):
    lines = tmp_path / "plain.txt"
    lines.write_text("1 + 2 = 3\n4 + 5 = 9\n" * 20)
    train_tokenizer(
        [str(lines)], str(tmp_path / "plain"), 14, "bpe", user_symbols=(), progress=False
    )
    with pytest.raises(ValueError, match=r"has no \[MASK\] piece"):
        objective(MDLM, MDLMConfig, str(tmp_path / "plain.model"))
    objective(AR, ARConfig, str(tmp_path / "plain.model"))  # AR needs no [MASK]
    with pytest.raises(ValueError, match="does not exist"):
        objective(MDLM, MDLMConfig, str(tmp_path / "missing.model"))
