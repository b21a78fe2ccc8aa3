"""Metric sinks (metrics.jsonl always; TensorBoard and W&B when the recipe asks), the
rank-0 progress bar, and MFU."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per GPU by the vendors' datasheets; matched against the device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}


def device_peak_tflops(device_name: str | None, override: float | None) -> float | None:
    if override is not None:
        return override
    if not device_name:
        return None
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Drop records past ``last_step`` (steps a crashed run did after its last checkpoint)."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a line cut short by the crash
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return dropped


class MetricsLogger:
    """Rank 0 writes; other ranks hold a no-op instance."""

    def __init__(
        self,
        output_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        cfg_logging,
        run_config: dict,
    ):
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self.file = open(output_dir / "metrics.jsonl", "a", buffering=1)
        if cfg_logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if cfg_logging.wandb:
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(
                project=cfg_logging.wandb_project,
                mode=cfg_logging.wandb_mode,
                dir=str(output_dir),
                config=run_config,
                id=_wandb_run_id(output_dir),
                resume="allow",
            )
        if cfg_logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
                smoothing=0.1,
            )

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self.file.write(json.dumps(clean) + "\n")
        step = record["step"]
        scalars = {
            k: v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and v is not None
        }
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def progress(self, step: int, loss: float | None, samples_per_s: float | None) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        post = {}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if samples_per_s is not None:
            post["samples/s"] = f"{samples_per_s:.1f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run_id(output_dir: Path) -> str:
    """A stable id per run directory, so a resumed run continues the same W&B run."""
    path = output_dir / ".wandb_run_id"
    if path.exists():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id
