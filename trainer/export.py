"""``python -m trainer.export RUN_DIR_OR_CHECKPOINT_ROOT [--step N] [--weights ema|model] --out FILE``

Consolidate the (EMA) weights of a sharded checkpoint (DCP, or DeepSpeed's with
``parallel.backend: deepspeed``) into one ``.safetensors`` file for inference. Runs in
one process, needs no process group, reads local paths or fsspec URLs (DeepSpeed's:
local only), and writes the output atomically (temp file, then rename).
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
    prefix = f"{weights}."
    tensors = {
        key[len(prefix) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and hasattr(meta, "size")
    }
    if not tensors:
        hint = " (was ema.enabled true?)" if weights == "ema" else ""
        raise ExportError(f"checkpoint step {step} has no '{weights}' weights{hint}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process": intended
        dcp.load({weights: tensors}, storage_reader=reader, no_dist=True)
    return tensors, step


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
