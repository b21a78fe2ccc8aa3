"""``python -m trainer.export RUN_DIR_OR_CHECKPOINT_ROOT [--step N] [--weights ema|model] --out FILE``

Consolidate the (EMA) weights of a sharded checkpoint (DCP, or DeepSpeed's with
``parallel.backend: deepspeed``) into one ``.safetensors`` file for inference. Runs in
one process, needs no process group, reads local paths or fsspec URLs (DeepSpeed's:
local only), and writes the output atomically (temp file, then rename).

``load_start`` reads the same weights (or an exported file) as a new run's starting
point (``init.path``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml

from configlib import ConfigError
from trainer.checkpoint import CheckpointStore, dcp_reader, step_dir_name


class ExportError(RuntimeError):
    """A user mistake: wrong path, no such step, missing weights."""


def _store_for(path: str) -> CheckpointStore:
    store = CheckpointStore(path)
    if not store.step_dirs() and store.fs.exists(store.join("checkpoints")):
        store = CheckpointStore(path.rstrip("/") + "/checkpoints")
    return store


def consolidated_state_dict(
    path: str, step: int | None = None, weights: str = "ema"
) -> tuple[dict[str, torch.Tensor], int]:
    """Full (unsharded) tensors of ``weights`` ('ema' or 'model') from a checkpoint."""
    store = _store_for(path)
    if step is None:
        step = store.latest_step()
        if step is None:
            raise ExportError(f"no complete checkpoint under {store.url()}")
    elif not store.is_complete(step):
        raise ExportError(
            f"{store.url(step_dir_name(step))} is not a complete checkpoint (have: {store.complete_steps()})"
        )
    if store.meta(step).get("format", "dcp") == "deepspeed":
        return _deepspeed_state_dict(store, step, weights), step
    reader = dcp_reader(store, step)
    metadata = reader.read_metadata()

    def stored(section: str) -> dict[str, torch.Tensor]:
        prefix = f"{section}."
        return {
            key[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and hasattr(meta, "size")
        }

    tensors = stored(weights)
    if not tensors:
        hint = " (was ema.enabled true?)" if weights == "ema" else ""
        raise ExportError(f"checkpoint step {step} has no '{weights}' weights{hint}")
    sections = {weights: tensors}
    if (
        weights == "ema"
    ):  # the EMA averages trainable weights; the frozen ones (train.trainable) and buffers are the model's
        rest = {k: v for k, v in stored("model").items() if k not in tensors}
        if rest:
            sections["model"] = rest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process": intended
        dcp.load(sections, storage_reader=reader, no_dist=True)
    return {**sections.get("model", {}), **tensors}, step


def _deepspeed_state_dict(
    store: CheckpointStore, step: int, weights: str
) -> dict[str, torch.Tensor]:
    """Weights of a DeepSpeed step: the model through DeepSpeed's zero_to_fp32 (fp32
    master weights of every partition), the EMA from its per-rank pieces."""
    from trainer.backends.deepspeed_backend import consolidated_ema, consolidated_model

    if store.remote:
        raise ExportError(f"DeepSpeed checkpoints are read from local paths, not {store.url()}")
    step_dir = Path(store.join(step_dir_name(step)))
    tensors = consolidated_ema(step_dir) if weights == "ema" else consolidated_model(step_dir)
    if not tensors:
        hint = " (was ema.enabled true?)" if weights == "ema" else ""
        raise ExportError(f"checkpoint step {step} has no '{weights}' weights{hint}")
    if weights == "ema":  # frozen weights (train.trainable) have no EMA: the model's
        tensors = {**consolidated_model(step_dir), **tensors}
    return tensors


def export(path: str, out: Path, step: int | None = None, weights: str = "ema") -> int:
    from safetensors.torch import save_file

    tensors, step = consolidated_state_dict(path, step, weights)
    metadata = {"step": str(step), "weights": weights}
    config = Path(path) / "config.yaml"
    if config.is_file():  # a run directory: the file then says which network it holds
        model = (yaml.safe_load(config.read_text()) or {}).get("model")
        if model:
            metadata["model"] = json.dumps(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return step


def _stored_model_name(path: Path) -> tuple[str | None, dict[str, torch.Tensor] | None]:
    """(model family the file or run says it holds, tensors of a .safetensors file)."""
    if path.is_file():
        from models.autoencoders import read_export

        tensors, meta = read_export(path)
        model = json.loads(meta["model"]) if "model" in meta else {}
        return model.get("name"), tensors
    config = path / "config.yaml"
    if not config.is_file():
        raise ConfigError(
            [
                f"init.path: {path} is not a run directory (no config.yaml) nor an exported .safetensors"
            ]
        )
    return ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("name"), None


def load_start(init_cfg, model_name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The full weights ``init.path`` names, checked to be of ``model_name``'s family."""
    path = Path(init_cfg.path)
    if not path.exists():
        raise ConfigError([f"init.path: {path}: no such run directory or .safetensors file"])
    held, tensors = _stored_model_name(path)
    if held is not None and held != model_name:
        raise ConfigError(
            [f"init.path: {path} holds a {held!r} model; this recipe trains a {model_name!r}"]
        )
    if tensors is not None:
        return tensors, str(path)
    root = str(path / "checkpoints")
    try:
        if init_cfg.weights is None:
            try:
                state, step = consolidated_state_dict(root, init_cfg.step, "ema")
                weights = "ema"
            except ExportError:
                state, step = consolidated_state_dict(root, init_cfg.step, "model")
                weights = "model"
        else:
            weights = init_cfg.weights
            state, step = consolidated_state_dict(root, init_cfg.step, weights)
    except ExportError as err:
        raise ConfigError([f"init.path: {err}"]) from None
    return state, f"{path} (step {step}, {weights} weights)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.export", description=__doc__.splitlines()[0]
    )
    parser.add_argument("path", help="run directory or checkpoint root (local or fsspec URL)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--weights", choices=["ema", "model"], default="ema", help="which weights to export"
    )
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        step = export(args.path, args.out, args.step, args.weights)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.weights} weights of step {step} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
