"""The token samplers on a distribution with a known answer, their caches, and nucleus.

Data: five allowed sequences of length 4 over three tokens with known probabilities.
An oracle "network" returns the exact posterior marginals p(x_0^l | visible tokens)
(for the diffusion samplers) or the exact next-token conditionals (AR); every sampler
driven by it must land on allowed sequences with about the right frequencies, and a
broken oracle (uniform over the three tokens) must fail the same check. The oracle
keeps its own token cache (new_kv_cache / frozen) so the BD3-LM and AR cache paths run
against it too; on the real DLM backbone (random weights) the KV-cache paths must give
exactly the tokens of the recompute-everything references.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest
import torch
from torch import nn

from data_pipeline.tokenizer import Tokenizer, train_tokenizer
from models.dlm import DLMConfig, build
from trainer.objectives.ar import AR, ARConfig
from trainer.objectives.bd3lm import BD3LM, BD3LMConfig
from trainer.objectives.mdlm import MDLM, MDLMConfig
from trainer.objectives.sedd import SEDD, SEDDConfig
from trainer.samplers.discrete import categorical, top_p_filter

CPU = torch.device("cpu")
REAL = (7, 8, 11)
A, B, C = REAL
ALLOWED = torch.tensor([[A, B, C, A], [B, B, A, C], [C, A, A, B], [A, C, B, B], [B, A, C, C]])
PROBS = torch.tensor([0.35, 0.25, 0.2, 0.12, 0.08], dtype=torch.float64)
LENGTH = 4


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
    assert all(tok.piece(i) not in ("[MASK]", "<s>") for i in REAL)
    return tok.vocab_size, tok.token_id("[MASK]")


def objective(cls, cfg_cls, tok_path: str, **options):
    return cls(cfg_cls(tokenizer=tok_path, **options), seed=0, rank=0, device=CPU)


class TokenCache:
    """The oracle's stand-in for a KV cache: the committed tokens themselves."""

    def __init__(self):
        self.frozen = False
        self.tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    def append(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens], 1)


class Oracle(nn.Module):
    """Exact denoiser of the allowed-sequence distribution (or a broken, uniform one).

    mode "diffusion": logits = log p(x_0^l | the visible tokens of the input), the input
    being a prefix of a length-4 sequence with [MASK]s (plus ``score_offset``: SEDD's
    log-scores carry + log(V - 1)). mode "ar": the input is BOS ++ a prefix and position j
    predicts data token j.
    """

    def __init__(self, vocab_size, mask_id, *, mode, time_conditioning, score_offset=0.0):
        super().__init__()
        self.vocab_size, self.mask_id, self.mode = vocab_size, mask_id, mode
        self.time_conditioning = time_conditioning
        self.score_offset = score_offset
        self.broken = False
        self.calls = 0

    def new_kv_cache(self) -> TokenCache:
        return TokenCache()

    def posterior(self, visible_BL: torch.Tensor, known_BL: torch.Tensor) -> torch.Tensor:
        """(B, 4, V) marginals of all four positions given the known ones."""
        width = visible_BL.shape[1]
        agree = (ALLOWED[None, :, :width] == visible_BL[:, None]) | ~known_BL[:, None]
        weight = PROBS[None] * agree.all(-1)  # (B, K)
        onehot = torch.zeros(len(ALLOWED), LENGTH, self.vocab_size, dtype=torch.float64)
        onehot.scatter_(-1, ALLOWED[..., None], 1.0)
        marg = torch.einsum("bk,klv->blv", weight, onehot)
        total = marg.sum(-1, keepdim=True)
        # no allowed sequence agrees (after an unlucky simultaneous reveal): uniform
        uniform = torch.zeros_like(marg)
        uniform[..., list(REAL)] = 1 / 3
        return torch.where(total > 0, marg / total.clamp_min(1e-300), uniform)

    def forward(self, tokens, sigma=None, *, attn_mask=None, positions=None, kv_cache=None):
        self.calls += 1
        past = kv_cache.tokens if kv_cache is not None and len(kv_cache) else None
        full = tokens if past is None else torch.cat([past, tokens], dim=1)
        if self.mode == "diffusion":
            marg = self.posterior(full, full != self.mask_id)[:, : full.shape[1]]
        else:  # position j of BOS ++ x sees data tokens < j and predicts data token j
            data = full[:, 1:]
            marg = torch.stack(
                [
                    self.posterior(data[:, :j], torch.ones_like(data[:, :j], dtype=torch.bool))[
                        :, j
                    ]
                    for j in range(full.shape[1])
                ],
                dim=1,
            )
        if self.broken:
            marg = torch.zeros_like(marg)
            marg[..., list(REAL)] = 1 / 3
        if kv_cache is not None and not kv_cache.frozen:
            kv_cache.append(tokens)
        logits = marg.log().float() + self.score_offset
        return logits[:, full.shape[1] - tokens.shape[1] :]


def score(samples: torch.Tensor) -> tuple[float, float]:
    """(fraction of samples that are not allowed, total variation to the true law)."""
    counts = Counter(tuple(row) for row in samples.tolist())
    allowed = [tuple(row) for row in ALLOWED.tolist()]
    invalid = sum(n for seq, n in counts.items() if seq not in allowed) / len(samples)
    tv = 0.5 * invalid
    for seq, p in zip(allowed, PROBS.tolist()):
        tv += 0.5 * abs(counts.get(seq, 0) / len(samples) - p)
    return invalid, tv


SAMPLERS = {
    # name: (objective, config, config options, generate options, oracle options)
    "mdlm": (MDLM, MDLMConfig, {}, {}, {"time_conditioning": False}),
    "sedd_analytic": (SEDD, SEDDConfig, {}, {"sampler": "analytic"}, {"time_conditioning": True}),
    "sedd_euler": (
        SEDD,
        SEDDConfig,
        {"noise": "geometric"},
        {"sampler": "euler", "steps": 256},  # geometric noise reveals in a narrower band
        {"time_conditioning": True},
    ),
    "bd3lm": (BD3LM, BD3LMConfig, {"block_size": 2}, {}, {"time_conditioning": False}),
    "bd3lm_no_kv_cache": (
        BD3LM,
        BD3LMConfig,
        {"block_size": 2},
        {"kv_cache": False},
        {"time_conditioning": False},
    ),
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_diffusion_samplers_draw_the_known_distribution(tok_path, vocab, name):
    vocab_size, mask_id = vocab
    cls, cfg_cls, options, gen_options, oracle_options = SAMPLERS[name]
    obj = objective(cls, cfg_cls, tok_path, **options)
    offset = math.log(vocab_size - 1) if cls is SEDD else 0.0
    oracle = Oracle(vocab_size, mask_id, mode="diffusion", score_offset=offset, **oracle_options)
    num = 600
    gen_options = {"steps": 64, **gen_options}
    samples = obj.generate(
        oracle, num, LENGTH, generator=torch.Generator().manual_seed(1), **gen_options
    )
    assert samples.shape == (num, LENGTH) and not bool((samples == mask_id).any())
    invalid, tv = score(samples)
    # simultaneous reveals from marginals make a few invalid sequences
    assert invalid < 0.05 and tv < 0.08, (name, invalid, tv)
    oracle.broken = True
    samples = obj.generate(
        oracle, num, LENGTH, generator=torch.Generator().manual_seed(1), **gen_options
    )
    invalid, tv = score(samples)
    assert invalid > 0.5 and tv > 0.5, (name, invalid, tv)


def test_ar_sampler_draws_the_known_distribution(tok_path, vocab):
    vocab_size, mask_id = vocab
    obj = objective(AR, ARConfig, tok_path)
    oracle = Oracle(vocab_size, mask_id, mode="ar", time_conditioning=False)
    for kv_cache in (True, False):
        samples = obj.generate(
            oracle, 600, LENGTH, generator=torch.Generator().manual_seed(2), kv_cache=kv_cache
        )
        invalid, tv = score(samples)
        assert invalid == 0 and tv < 0.06, (kv_cache, tv)
    oracle.broken = True
    invalid, tv = score(obj.generate(oracle, 600, LENGTH, generator=torch.Generator()))
    assert invalid > 0.5 and tv > 0.5


def test_mdlm_cache_skips_network_calls_and_changes_nothing(tok_path, vocab):
    vocab_size, mask_id = vocab
    obj = objective(MDLM, MDLMConfig, tok_path)
    oracle = Oracle(vocab_size, mask_id, mode="diffusion", time_conditioning=False)
    runs = {}
    for cache in (True, False):
        oracle.calls = 0
        gen = torch.Generator().manual_seed(5)
        runs[cache] = (obj.generate(oracle, 2, LENGTH, steps=100, generator=gen, cache=cache),)
        runs[cache] += (oracle.calls,)
    assert torch.equal(runs[True][0], runs[False][0])
    # with the cache: a call only after a step that changed a token (at most 2 L + 1)
    assert runs[True][1] <= 2 * LENGTH + 1 and runs[False][1] > 3 * runs[True][1]
    # a time-conditioned network is called every step: its output depends on t
    oracle.time_conditioning = True
    oracle.calls = 0
    obj.generate(oracle, 2, LENGTH, steps=100, generator=torch.Generator().manual_seed(5))
    assert oracle.calls == runs[False][1]


def dlm(vocab_size: int, time_conditioning: bool, seed: int = 0):
    cfg = DLMConfig(
        vocab_size=vocab_size,
        max_seq_len=16,
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
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.eval()


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_bd3lm_kv_cache_matches_recomputing_the_prefix(tok_path, vocab, time_conditioning):
    vocab_size, mask_id = vocab
    obj = objective(BD3LM, BD3LMConfig, tok_path, block_size=4)
    model = dlm(vocab_size, time_conditioning)
    outs = []
    for kv_cache in (True, False):
        gen = torch.Generator().manual_seed(11)
        # 14 = three blocks of 4 and a last block of 2
        outs.append(obj.generate(model, 6, 14, steps=5, generator=gen, kv_cache=kv_cache))
    assert torch.equal(outs[0], outs[1])
    assert not bool((outs[0] == mask_id).any()) and len(set(outs[0].flatten().tolist())) > 3
    nucleus = obj.generate(
        model, 6, 14, steps=5, generator=torch.Generator().manual_seed(11), top_p=0.5
    )
    assert not torch.equal(nucleus, outs[0])


def test_ar_kv_cache_matches_recomputing_the_prefix_and_nucleus(tok_path, vocab):
    vocab_size, _ = vocab
    obj = objective(AR, ARConfig, tok_path)
    model = dlm(vocab_size, time_conditioning=False)
    outs = [
        obj.generate(model, 5, 12, generator=torch.Generator().manual_seed(3), kv_cache=kv)
        for kv in (True, False)
    ]
    assert torch.equal(outs[0], outs[1]) and len(set(outs[0].flatten().tolist())) > 3
    greedy = obj.generate(model, 5, 12, generator=torch.Generator(), temperature=0.0)
    tiny_nucleus = obj.generate(model, 5, 12, generator=torch.Generator(), top_p=1e-6)
    assert torch.equal(greedy, tiny_nucleus) and not torch.equal(greedy, outs[0])


def test_top_p_filter_and_categorical():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]], dtype=torch.float64)
    assert torch.allclose(top_p_filter(probs, 0.7), torch.tensor([[0, 0.625, 0, 0.375]]).double())
    assert torch.allclose(top_p_filter(probs, 0.5), torch.tensor([[0, 1.0, 0, 0]]).double())
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    # inverse CDF: uniforms in each interval pick its id; zero-mass ids never come
    u = torch.tensor([0.0, 0.149, 0.151, 0.649, 0.651, 0.699, 0.701, 0.9999])
    picks = categorical(probs.expand(len(u), 4), u).tolist()
    assert picks == [0, 0, 1, 1, 2, 2, 3, 3]
    zero = torch.tensor([[0.0, 0.4, 0.0, 0.6]]).expand(4, 4)
    assert categorical(zero, torch.tensor([0.0, 0.39, 0.4, 0.99])).tolist() == [1, 1, 3, 3]


# ------------------------------------------------------- confidence-ordered unmasking

TRUE = torch.tensor([7, 8, 11, 7, 11, 8, 8, 7, 11, 7])  # the sequence the fake network knows
# how sure it is of TRUE at each position: all distinct, so the reveal order is known
SURE = torch.tensor(
    [0.50, 0.95, 0.60, 0.85, 0.70, 0.99, 0.55, 0.80, 0.65, 0.90], dtype=torch.float64
)


class KnowsTrue:
    """probs_fn of a network that puts SURE[l] on TRUE[l] and shares the rest over the two
    other real ids, whatever it sees; it records the masks of every input."""

    def __init__(self, vocab_size: int, sure: torch.Tensor = SURE):
        self.inputs: list[torch.Tensor] = []
        other = ((1 - sure) / 2)[:, None].expand(-1, len(REAL))
        probs = torch.zeros(len(TRUE), vocab_size, dtype=torch.float64)
        probs[:, list(REAL)] = other
        probs.scatter_(-1, TRUE[:, None], sure[:, None].double())
        self.probs = probs

    def __call__(self, x_BL: torch.Tensor, t: float) -> torch.Tensor:
        self.inputs.append(x_BL.clone())
        return self.probs.expand(x_BL.shape[0], -1, -1)


def confidence(fake, mask_id, *, steps, generator=None, start=None, **options):
    from trainer.objectives.discrete import LogLinearSchedule
    from trainer.samplers.discrete import MaskedSteps, masked_confidence

    if start is None:
        start = torch.full((3, len(TRUE)), mask_id)
    generator = generator or torch.Generator().manual_seed(0)
    top_p = options.pop("top_p", 1.0)
    how = MaskedSteps(LogLinearSchedule(), steps, mask_id, generator, top_p)
    return masked_confidence(fake, start, how, **options)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_confidence_reveals_the_most_confident_on_schedule(vocab, temperature):
    """Argmax candidates (temperature 0) or draws from a network that is sure of TRUE: the
    sampler lands on TRUE, revealing positions by decreasing SURE, round(L (1 - t)) of them
    by time t (log-linear: the mask ratio is t), all by the last step."""
    vocab_size, mask_id = vocab
    sure = SURE if temperature == 0 else 1 - (1 - SURE) * 1e-6
    fake = KnowsTrue(vocab_size, sure)
    out = confidence(fake, mask_id, steps=4, temperature=temperature)
    assert torch.equal(out, TRUE.expand(3, -1))
    assert len(fake.inputs) == 4
    order = SURE.argsort(descending=True)
    for i, x_BL in enumerate(fake.inputs):  # the input of step i: revealed by t = 1 - i / 4
        revealed = round(len(TRUE) * i / 4)
        expected = torch.full_like(TRUE, mask_id)
        expected[order[:revealed]] = TRUE[order[:revealed]]
        assert torch.equal(x_BL, expected.expand(3, -1)), i


def test_confidence_commits_what_it_drew(vocab):
    """At temperature 1 the candidates are draws: the flat-ish network's rows differ, yet
    every committed token is a real id, and more steps than positions skip empty steps."""
    vocab_size, mask_id = vocab
    fake = KnowsTrue(vocab_size, torch.full_like(SURE, 0.4))
    out = confidence(fake, mask_id, steps=25)
    assert set(out.flatten().tolist()) <= set(REAL)
    assert not torch.equal(out[0], out[1]) or not torch.equal(out[1], out[2])
    assert len(fake.inputs) == len(TRUE)  # 25 steps, 10 reveal one token each


def test_confidence_is_a_function_of_the_generator(vocab):
    vocab_size, mask_id = vocab
    runs = [
        confidence(
            KnowsTrue(vocab_size, torch.full_like(SURE, 0.4)),
            mask_id,
            steps=5,
            generator=torch.Generator().manual_seed(seed),
            remask=remask,
        )
        for seed in (3, 3, 4)
        for remask in (0.0, 0.3)
    ]
    assert torch.equal(runs[0], runs[2]) and torch.equal(runs[1], runs[3])
    assert not torch.equal(runs[0], runs[4]) and not torch.equal(runs[1], runs[5])


def test_corrector_remasks_only_decoded_tokens_and_ends_unmasked(vocab):
    """With a prompt (positions clean in the input), each corrector input has the
    predictor's output with the round(remask R) weakest decoded tokens masked again: never
    a prompt position, the masked count back on the schedule after it, none at the end."""
    vocab_size, mask_id = vocab
    fake = KnowsTrue(vocab_size)
    start = torch.full((1, len(TRUE)), mask_id)
    prompt = [1, 5]  # the network's two surest positions, given a different token
    start[0, prompt] = 11
    out = confidence(fake, mask_id, steps=4, start=start, temperature=0.0, remask=0.5)
    assert not bool((out == mask_id).any()) and out[0, prompt].tolist() == [11, 11]
    assert len(fake.inputs) == 8  # a predictor and a corrector call per step
    free = len(TRUE) - len(prompt)
    for i in range(4):
        corrector_in = fake.inputs[2 * i + 1]
        assert corrector_in[0, prompt].tolist() == [11, 11]
        decoded_after = free - round(free * (1 - (i + 1) / 4))
        remasked = round(0.5 * decoded_after)
        assert int((corrector_in == mask_id).sum()) == free - decoded_after + remasked, i
        # the corrector's call restores the schedule: the next predictor sees its count
        if i < 3:
            masked_next = int((fake.inputs[2 * i + 2] == mask_id).sum())
            assert masked_next == free - decoded_after, i
    # weakest first: after the first predictor step (the 2 surest free positions 9, 3),
    # half of them, the less sure (3), is masked again
    assert (fake.inputs[1] == mask_id)[0].nonzero().flatten().tolist() == [0, 2, 3, 4, 6, 7, 8]
    free_positions = [i for i in range(len(TRUE)) if i not in prompt]
    assert torch.equal(out[0, free_positions], TRUE[free_positions])


@pytest.mark.parametrize(
    "cls,cfg_cls,time_conditioning", [(MDLM, MDLMConfig, False), (SEDD, SEDDConfig, True)]
)
@pytest.mark.parametrize("sampler", ["confidence", "pc"])
def test_confidence_samplers_of_mdlm_and_sedd_keep_to_the_allowed_sequences(
    tok_path, vocab, cls, cfg_cls, time_conditioning, sampler
):
    """On the exact oracle, one reveal per step from exact conditionals can only build
    allowed sequences (the choice of position biases their frequencies, so no TV check);
    the broken oracle fails. The recipe's ``sampler`` option picks the same sampler."""
    vocab_size, mask_id = vocab
    offset = math.log(vocab_size - 1) if cls is SEDD else 0.0
    oracle = Oracle(
        vocab_size,
        mask_id,
        mode="diffusion",
        score_offset=offset,
        time_conditioning=time_conditioning,
    )
    obj = objective(cls, cfg_cls, tok_path)
    draws = {}
    for how in ("argument", "config"):
        if how == "config":
            obj = objective(cls, cfg_cls, tok_path, sampler=sampler)
        gen = torch.Generator().manual_seed(1)
        kwargs = {"sampler": sampler} if how == "argument" else {}
        draws[how] = obj.generate(oracle, 300, LENGTH, steps=8, generator=gen, **kwargs)
    assert torch.equal(draws["argument"], draws["config"])
    invalid, _ = score(draws["config"])
    assert invalid == 0, (sampler, invalid)
    assert len(set(map(tuple, draws["config"].tolist()))) > 1
    oracle.broken = True
    invalid, _ = score(obj.generate(oracle, 300, LENGTH, steps=8, generator=gen))
    assert invalid > 0.5


def test_unknown_sampler_names_and_misplaced_temperature_are_errors(tok_path, vocab):
    from configlib import ConfigError
    from trainer.registry import load_config

    vocab_size, mask_id = vocab
    oracle = Oracle(vocab_size, mask_id, mode="diffusion", time_conditioning=True)
    gen = torch.Generator()
    for cls, cfg_cls, choices in (
        (MDLM, MDLMConfig, "['ancestral', 'confidence', 'pc']"),
        (SEDD, SEDDConfig, "['analytic', 'euler', 'confidence', 'pc']"),
    ):
        obj = objective(cls, cfg_cls, tok_path)
        with pytest.raises(
            ValueError,
            match=rf"unknown {cls.__name__} sampler 'maskgit'; "
            rf"one of {re.escape(choices)}",
        ):
            obj.generate(oracle, 2, LENGTH, steps=4, generator=gen, sampler="maskgit")
        with pytest.raises(ValueError, match="temperature applies to the samplers"):
            obj.generate(oracle, 2, LENGTH, steps=4, generator=gen, temperature=0.5)
        obj.generate(oracle, 2, LENGTH, steps=4, generator=gen, sampler="pc", temperature=0.5)
    for name in ("mdlm", "sedd"):
        with pytest.raises(ConfigError, match=r"objective.sampler: 'maskgit' is not allowed"):
            load_config(f"recipes/tiny/{name}.yaml", ["objective.sampler=maskgit"])
