"""Where a run's first weights come from when they are not random, and which of them train.

``init.path`` names an earlier run directory (its latest complete checkpoint, or
``init.step``; the EMA when it has one, else the model, or ``init.weights``) or a
``.safetensors`` written by ``python -m trainer.export``. The earlier run must hold the
same model family and the same parameter shapes; anything else is one ``ConfigError``
line naming ``init.path``. ``train.trainable`` freezes every parameter whose name no
pattern matches. ``trainer.export.load_start`` reads the weights; this module checks and
applies them, and the freezing, in ``trainer.backends.base.build_initialised`` under every
backend, before the optimizers are made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch

import torch
from torch import nn

from configlib import ConfigError


@dataclass
class Start:
    """How the model starts: initialisation seed, optional full weights, trainable names."""

    seed: int
    state: dict[str, torch.Tensor] | None = None  # full (unsharded) tensors from init.path
    source: str = ""  # where ``state`` came from, for messages
    trainable: list[str] | None = None  # fnmatch patterns; None: everything trains
    frozen: list[str] = field(default_factory=list)  # filled by apply_trainable


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``state`` has exactly the model's tensors and shapes (``model`` may be on meta)."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {want[k]}"
        for k in sorted(set(want) & set(state))
        if tuple(state[k].shape) != want[k]
    ]
    problems = []
    if missing:
        problems.append(f"lacks {len(missing)} tensor(s) of the model ({', '.join(missing[:3])})")
    if extra:
        problems.append(f"has {len(extra)} the model lacks ({', '.join(extra[:3])})")
    if wrong:
        problems.append(f"has other shapes ({'; '.join(wrong[:3])})")
    if problems:
        raise ConfigError(
            [
                f"init.path: {source} is another architecture than the recipe's model: "
                + ", ".join(problems)
            ]
        )


def apply_trainable(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Freeze the parameters no pattern matches; returns the frozen names."""
    if patterns is None:
        return []
    names = [name for name, _ in model.named_parameters()]
    unused = [p for p in patterns if not any(fnmatch(name, p) for name in names)]
    if unused:
        raise ConfigError(
            [
                f"train.trainable: {p!r} matches no parameter of the model (names look like "
                f"{names[0]!r}, {names[-1]!r})"
                for p in unused
            ]
        )
    frozen = []
    for name, param in model.named_parameters():
        if not any(fnmatch(name, p) for p in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into a (possibly FSDP2-sharded) model on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
