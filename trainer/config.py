"""The recipe schema: one dataclass per section, each field with a one-line doc.

``trainer.registry.load_config(path, overrides)`` reads a recipe against this schema
and the registered families; it is the only entry point most code needs. Model,
objective and data sections are tagged unions: their ``name`` picks a family whose
own dataclass (next to the family's code) lists the remaining keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from configlib import (
    ConfigError,
    option,
    to_dict,
)
from configlib import _deep_merge as _merge

__all__ = ["Config", "ConfigError", "dump_config"]


@dataclass(kw_only=True)
class ModelSection:
    """Tagged union over model families (filled by trainer.registry)."""

    REGISTRY: ClassVar[dict[str, type]] = {}
    name: str = option(doc="Model family.")


@dataclass(kw_only=True)
class ObjectiveSection:
    """Tagged union over training objectives (filled by trainer.registry)."""

    REGISTRY: ClassVar[dict[str, type]] = {}
    name: str = option(doc="Training objective.")


@dataclass(kw_only=True)
class DataSection:
    """Tagged union over data sources (filled by trainer.registry)."""

    REGISTRY: ClassVar[dict[str, type]] = {}
    name: str = option(doc="Data source.")


@dataclass(kw_only=True)
class RunConfig:
    output_dir: str = option(
        doc="Run directory: config.yaml, metrics.jsonl, logs, samples, checkpoints."
    )
    seed: int = option(0, "Seed for weights, data order and noise.", ge=0)
    max_steps: int = option(doc="Optimizer steps to train for.", ge=1)


@dataclass(kw_only=True)
class TrainConfig:
    batch_size: int = option(
        doc="Global batch size: samples per optimizer step over all ranks.", ge=1
    )
    micro_batch_size: int | None = option(
        None,
        "Samples per forward pass per rank; the rest is gradient accumulation. Default: batch_size / ranks.",
    )
    grad_clip: float | None = option(
        1.0, "Clip the global gradient norm to this value; null disables.", gt=0
    )
    max_nonfinite_steps: int = option(
        5,
        "Stop after this many consecutive steps with a non-finite loss or gradient (each is skipped).",
        ge=1,
    )
    log_every: int = option(10, "Write a metrics.jsonl record every N steps.", ge=1)
    trainable: list[str] | None = option(
        None,
        "Glob patterns (fnmatch) of the model's parameter names that train; the others "
        "stay frozen at their initial values (no gradient, no optimizer or EMA state). "
        "Default: every parameter trains.",
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        if self.trainable is not None and not self.trainable:
            return [("trainable", "an empty list trains nothing; leave it out to train everything")]
        return []


@dataclass(kw_only=True)
class InitConfig:
    path: str | None = option(
        None,
        "Start from these weights instead of random ones: a run directory (its latest "
        "complete checkpoint) or a .safetensors from trainer.export of a run of the same "
        "model. Only a fresh run reads it; a resumed one continues from its own checkpoint.",
    )
    weights: Literal["ema", "model"] | None = option(
        None, "Which weights of a run directory; default: the EMA when it has one, else the model."
    )
    step: int | None = option(
        None, "Checkpoint step of a run directory; default: the latest.", ge=0
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = []
        for key in ("weights", "step"):
            if key in given and self.path is None:
                out.append((key, "has no effect without init.path"))
            elif key in given and str(self.path).endswith(".safetensors"):
                out.append((key, "has no effect for an exported .safetensors (it holds one set)"))
        return out


@dataclass(kw_only=True)
class OptimizerConfig:
    name: Literal["adamw"] = option("adamw", "Optimizer.")
    lr: float = option(1e-4, "Peak learning rate.", gt=0)
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas.")
    eps: float = option(1e-8, "AdamW epsilon.", gt=0)
    weight_decay: float = option(0.0, "Decoupled weight decay.", ge=0)
    fused: bool | None = option(
        None, "Use the fused AdamW kernel; null picks it where the device supports it."
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = []
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                out.append((f"betas[{i}]", f"{beta} is out of range; must be in [0, 1)"))
        return out


@dataclass(kw_only=True)
class ScheduleConfig:
    name: Literal["constant", "cosine", "linear"] = option(
        "constant", "Learning-rate decay after warmup."
    )
    warmup_steps: int = option(0, "Linear warmup from 0 to the peak LR over this many steps.", ge=0)
    min_lr_ratio: float = option(
        0.0, "Final LR as a fraction of the peak (cosine and linear only).", ge=0, le=1
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        if self.name == "constant" and "min_lr_ratio" in given:
            return [("min_lr_ratio", "has no effect when schedule.name is 'constant'")]
        return []


@dataclass(kw_only=True)
class EMAConfig:
    enabled: bool = option(
        False, "Keep an exponential moving average of the weights (sharded like the model)."
    )
    decay: float = option(0.999, "EMA decay per update.", ge=0, lt=1)
    start_step: int = option(
        0, "Copy the weights into the EMA at this step; average from then on.", ge=0
    )
    every: int = option(1, "Update the EMA every N optimizer steps.", ge=1)

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        if not self.enabled:
            return [
                (k, "has no effect when ema.enabled is false")
                for k in ("decay", "start_step", "every")
                if k in given
            ]
        return []


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str | None = option(
        None, "Checkpoint root, a path or fsspec URL (s3://...). Default: <output_dir>/checkpoints."
    )
    every: int = option(1000, "Save every N steps (and always at the end and on preemption).", ge=1)
    keep_last: int = option(
        3, "Keep this many most recent complete checkpoints; 0 keeps all.", ge=0
    )
    async_save: bool = option(
        False, "Write checkpoints in the background (dcp.async_save) while training continues."
    )
    resume: bool = option(True, "Resume from the checkpoint named by 'latest' when there is one.")


@dataclass(kw_only=True)
class ParallelConfig:
    backend: Literal["fsdp2", "deepspeed", "none"] = option(
        "fsdp2",
        "Sharding engine: FSDP2, DeepSpeed ZeRO, or 'none' (one rank, nothing sharded).",
    )
    mixed_precision: Literal["fp32", "bf16", "fp16"] = option(
        "fp32", "Compute dtype of parameters in forward/backward."
    )
    reduce_dtype: Literal["fp32", "bf16"] = option(
        "fp32", "Dtype of gradient reduction across ranks (FSDP2)."
    )
    reshard_after_forward: bool = option(
        True,
        "Free gathered parameters after forward (ZeRO-3 like); false keeps them (ZeRO-2 like). FSDP2.",
    )
    activation_checkpointing: bool = option(
        False, "Recompute each block's activations in backward."
    )
    compile: bool = option(False, "torch.compile each block after sharding and checkpointing.")
    context_parallel: int = option(
        1,
        "Ranks one sample's token sequence is split over (Ulysses all-to-all over heads); "
        "FSDP2 shards over all ranks, data is split over world / context_parallel. "
        "video_dit and audio_dit.",
        ge=1,
    )
    zero_stage: Literal[1, 2, 3] = option(
        3,
        "DeepSpeed ZeRO stage: 1 partitions optimizer states, 2 also gradients, 3 also parameters.",
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = option(
        "none",
        "DeepSpeed: keep optimizer states (and the optimizer step) in CPU memory or on NVMe.",
    )
    offload_params: Literal["none", "cpu", "nvme"] = option(
        "none", "DeepSpeed ZeRO-3: keep partitioned parameters in CPU memory or on NVMe."
    )
    nvme_path: str | None = option(
        None, "DeepSpeed: local NVMe directory for offload_optimizer / offload_params 'nvme'."
    )
    deepspeed: dict[str, Any] = option(
        factory=dict,
        doc="Extra DeepSpeed config keys passed through (validated; recipe-controlled keys rejected).",
    )

    # backend name -> check of its pass-through mapping, returning (key in it, message);
    # each backend registers its own (trainer.backends), so the schema imports none of them
    PASSTHROUGH_CHECKS: ClassVar[dict[str, Callable[[dict[str, Any]], list[tuple[str, str]]]]] = {}
    DEEPSPEED_ONLY: ClassVar[tuple[str, ...]] = (
        "zero_stage",
        "offload_optimizer",
        "offload_params",
        "nvme_path",
        "deepspeed",
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = []
        if self.backend == "none":
            for key in ("reduce_dtype", "reshard_after_forward"):
                if key in given:
                    out.append((key, "has no effect when parallel.backend is 'none'"))
        if self.backend != "deepspeed":
            for key in self.DEEPSPEED_ONLY:
                if key not in given:
                    continue
                if key.startswith("offload") and getattr(self, key) != "none":
                    message = (
                        f"offloading to {getattr(self, key)} needs parallel.backend 'deepspeed' "
                        f"(backend '{self.backend}' has no offload)"
                    )
                else:
                    message = (
                        f"has no effect when parallel.backend is '{self.backend}' (DeepSpeed only)"
                    )
                out.append((key, message))
        else:
            if "reshard_after_forward" in given:
                out.append(
                    (
                        "reshard_after_forward",
                        "has no effect with parallel.backend 'deepspeed'; parallel.zero_stage 3 "
                        "partitions parameters",
                    )
                )
            if "reduce_dtype" in given:
                out.append(
                    (
                        "reduce_dtype",
                        "has no effect with parallel.backend 'deepspeed'; set "
                        "parallel.deepspeed.communication_data_type instead",
                    )
                )
            if self.offload_params != "none" and self.zero_stage != 3:
                out.append(
                    (
                        "offload_params",
                        f"parameter offload needs parallel.zero_stage 3 (got {self.zero_stage}); "
                        "stages 1 and 2 keep every parameter on every rank",
                    )
                )
            uses_nvme = "nvme" in (self.offload_optimizer, self.offload_params)
            if uses_nvme and not self.nvme_path:
                out.append(
                    ("nvme_path", "required when offload_optimizer or offload_params is 'nvme'")
                )
            if not uses_nvme and "nvme_path" in given:
                out.append(
                    (
                        "nvme_path",
                        "has no effect unless offload_optimizer or offload_params is 'nvme'",
                    )
                )
            if self.deepspeed:
                check = self.PASSTHROUGH_CHECKS.get("deepspeed")
                if check is None:  # a caller validated without trainer.registry loaded
                    raise RuntimeError(
                        "parallel.deepspeed: no check registered; import trainer.backends"
                    )
                out += [
                    (f"deepspeed.{key}" if key else "deepspeed", message)
                    for key, message in check(self.deepspeed)
                ]
        if (
            self.mixed_precision == "fp32"
            and "reduce_dtype" in given
            and self.reduce_dtype != "fp32"
        ):
            out.append(
                (
                    "reduce_dtype",
                    "lower-precision reduction with fp32 compute has no effect; set mixed_precision too",
                )
            )
        return out


@dataclass(kw_only=True)
class ClusterConfig:
    launcher: Literal["auto", "local", "torchrun", "slurm", "ray"] = option(
        "auto",
        "How ranks are started; 'auto' detects torchrun / SLURM / Ray, else spawns local processes.",
    )
    num_workers: int = option(
        1, "Ranks: local processes to spawn when launched locally, or Ray Train workers.", ge=1
    )
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto", "Device per rank; 'auto' uses CUDA when available."
    )
    timeout_s: int = option(
        1800, "Collective timeout in seconds before a hung rank is reported.", ge=10
    )
    ray_address: str = option(
        "auto",
        "Ray cluster for launcher 'ray' outside a Ray job: 'auto' (RAY_ADDRESS or the local `ray start` head), 'local' (a private instance) or HOST:PORT.",
    )
    cpus_per_worker: float = option(1.0, "CPUs Ray reserves for each training worker.", gt=0)
    max_failures: int = option(
        0,
        "Ray Train restarts of all workers after one fails, each resuming from the latest checkpoint; -1 retries forever.",
        ge=-1,
    )

    RAY_ONLY: ClassVar[tuple[str, ...]] = ("ray_address", "cpus_per_worker", "max_failures")

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        # 'auto' may turn out to be a Ray job at run time, so only explicit launchers rule them out
        if self.launcher in ("local", "torchrun", "slurm"):
            why = f"has no effect unless cluster.launcher is 'ray' (or 'auto' in a Ray job), not '{self.launcher}'"
            return [(k, why) for k in self.RAY_ONLY if k in given]
        return []


@dataclass(kw_only=True)
class LoggingConfig:
    progress_bar: bool = option(
        True, "Show a progress bar on rank 0 (step, loss, throughput, ETA)."
    )
    tensorboard: bool = option(
        False, "Also write TensorBoard events under <output_dir>/tensorboard."
    )
    wandb: bool = option(False, "Also log to Weights & Biases.")
    wandb_project: str = option("genflow", "W&B project name.")
    wandb_mode: Literal["offline", "online"] = option(
        "offline", "W&B mode; offline needs no network."
    )
    peak_tflops: float | None = option(
        None, "Device peak TFLOP/s for MFU; null uses the built-in table (known GPUs only).", gt=0
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        if not self.wandb:
            return [
                (k, "has no effect when logging.wandb is false")
                for k in ("wandb_project", "wandb_mode")
                if k in given
            ]
        return []


@dataclass(kw_only=True)
class EvalConfig:
    every: int = option(
        0,
        "Run the objective's evaluation (samples, metrics, pictures) every N steps; 0 disables.",
        ge=0,
    )
    num_samples: int = option(1000, "Samples drawn per evaluation.", ge=1)
    sample_steps: int = option(32, "Sampler steps per evaluation sample.", ge=1)
    guidance: float = option(
        4.0, "Classifier-free guidance scale of evaluation samples (text-conditioned models).", ge=0
    )
    use_ema: bool = option(True, "Evaluate the EMA weights when an EMA is kept.")
    text_checks: list[Literal["arith"]] = option(
        factory=list,
        doc="Language models: checks of decoded samples ('arith': share of correct A + B = C lines).",
    )
    gen_ppl_run: str | None = option(
        None,
        "Language models: run directory of a trained AR model that scores samples (eval/gen_ppl).",
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        if self.every == 0:
            keys = ("num_samples", "sample_steps", "use_ema", "guidance", "text_checks")
            return [
                (k, "has no effect when eval.every is 0")
                for k in (*keys, "gen_ppl_run")
                if k in given
            ]
        return []


# Objectives that model token sequences (their evaluation reads eval.text_checks etc.)
TEXT_OBJECTIVES = ("mdlm", "sedd", "bd3lm", "ar")
CONTEXT_PARALLEL_MODELS = ("video_dit", "audio_dit")


@dataclass(kw_only=True)
class Config:
    run: RunConfig = option(doc="Run identity: output directory, seed, length.")
    model: ModelSection = option(doc="The network (architecture only).")
    objective: ObjectiveSection = option(
        doc="Loss, noise schedule, timestep sampling, evaluation sampler."
    )
    data: DataSection = option(doc="Where training samples come from.")
    train: TrainConfig = option(doc="Batching, clipping, guards, logging cadence.")
    optimizer: OptimizerConfig = option(factory=OptimizerConfig, doc="Optimizer of the model.")
    schedule: ScheduleConfig = option(factory=ScheduleConfig, doc="Learning-rate schedule.")
    ema: EMAConfig = option(factory=EMAConfig, doc="Weight EMA.")
    checkpoint: CheckpointConfig = option(
        factory=CheckpointConfig, doc="Checkpoint location, cadence, retention."
    )
    parallel: ParallelConfig = option(
        factory=ParallelConfig, doc="Sharding, precision, checkpointing, compile."
    )
    cluster: ClusterConfig = option(factory=ClusterConfig, doc="Launcher and devices.")
    logging: LoggingConfig = option(factory=LoggingConfig, doc="Progress bar and metric sinks.")
    eval: EvalConfig = option(factory=EvalConfig, doc="Periodic evaluation and sampling.")
    init: InitConfig = option(
        factory=InitConfig,
        doc="Starting weights: random, or an earlier run's (stages, fine-tuning).",
    )

    def check(self, given: set[str]) -> list[tuple[str, str]]:
        out = []
        if self.schedule.warmup_steps > self.run.max_steps:
            out.append(
                (
                    "schedule.warmup_steps",
                    f"{self.schedule.warmup_steps} exceeds run.max_steps ({self.run.max_steps})",
                )
            )
        if self.ema.enabled is False and "eval.use_ema" in given:
            out.append(("eval.use_ema", "has no effect when ema.enabled is false"))
        if self.parallel.backend == "none" and self.cluster.num_workers > 1:
            out.append(
                (
                    "cluster.num_workers",
                    "parallel.backend 'none' runs one rank; use fsdp2 for several",
                )
            )
        if self.parallel.backend == "deepspeed":
            out += self._deepspeed_checks()
        if self.parallel.context_parallel > 1:
            out += self._context_parallel_checks()
        conditioning = getattr(self.objective, "conditioning", None)
        model_context = getattr(self.model, "context_dim", None)
        if (
            conditioning is not None
            and model_context is not None
            and conditioning.context_dim != model_context
        ):
            out.append(
                (
                    "model.context_dim",
                    f"{model_context} differs from objective.conditioning.context_dim ({conditioning.context_dim})",
                )
            )
        if (
            self.objective.name == "autoencoding"
            and self.model.name == "dc_ae"
            and "objective.kl_weight" in given
        ):
            out.append(("objective.kl_weight", "has no effect: a DC-AE has no posterior (no KL)"))
        if self.objective.name == "autoencoding":
            out += self._autoencoder_checks(given)
        else:
            out += self._latent_audio_checks()
        if self.objective.name not in TEXT_OBJECTIVES:
            for key in ("text_checks", "gen_ppl_run"):
                if f"eval.{key}" in given:
                    out.append(
                        (f"eval.{key}", "has no effect unless the objective is a language model")
                    )
        elif "eval.guidance" in given:
            out.append(("eval.guidance", "has no effect for language-model objectives"))
        mb = self.train.micro_batch_size
        if mb is not None and self.train.batch_size % mb:
            out.append(
                (
                    "train.micro_batch_size",
                    f"{mb} does not divide train.batch_size ({self.train.batch_size})",
                )
            )
        return out

    def _latent_audio_checks(self) -> list[tuple[str, str]]:
        """A diffusion / flow model of audio or video: the audio / video DiT, on that
        kind, through an autoencoder that reads the data's channels and sizes its patches
        divide."""
        kind = getattr(self.data, "kind", None)
        if self.model.name == "video_dit":
            return self._latent_video_checks(kind)
        if self.model.name != "audio_dit":
            if kind in ("audio", "video"):
                return [
                    (
                        "model.name",
                        f"{self.model.name!r} cannot model {kind!r} data: use {kind}_dit",
                    )
                ]
            return []
        if kind != "audio":
            return [("data.kind", f"{kind!r}: an audio_dit trains on kind 'audio'")]
        ae = getattr(self.objective, "autoencoder", None)
        if ae is None:
            return [
                (
                    "objective.autoencoder",
                    "an audio_dit needs one: audio_vae (latents) or identity with channels "
                    "= data.audio_channels (raw samples)",
                )
            ]
        out = []
        if ae.name == "identity":
            if ae.channels != self.data.audio_channels:
                out.append(
                    (
                        "objective.autoencoder.channels",
                        f"{ae.channels} differs from data.audio_channels ({self.data.audio_channels})",
                    )
                )
            samples = round(self.data.window_seconds * self.data.sample_rate)
            if samples % self.model.patch_size:
                out.append(
                    (
                        "data.window_seconds",
                        f"{self.data.window_seconds} s is {samples} samples, not divisible by "
                        f"model.patch_size {self.model.patch_size}",
                    )
                )
        elif ae.name != "audio_vae":
            out.append(("objective.autoencoder.name", f"{ae.name!r} is not an audio autoencoder"))
        return out

    def _latent_video_checks(self, kind: str | None) -> list[tuple[str, str]]:
        if kind == "images":  # 1-frame videos, in pixels or an image autoencoder's latents
            if self.model.patch_size[0] != 1:
                return [
                    (
                        "model.patch_size",
                        f"{list(self.model.patch_size)}: images are 1-frame videos, so the "
                        "tubelets must be 1 frame long",
                    )
                ]
            return []
        if kind != "video":
            return [("data.kind", f"{kind!r}: a video_dit trains on kind 'video' or 'images'")]
        ae = getattr(self.objective, "autoencoder", None)
        if ae is None:
            return [
                (
                    "objective.autoencoder",
                    "a video_dit needs one: video_vae (latents) or identity (pixels)",
                )
            ]
        if ae.name != "identity":
            if ae.name != "video_vae":
                return [("objective.autoencoder.name", f"{ae.name!r} is not a video autoencoder")]
            return []
        pt, ph, pw = self.model.patch_size
        out = []
        if self.data.num_frames % pt:
            out.append(
                (
                    "data.num_frames",
                    f"{self.data.num_frames} is not divisible by the temporal patch size {pt}",
                )
            )
        for i, (w, h) in enumerate(self.data.resolutions):
            if h % ph or w % pw:
                out.append(
                    (
                        f"data.resolutions[{i}]",
                        f"[{w}, {h}] is not divisible by the patch size {ph}x{pw}",
                    )
                )
        return out

    def _context_parallel_checks(self) -> list[tuple[str, str]]:
        """Sequence splitting: a family that supports it, FSDP2, and heads and (where the
        recipe fixes them: pixels or raw samples) tokens per sample divisible by it."""
        cp = self.parallel.context_parallel
        key = "parallel.context_parallel"
        if self.model.name not in CONTEXT_PARALLEL_MODELS:
            supported = ", ".join(CONTEXT_PARALLEL_MODELS)
            return [
                (key, f"{cp}: {self.model.name!r} does not split its sequence ({supported} do)")
            ]
        if self.parallel.backend != "fsdp2":
            return [(key, f"{cp} needs parallel.backend fsdp2 (got {self.parallel.backend!r})")]
        heads = self.model.dims()["num_heads"]
        if heads % cp:
            return [(key, f"{cp} does not divide the model's {heads} heads")]
        ae = getattr(self.objective, "autoencoder", None)
        if ae is None or ae.name != "identity":
            return []  # latent tokens: the model checks them on its first batch
        if self.model.name == "audio_dit":
            samples = round(self.data.window_seconds * self.data.sample_rate)
            counts = {"data.window_seconds": samples // self.model.patch_size}
        else:
            pt, ph, pw = self.model.patch_size
            counts = {
                f"data.resolutions[{i}]": (self.data.num_frames // pt) * (h // ph) * (w // pw)
                for i, (w, h) in enumerate(self.data.resolutions)
            }
        return [
            (where, f"{tokens} tokens per sample are not divisible by {key} {cp}")
            for where, tokens in counts.items()
            if tokens % cp
        ]

    def _autoencoder_checks(self, given: set[str]) -> list[tuple[str, str]]:
        """The autoencoder's signal (images or audio) against the data section."""
        out = []
        audio_model = self.model.name == "audio_vae"
        kind = getattr(self.data, "kind", None)
        if self.model.name == "video_vae":
            if kind != "video":
                out.append(("data.kind", f"{kind!r}: a video_vae trains on kind 'video'"))
            else:
                dims = self.model.dims()
                factor, temporal = 2 ** (len(dims["channels"]) - 1), 2 ** sum(dims["temporal_down"])
                if (self.data.num_frames - 1) % temporal:
                    out.append(
                        (
                            "data.num_frames",
                            f"{self.data.num_frames}: the video_vae needs 1 + {temporal} * k frames",
                        )
                    )
                for i, (w, h) in enumerate(self.data.resolutions):
                    if w % factor or h % factor:
                        out.append(
                            (
                                f"data.resolutions[{i}]",
                                f"[{w}, {h}] is not divisible by the downsampling factor {factor}",
                            )
                        )
        elif kind == "video":
            out.append(
                ("data.kind", f"'video' needs model.name video_vae (not {self.model.name!r})")
            )
        if audio_model:
            if kind != "audio":
                out.append(("data.kind", f"{kind!r}: an audio_vae trains on kind 'audio'"))
            else:
                if self.model.in_channels != self.data.audio_channels:
                    out.append(
                        (
                            "model.in_channels",
                            f"{self.model.in_channels} differs from data.audio_channels ({self.data.audio_channels})",
                        )
                    )
                factor = math.prod(self.model.dims()["strides"])
                samples = round(self.data.window_seconds * self.data.sample_rate)
                if samples % factor:
                    out.append(
                        (
                            "data.window_seconds",
                            f"{self.data.window_seconds} s is {samples} samples, not divisible by the downsampling factor {factor}",
                        )
                    )
            if self.objective.gan_weight > 0:
                out.append(("objective.gan_weight", "the PatchGAN is 2-D: set 0 for an audio_vae"))
        else:
            if kind == "audio":
                out.append(
                    ("data.kind", f"'audio' needs model.name audio_vae (not {self.model.name!r})")
                )
            if "objective.stft_weight" in given:
                out.append(
                    ("objective.stft_weight", "has no effect for an image or video autoencoder")
                )
        return out

    def _deepspeed_checks(self) -> list[tuple[str, str]]:
        """What DeepSpeed cannot do here, caught before any rank starts."""
        out = []
        if self.checkpoint.async_save:
            out.append(
                (
                    "checkpoint.async_save",
                    "not supported with parallel.backend 'deepspeed' (DeepSpeed saves synchronously)",
                )
            )
        ckpt_dir = self.checkpoint.dir or ""
        if "://" in ckpt_dir and not ckpt_dir.startswith("file://"):
            out.append(
                (
                    "checkpoint.dir",
                    f"{ckpt_dir!r}: DeepSpeed checkpoints need a local or shared-filesystem path, "
                    "not an object store URL",
                )
            )
        if (
            self.parallel.offload_params == "nvme"
            and self.ema.enabled
            and self.eval.every
            and self.eval.use_ema
        ):
            out.append(
                (
                    "eval.use_ema",
                    "evaluating the EMA needs the parameters in memory; not supported with "
                    "parallel.offload_params 'nvme' (set eval.use_ema false)",
                )
            )
        return out


RESOLVED_HEADER = (
    "# Resolved config written by the trainer (every field, defaults included).\n"
    "# `python -m trainer.launch <this file>` reruns the run and resumes from its checkpoints.\n"
)


def is_resolved_config(path: str | Path) -> bool:
    """Whether ``path`` is a config.yaml the trainer wrote (see ``dump_config``)."""
    try:
        with open(path) as f:
            return f.read(len(RESOLVED_HEADER)) == RESOLVED_HEADER
    except OSError:
        return False


UNION_SECTIONS = ("model", "objective", "data")
NESTED_UNIONS = {"objective": ("autoencoder",)}


def merge_layer(base: dict, layer: dict) -> dict:
    """Deep-merge a recipe layer, except that naming another family in a tagged-union
    section (``objective.name=...``) replaces that section instead of mixing two families' keys."""
    base = dict(base)
    for section in UNION_SECTIONS:
        old, new = base.get(section), layer.get(section)
        if (
            isinstance(old, dict)
            and isinstance(new, dict)
            and "name" in new
            and new["name"] != old.get("name")
        ):
            base.pop(section)
        elif isinstance(old, dict) and isinstance(new, dict):
            # unions inside a kept section (the objective's autoencoder) follow the same rule
            for inner in NESTED_UNIONS.get(section, ()):
                old_in, new_in = old.get(inner), new.get(inner)
                if (
                    isinstance(old_in, dict)
                    and isinstance(new_in, dict)
                    and new_in.get("name", old_in.get("name")) != old_in.get("name")
                ):
                    base[section] = {k: v for k, v in base[section].items() if k != inner}
    return _merge(base, layer)


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML text, headed so ``load_config`` knows it for one."""
    return RESOLVED_HEADER + yaml.safe_dump(to_dict(cfg), sort_keys=False)


def check_world_size(cfg: Config, world_size: int) -> tuple[int, int]:
    """Micro batch per rank and accumulation steps for this world size; ConfigError if
    impossible. The batch is split over the data-parallel ranks: world_size /
    parallel.context_parallel (the ranks of a context-parallel group share samples)."""
    cp = cfg.parallel.context_parallel
    if world_size % cp:
        raise ConfigError(
            [f"parallel.context_parallel: {cp} does not divide the {world_size} ranks"]
        )
    world_size //= cp
    ranks = "ranks" if cp == 1 else "data-parallel ranks"
    batch = cfg.train.batch_size
    if batch % world_size:
        raise ConfigError(
            [f"train.batch_size: {batch} is not divisible by the {world_size} {ranks}"]
        )
    per_rank = batch // world_size
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(
            [
                f"train.micro_batch_size: {micro} does not divide the per-rank batch {per_rank} ({batch} over {world_size} ranks)"
            ]
        )
    return micro, per_rank // micro


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)
