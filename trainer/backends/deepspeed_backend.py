"""DeepSpeed ZeRO (stages 1-3, optional CPU/NVMe offload) behind the training loop.

What it does, and why:

* **Engine per trainable module.** The model (and any trainable extra module of the
  objective) is built on meta, parallelized (activation checkpointing / compile only),
  materialised and initialised with ``init_weights(seed)`` exactly as under FSDP2, then
  handed to ``deepspeed.initialize`` with our torch AdamW as the client optimizer (also
  under offload: the same update rule as FSDP2 and no compiled op). ZeRO-3 partitions
  the parameters there, so each rank briefly holds the full model once, at start-up.
* **The config is built in code** from the recipe (batch sizes, accumulation, clipping,
  precision, stage, offload); ``parallel.deepspeed`` adds other DeepSpeed keys, checked
  by :func:`check_passthrough` against DeepSpeed's own config reader.
* **Steps.** DeepSpeed accumulates gradients (``engine.backward`` divides by the number
  of micro-batches, like the FSDP2 path) and steps at the last micro-batch; the LR
  schedulers drive the client optimizer's param groups every global step, as under
  FSDP2. DeepSpeed skips the update on every rank when the global gradient norm is not
  finite; a non-finite loss on any rank is turned into one (see ``backward``).
* **Several trainable modules** (an objective's critic, say): one engine each; a phase
  runs its own engine and sees the others as plain modules with gradients off, which is
  what FSDP2's per-phase zero_grad amounts to (see ``begin_phase``).
* **EMA** (:class:`PartitionedEMA`): each rank averages the fp32 master values it owns
  (its ZeRO partition of every parameter), so no rank ever holds a full EMA.
* **Frozen companions** (text encoders) that can shard themselves (``shard_for``, e.g.
  ``conditioning.shard_encoders: true``) are sharded with FSDP2 on the same ranks (they
  never step, so FSDP2's per-layer gather is all they need); otherwise they are
  replicated, which suits small ones.
* **Checkpoints** go into the usual step directory: ``deepspeed/<module>/`` (DeepSpeed's
  ``save_checkpoint``), ``ema/rank_<rank, 5 digits>.pt`` (each rank's EMA ranges), plus the loop's
  per-rank files, ``trainer.pt`` and ``meta.json``. Resuming on another number of ranks
  converts the step to DeepSpeed's universal format once (rank 0, into ``universal/``,
  published by a rename) and loads that; EMA ranges are re-cut by offset.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.backends.base import Backend, build_initialised, make_optimizer, parallel_plan
from trainer.checkpoint import CheckpointStore, step_dir_name
from trainer.config import OptimizerConfig, ParallelConfig
from trainer.warm_start import Start

log = logging.getLogger("trainer")

# DeepSpeed keys the recipe decides; a passthrough value would contradict it.
RESERVED: dict[str, str] = {
    "train_batch_size": "use train.batch_size",
    "train_micro_batch_size_per_gpu": "use train.micro_batch_size",
    "gradient_accumulation_steps": "use train.micro_batch_size (accumulation = "
    "train.batch_size / ranks / micro_batch_size)",
    "gradient_clipping": "use train.grad_clip",
    "optimizer": "use the optimizer section",
    "scheduler": "use the schedule section",
    "fp16": "use parallel.mixed_precision",
    "bf16": "use parallel.mixed_precision",
    "bfloat16": "use parallel.mixed_precision",
    "amp": "use parallel.mixed_precision",
    "torch_autocast": "use parallel.mixed_precision",
    "activation_checkpointing": "use parallel.activation_checkpointing",
    "compile": "use parallel.compile",
    "zero_allow_untested_optimizer": "set by the trainer (its AdamW is the client optimizer)",
    "zero_force_ds_cpu_optimizer": "set by the trainer (its AdamW also runs under offload)",
    "zero_optimization.stage": "use parallel.zero_stage",
    "zero_optimization.offload_optimizer": "use parallel.offload_optimizer and parallel.nvme_path",
    "zero_optimization.offload_param": "use parallel.offload_params and parallel.nvme_path",
    "zero_optimization.cpu_offload": "use parallel.offload_optimizer",
    "zero_optimization.cpu_offload_params": "use parallel.offload_params",
    "zero_optimization.compute_grad_norm": "set by the trainer (it logs and guards the norm)",
    "checkpoint.load_universal": "set by the trainer when a run resumes on another number of ranks",
}


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _import_deepspeed(device_type: str | None = None):
    """Import DeepSpeed quietly, on the accelerator of our device (not its own guess)."""
    if device_type is not None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    return deepspeed


# ------------------------------------------------------------------------ config
def engine_config(
    parallel: ParallelConfig,
    *,
    micro_batch: int,
    accum_steps: int,
    world_size: int,
    grad_clip: float | None,
    load_universal: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config of one engine, from the recipe plus ``parallel.deepspeed``."""
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    for key, target in (
        ("offload_optimizer", "offload_optimizer"),
        ("offload_param", "offload_params"),
    ):
        where = getattr(parallel, target)
        if where != "none":
            zero[key] = {"device": where}
            if where == "nvme":
                zero[key]["nvme_path"] = parallel.nvme_path
    config: dict[str, Any] = {
        "train_batch_size": micro_batch * accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": parallel.mixed_precision == "bf16"},
        "fp16": {"enabled": parallel.mixed_precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the loop logs
        "checkpoint": {"load_universal": load_universal},
    }
    return _deep_merge(config, parallel.deepspeed)


class _SeenKeys:
    """A keys() view that records membership tests (``"x" in config.keys()``)."""

    def __init__(self, keys, seen: set):
        self._keys, self._seen = keys, seen

    def __contains__(self, key) -> bool:
        self._seen.add(key)
        return key in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _Recorder(dict):
    """A config dict that records every top-level key DeepSpeed's reader asks about."""

    def __init__(self, data: dict, seen: set):
        super().__init__(data)
        self.seen = seen  # kept by copy.copy (DeepSpeedConfig copies its input)

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        return _SeenKeys(super().keys(), self.seen)


def _reserved_problems(extras: dict) -> list[tuple[str, str]]:
    out = []
    for dotted, hint in RESERVED.items():
        section, _, key = dotted.rpartition(".")
        node = extras.get(section) if section else extras
        if isinstance(node, dict) and key in node:
            out.append((dotted, f"set by the recipe; {hint}" if hint.startswith("use") else hint))
    return out


def _pydantic_problems(exc, prefix: str, fields) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        key = ".".join([prefix, *(str(p) for p in err.get("loc", ()))])
        if err.get("type") == "extra_forbidden":
            close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append((key, f"unknown key in DeepSpeed's {prefix} schema{hint}"))
        else:
            out.append((key, err.get("msg", "invalid value")))
    return out


def check_passthrough(extras: dict[str, Any]) -> list[tuple[str, str]]:
    """Problems with ``parallel.deepspeed`` as (key relative to it, message).

    Keys the recipe controls are rejected, naming the recipe key to use. Unknown
    top-level keys are those DeepSpeed's own config reader (``DeepSpeedConfig``) never
    asks for; ``zero_optimization`` is checked against its pydantic schema; then the
    whole config goes through DeepSpeed's reader, whose complaints are reported too.
    """
    out = _reserved_problems(extras)
    if out:
        return out
    _import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    zero = extras.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return [("zero_optimization", "expected a mapping of ZeRO options")]
    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as exc:
        fields = {*DeepSpeedZeroConfig.model_fields, *_aliases(DeepSpeedZeroConfig)}
        return _pydantic_problems(exc, "zero_optimization", fields)
    seen: set = set()
    base = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1}
    try:
        DeepSpeedConfig(_Recorder({**base, **extras}, seen))
    except Exception as exc:  # DeepSpeed raises assertions, ValueErrors, its own errors
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [("", f"DeepSpeed rejects this config: {message}")]
    known = {k for k in seen if isinstance(k, str)}
    for key in extras:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append((key, f"unknown DeepSpeed config key{hint}"))
    return out


def _aliases(model) -> set[str]:
    return {f.alias for f in model.model_fields.values() if getattr(f, "alias", None)}


# --------------------------------------------------------------------------- EMA
@dataclass
class _Piece:
    """The range [start, start + len(shadow)) of one flattened parameter this rank owns."""

    name: str
    param: nn.Parameter
    shape: tuple[int, ...]
    start: int
    shadow: torch.Tensor  # (length,) fp32


class PartitionedEMA:
    """EMA of the fp32 master weights, each rank over the ranges ZeRO gives it.

    ZeRO-3 gives rank r the range [r * P, (r + 1) * P) of every flattened parameter
    (P = ceil(numel / ranks)); ZeRO-1/2 cut the flattened parameter group into equal
    parts, so a rank owns some parameters wholly, a part of one or two, or nothing of
    others. Either way every value is owned once, so the pieces of all ranks together are
    the whole EMA, and saved pieces can be re-cut for any other number of ranks.
    """

    def __init__(self, engine, decay: float, stage: int):
        self.engine = engine
        self.decay = decay
        self.stage3 = stage == 3
        self.pieces: list[_Piece] = []
        for name, param in engine.module.named_parameters():
            if not param.requires_grad:
                continue
            start, master = self._master(param)
            if master is None:
                continue
            shape = tuple(param.ds_shape) if self.stage3 else tuple(param.shape)
            shadow = master.detach().float().clone()
            self.pieces.append(_Piece(name, param, shape, start, shadow))

    def _master(self, param: nn.Parameter) -> tuple[int, torch.Tensor | None]:
        """(start, fp32 master values of this rank's range), fetched anew each time:
        DeepSpeed may move or relink its flat buffers (checkpoint load, offload)."""
        if self.stage3:
            from deepspeed.utils import safe_get_local_fp32_param

            size = param.partition_numel()
            start = dist.get_rank() * size
            length = min(size, param.ds_numel - start)
            if length <= 0:
                return start, None
            return start, safe_get_local_fp32_param(param).narrow(0, 0, length)
        mapping = getattr(param, "_hp_mapping", None)  # set by ZeRO-1/2 for owned ranges
        if mapping is None:
            return 0, None
        return mapping.lp_fragment_address.start, mapping.get_hp_fragment()

    def _masters(self) -> list[torch.Tensor]:
        return [self._master(piece.param)[1] for piece in self.pieces]

    @torch.no_grad()
    def copy_from_model(self) -> None:
        for piece, master in zip(self.pieces, self._masters()):
            piece.shadow.copy_(master)

    @torch.no_grad()
    def update(self) -> None:
        shadows = [piece.shadow for piece in self.pieces]
        masters = [m.to(s.device, s.dtype) for m, s in zip(self._masters(), shadows)]
        if shadows:
            torch._foreach_lerp_(shadows, masters, 1.0 - self.decay)

    # ------------------------------------------------------------------ checkpoints
    def partition_state(self) -> dict[str, Any]:
        return {
            "pieces": {
                p.name: {"shape": p.shape, "start": p.start, "values": p.shadow.cpu()}
                for p in self.pieces
            }
        }

    @torch.no_grad()
    def load_partitions(self, files: list[Path]) -> None:
        """Fill this rank's ranges from the pieces saved by any number of ranks."""
        saved = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in files]
        for piece in self.pieces:
            end = piece.start + piece.shadow.numel()
            filled = 0
            for part in saved:
                entry = part["pieces"].get(piece.name)
                if entry is None:
                    continue
                lo = max(piece.start, entry["start"])
                hi = min(end, entry["start"] + entry["values"].numel())
                if lo < hi:
                    src = entry["values"][lo - entry["start"] : hi - entry["start"]]
                    piece.shadow[lo - piece.start : hi - piece.start].copy_(src)
                    filled += hi - lo
            if filled != piece.shadow.numel():
                raise RuntimeError(
                    f"EMA of {piece.name}: the checkpoint covers {filled} of the "
                    f"{piece.shadow.numel()} values this rank needs"
                )

    # ------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (for evaluation/sampling).

        ZeRO-3: the EMA ranges go into each parameter's own partition, so a forward
        gathers EMA weights layer by layer. ZeRO-1/2 keep full parameters on every rank:
        the ranges are assembled with one all-reduce.
        """
        if self.stage3:
            self._release_gathered()
            backups = [
                p.param.ds_tensor.narrow(0, 0, p.shadow.numel()).clone() for p in self.pieces
            ]
            for piece in self.pieces:
                piece.param.ds_tensor.narrow(0, 0, piece.shadow.numel()).copy_(piece.shadow)
            try:
                yield
            finally:
                self._release_gathered()
                for piece, saved in zip(self.pieces, backups):
                    piece.param.ds_tensor.narrow(0, 0, saved.numel()).copy_(saved)
            return
        params = [p for _, p in self.engine.module.named_parameters() if p.requires_grad]
        backups = [p.detach().clone() for p in params]
        for param, full in zip(params, self._assemble(params)):
            param.copy_(full.view_as(param))
        try:
            yield
        finally:
            for param, saved in zip(params, backups):
                param.copy_(saved)

    def _assemble(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        offsets, total = {}, 0
        for param in params:
            offsets[id(param)] = total
            total += param.numel()
        flat = torch.zeros(total, dtype=torch.float32, device=params[0].device)
        for piece in self.pieces:
            at = offsets[id(piece.param)] + piece.start
            flat[at : at + piece.shadow.numel()].copy_(piece.shadow)
        if dist.get_world_size() > 1:
            dist.all_reduce(flat)  # each value is owned by exactly one rank
        return [flat[offsets[id(p)] : offsets[id(p)] + p.numel()] for p in params]

    def _release_gathered(self) -> None:
        """Return gathered ZeRO-3 parameters (persistent small ones included) to their
        partitions, so the next forward gathers from the partitions we write."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        gathered = [
            p for p in self.engine.module.parameters() if p.ds_status == ZeroParamStatus.AVAILABLE
        ]
        if gathered:
            gathered[0].partition(param_list=gathered)


def consolidated_ema(step_dir: Path) -> dict[str, torch.Tensor]:
    """Full EMA tensors from the per-rank pieces of a DeepSpeed step directory."""
    flat: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    filled: dict[str, int] = {}
    for path in sorted((step_dir / "ema").glob("rank_*.pt")):
        part = torch.load(path, map_location="cpu", weights_only=True)
        for name, entry in part["pieces"].items():
            if name not in flat:
                shapes[name] = tuple(entry["shape"])
                flat[name] = torch.empty(math.prod(shapes[name]))
                filled[name] = 0
            values = entry["values"]
            flat[name][entry["start"] : entry["start"] + values.numel()] = values
            filled[name] += values.numel()
    incomplete = [name for name in flat if filled[name] != flat[name].numel()]
    if incomplete:
        raise RuntimeError(f"EMA pieces in {step_dir / 'ema'} do not cover {incomplete[:3]}")
    return {name: values.view(shapes[name]) for name, values in flat.items()}


def consolidated_model(step_dir: Path, tag: str = "model") -> dict[str, torch.Tensor]:
    """Full fp32 weights of one engine from a DeepSpeed step directory (zero_to_fp32)."""
    _import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # progress bars and prints
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir / "deepspeed"), tag=tag)
    return {k: v.contiguous() for k, v in state.items()}


# --------------------------------------------------------------------- checkpoints
def convert_to_universal(step_dir: Path, tags: list[str]) -> Path:
    """Convert a step's DeepSpeed checkpoints to the universal format (rank 0 only).

    Writes ``universal.tmp-*`` and renames it to ``universal/`` when every engine is
    converted, so a crash leaves either no ``universal/`` or a complete one.
    """
    target = step_dir / "universal"
    if target.exists():
        return target
    for stale in step_dir.glob("universal.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    _import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    tmp = step_dir / f"universal.tmp-{uuid.uuid4().hex[:8]}"
    for tag in tags:
        args = argparse.Namespace(
            input_folder=str(step_dir / "deepspeed" / tag),
            output_folder=str(tmp / tag),
            num_extract_workers=1,  # in-process: no fork of a rank with live process groups
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=False,
        )
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                ds_to_universal.main(args)
        except Exception as exc:
            tail = chatter.getvalue()[-2000:]
            raise RuntimeError(
                f"converting {step_dir / 'deepspeed' / tag} to a universal checkpoint failed: "
                f"{exc}\n{tail}"
            ) from exc
    os.replace(tmp, target)
    return target


class DeepSpeedShards:
    """Writes and reads the engines' and the EMA's state in a step directory."""

    format = "deepspeed"

    def __init__(self, backend: DeepSpeedBackend):
        self.backend = backend

    def _step_dir(self, store: CheckpointStore, step: int) -> Path:
        assert not store.remote, "validated: DeepSpeed checkpoints are local"
        return Path(store.join(step_dir_name(step)))

    def save(self, store: CheckpointStore, step: int, state: dict[str, Any]) -> None:
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        step_dir = self._step_dir(store, step)
        # ds_to_universal requires this record of the client (Megatron-DeepSpeed writes it too)
        info = {
            UNIVERSAL_CHECKPOINT_INFO: {
                UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE
            }
        }
        for tag, engine in self.backend.engines.items():
            engine.save_checkpoint(
                str(step_dir / "deepspeed"), tag=tag, client_state=info, save_latest=False
            )
        ema = state.get("ema")
        if ema is not None:
            path = step_dir / "ema" / f"rank_{self.backend.rank:05d}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(ema.partition_state(), path)

    def written(self, store: CheckpointStore, step: int) -> bool:
        step_dir = self._step_dir(store, step)
        for tag in self.backend.engines:
            tag_dir = step_dir / "deepspeed" / tag
            optim = list(tag_dir.glob("*optim_states.pt"))
            if len(optim) != self.backend.world_size or not list(tag_dir.glob("*model_states.pt")):
                return False
        if self.backend.has_ema:
            ranks = range(self.backend.world_size)
            return all((step_dir / "ema" / f"rank_{r:05d}.pt").exists() for r in ranks)
        return True

    def load(
        self, store: CheckpointStore, step: int, state: dict[str, Any], saved_world_size: int
    ) -> None:
        backend = self.backend
        step_dir = self._step_dir(store, step)
        universal = saved_world_size != backend.world_size
        if universal != backend.load_universal:
            raise RuntimeError(
                f"{step_dir} was saved on {saved_world_size} ranks but the engines were built "
                f"for {'universal' if backend.load_universal else 'same-size'} loading"
            )
        root = step_dir / "deepspeed"
        if universal:
            if backend.rank == 0 and not (step_dir / "universal").exists():
                log.warning(
                    "converting %s (saved on %d ranks) to a universal checkpoint for %d ranks",
                    step_dir.name,
                    saved_world_size,
                    backend.world_size,
                )
                convert_to_universal(step_dir, list(backend.engines))
            dist.barrier()
            root = step_dir / "universal"
        for tag, engine in backend.engines.items():
            path, _ = engine.load_checkpoint(
                str(root),
                tag=tag,
                load_module_strict=True,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint for '{tag}' under {root}")
        ema = state.get("ema")
        if ema is not None:
            files = [step_dir / "ema" / f"rank_{r:05d}.pt" for r in range(saved_world_size)]
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise FileNotFoundError(
                    f"{step_dir} has no EMA pieces {missing[:2]} (saved with ema.enabled false?)"
                )
            ema.load_partitions(files)


# ------------------------------------------------------------------------ backend
class DeepSpeedBackend(Backend):
    def __init__(
        self,
        parallel: ParallelConfig,
        *,
        micro_batch: int,
        accum_steps: int,
        local_rank: int = 0,
        **kwargs,
    ):
        super().__init__(parallel, **kwargs)
        # DeepSpeed reads these even when it joins an existing process group; a single
        # process started without a launcher has none of them.
        for key, value in (
            ("RANK", self.rank),
            ("WORLD_SIZE", self.world_size),
            ("LOCAL_RANK", local_rank),
        ):
            os.environ.setdefault(key, str(value))
        self.micro_batch = micro_batch
        self.accum_steps = accum_steps
        self.engines: dict[str, Any] = {}
        self.load_universal = False
        self.has_ema = False
        self.shards = DeepSpeedShards(self)
        self._num_params = 0
        self._mesh = None
        self._nonfinite: torch.Tensor | None = None
        self._frozen_for_phase: list[nn.Parameter] = []
        deepspeed = _import_deepspeed(self.device.type)
        # Joins the process group trainer.distributed already made (gloo / nccl).
        deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)
        if "nvme" in (parallel.offload_optimizer, parallel.offload_params):
            from deepspeed.ops.op_builder import AsyncIOBuilder

            if not AsyncIOBuilder().is_compatible(verbose=False):
                from configlib import ConfigError

                raise ConfigError(
                    [
                        "parallel.offload_optimizer/offload_params: NVMe offload needs DeepSpeed's "
                        "async_io op, which cannot be built here (install libaio-dev)"
                    ]
                )

    def expect_resume(self, meta: dict[str, Any] | None) -> None:
        self.load_universal = meta is not None and int(meta["world_size"]) != self.world_size

    def _config(self) -> dict[str, Any]:
        return engine_config(
            self.parallel,
            micro_batch=self.micro_batch,
            accum_steps=self.accum_steps,
            world_size=self.world_size,
            grad_clip=self.grad_clip,
            load_universal=self.load_universal,
        )

    def _engine(self, name: str, module: nn.Module, opt_cfg: OptimizerConfig):
        import deepspeed

        optimizer = make_optimizer(module.parameters(), opt_cfg, self.device)
        engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=self._config(), dist_init_required=False
        )
        self.engines[name] = engine
        self.modules[name] = engine
        self.optimizers[name] = optimizer  # DeepSpeed steps it; the LR lives in its groups
        return engine

    # ------------------------------------------------------------------------- build
    def build_model(self, family, model_cfg, opt_cfg: OptimizerConfig, start: Start) -> nn.Module:
        model = build_initialised(
            family, model_cfg, parallel_plan(self.parallel), None, self.device, start
        )
        # Counted before ZeRO-3 leaves each rank a 0-element tensor in place of each parameter.
        self.flops_per_sample = getattr(model, "flops_per_sample", lambda: None)()
        self._num_params = sum(p.numel() for p in model.parameters())
        return self._engine("model", model, opt_cfg)

    def add_module(self, name: str, extra, opt_cfg: OptimizerConfig) -> nn.Module:
        module = extra.module.to(self.device)
        if extra.trainable:
            return self._engine(name, module, opt_cfg)
        module.requires_grad_(False).eval()
        if hasattr(module, "shard_for"):
            module.shard_for(self._frozen_mesh())  # FSDP2 for frozen encoders that ask for it
        self.modules[name] = module
        return module

    def _frozen_mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.world_size,))
        return self._mesh

    def make_ema(self, decay: float) -> PartitionedEMA:
        self.has_ema = True
        return PartitionedEMA(self.engines["model"], decay, self.parallel.zero_stage)

    def num_params(self) -> int:
        return self._num_params

    # ------------------------------------------------------------------------- steps
    def begin_phase(self, name: str) -> dict[str, nn.Module]:
        """The phase's own engine, and the other trainable modules frozen and bare.

        Other engines must stay out of this phase's backward: ZeRO reduces gradients as
        they arrive, into buffers that engine's next step would use, and an engine's
        forward arms its own end-of-backward work, which a backward that is not its own
        would set off. So they are called as their plain modules (ZeRO-3 still gathers
        their parameters through the module's own hooks) with gradients off; under FSDP2
        their stray gradients would be cleared by their phase's zero_grad instead.
        """
        self._frozen_for_phase = [
            p
            for other, engine in self.engines.items()
            if other != name
            for p in engine.module.parameters()
            if p.requires_grad
        ]
        for param in self._frozen_for_phase:
            param.requires_grad_(False)
        if len(self.engines) == 1:
            return self.modules
        return {
            key: module.module if key in self.engines and key != name else module
            for key, module in self.modules.items()
        }

    def backward(self, name: str, loss: torch.Tensor, index: int, count: int) -> None:
        assert count == self.accum_steps, (count, self.accum_steps)
        engine = self.engines[name]
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite = bad if index == 0 else self._nonfinite | bad
        if index == count - 1:
            # A non-finite loss on this rank must skip the step on every rank. Its
            # gradients are non-finite in practice, which DeepSpeed's overflow check sees
            # on all ranks; multiplying the last loss by NaN makes that certain (a NaN
            # that carries no gradient) without a collective or a host sync.
            loss = loss * torch.where(self._nonfinite, float("nan"), 1.0)
        engine.backward(loss)  # divides by gradient_accumulation_steps
        engine.step()  # optimizer step at the last micro-batch only

    def finish_phase(self, name: str, loss_finite: bool) -> tuple[float, bool]:
        engine = self.engines[name]
        for param in self._frozen_for_phase:
            param.requires_grad_(True)
        self._frozen_for_phase = []
        norm = engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        applied = bool(engine.was_step_applied())
        assert loss_finite or not applied, "a non-finite loss must have skipped the step"
        if not applied and loss_finite and self.parallel.mixed_precision == "fp16":
            # fp16 dynamic loss scaling: DeepSpeed skipped an overflowing step and lowered
            # the scale. That is how it calibrates, not a divergence for the loop to count
            # (DeepSpeed itself stops at its minimum scale).
            log.info("fp16 loss scale overflow: DeepSpeed skipped the update and rescaled")
            return norm, True
        return norm, applied

    # ------------------------------------------------------------------- checkpoints
    def checkpoint_state(self, ema) -> dict[str, Any]:
        return {"ema": ema}
