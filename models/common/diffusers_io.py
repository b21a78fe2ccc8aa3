"""Reading a local diffusers model directory: its config.json and safetensors weights.

Shared by the state-dict adapters (``models/mmdit_diffusers.py``, ``models/kl_vae.py``).
Only safetensors are read (a pickle cannot be loaded safely), and nothing is downloaded:
``path`` is a model directory (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
a sharded ``*.safetensors.index.json``), a pipeline directory holding the model in
``subfolder``, or one ``.safetensors`` file with ``config.json`` beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def model_directory(path: str | Path, subfolder: str) -> Path:
    """``path`` itself, or its ``subfolder`` when ``path`` is a whole pipeline directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"diffusers checkpoint not found: {path}")
    if (
        path.is_dir()
        and not (path / CONFIG_NAME).exists()
        and (path / subfolder / CONFIG_NAME).exists()
    ):
        return path / subfolder
    return path


def read_config(path: Path) -> dict:
    """The config.json of the model at ``path`` (a directory or a weights file in one)."""
    directory = path if path.is_dir() else path.parent
    config_path = directory / CONFIG_NAME
    if not config_path.exists():
        raise FileNotFoundError(
            f"no {CONFIG_NAME} in {directory} (diffusers checkpoint directory expected)"
        )
    return json.loads(config_path.read_text())


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Every tensor of the model at ``path`` in its stored dtype, and the files read."""
    from safetensors.torch import load_file

    files = weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state, files


def weight_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _index_files(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors weights are supported")
        return [path]
    index = path / WEIGHTS_INDEX_NAME
    if index.exists():
        return _index_files(index)
    if (path / WEIGHTS_NAME).exists():
        return [path / WEIGHTS_NAME]
    candidates = sorted(p for p in path.glob("diffusion_pytorch_model*.safetensors"))
    indexes = sorted(path.glob("diffusion_pytorch_model*.safetensors.index.json"))
    if len(indexes) == 1:
        return _index_files(indexes[0])
    if len(candidates) == 1 and not indexes:
        return candidates
    if candidates or indexes:
        names = [p.name for p in candidates + indexes]
        raise ValueError(f"{path}: several weight files {names}; pass the one to load")
    raise FileNotFoundError(
        f"{path}: no diffusion_pytorch_model*.safetensors (only safetensors checkpoints are supported)"
    )


def _index_files(index: Path) -> list[Path]:
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no 'weight_map' in the safetensors index")
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{index}: shards listed but missing: {missing}")
    return files


def listing(keys: list[str], limit: int = 8) -> str:
    """A few of ``keys`` for an error message."""
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
