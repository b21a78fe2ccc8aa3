"""``python -m trainer.sample --run RUN_DIR [--step N] --prompts "..." [--prompts-file F]
--num-per-prompt K --steps S --cfg W --seed X --out OUT_DIR``

Load a run's (EMA) weights from its checkpoint in one process and sample with the run's
objective (sampler, shift, autoencoder, text conditioner, classifier-free guidance).
Writes ``OUT_DIR/samples.npz`` (``images``: uint8 N x H x W x C; ``prompts``: one string
per image) and ``OUT_DIR/grid.png`` (one row per prompt). Unconditional models take
``--num K`` instead of prompts.

Audio models (``data.kind: audio``) take ``--seconds S`` (the clips' length, at most the
training window) and write ``OUT_DIR/NNN.wav`` (S seconds each), ``OUT_DIR/NNN.png`` (its
spectrogram), ``OUT_DIR/spectrograms.png`` (all, a row each) and ``OUT_DIR/samples.npz``
(``audio``: the whole generated windows, ``prompts``, ``seconds``). Video models
(``data.kind: video``) write ``OUT_DIR/NNN.mp4`` (``--fps``), ``OUT_DIR/frames.png`` (each
clip's frames in a row) and ``OUT_DIR/samples.npz`` (``videos``: uint8 N x T x H x W x 3).

Language models (MDLM, SEDD, BD3-LM, AR): ``--run RUN_DIR --num K --out OUT_DIR [--steps S
--seed X --length L --sampler NAME --top-p P]`` writes ``OUT_DIR/samples.jsonl``, one
``{"text": ...}`` object per sample.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import numpy as np
import torch
import yaml


class SampleError(RuntimeError):
    """A user mistake: no run there, no checkpoint, prompts missing."""


def _image_shape(cfg, height: int | None, width: int | None) -> tuple[int, ...]:
    data = cfg.data
    args_h, args_w = height, width
    kind = getattr(data, "kind", None)
    if kind == "audio":  # the training window (checked by the caller)
        from models.autoencoders import build_autoencoder

        signal = (data.audio_channels, round(data.window_seconds * data.sample_rate))
        return build_autoencoder(cfg.objective.autoencoder).latent_shape(*signal)
    if kind == "video":  # the training clip length, at --height x --width or the first bucket
        from models.autoencoders import build_autoencoder

        width, height = data.resolutions[0]
        signal = (
            3,
            data.num_frames,
            height if args_h is None else args_h,
            width if args_w is None else args_w,
        )
        return build_autoencoder(cfg.objective.autoencoder).latent_shape(*signal)
    if height is None or width is None:
        resolutions = getattr(data, "resolutions", None)
        if not resolutions:
            raise SampleError(
                "pass --height and --width (the run's data section has no resolutions)"
            )
        width, height = (width or resolutions[0][0]), (height or resolutions[0][1])
    channels = getattr(cfg.model, "in_channels", 3)
    autoencoder = getattr(cfg.objective, "autoencoder", None)
    if autoencoder is not None:
        from models.autoencoders import build_autoencoder

        return build_autoencoder(autoencoder).latent_shape(3, height, width)
    return (channels, height, width)


def load_run(run_dir: Path, step: int | None, weights: str | None, device: torch.device):
    """The run's config, model with checkpoint weights, objective, and the step loaded."""
    from trainer.export import ExportError, consolidated_state_dict
    from trainer.registry import MODELS, OBJECTIVES, config_from_dict

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise SampleError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = config_from_dict(yaml.safe_load(config_path.read_text()), source=str(config_path))
    root = cfg.checkpoint.dir or str(run_dir / "checkpoints")
    try:
        if weights is None:
            try:
                state, loaded = consolidated_state_dict(root, step, "ema")
            except ExportError:
                state, loaded = consolidated_state_dict(root, step, "model")
        else:
            state, loaded = consolidated_state_dict(root, step, weights)
    except ExportError as err:
        raise SampleError(str(err)) from None
    model = MODELS[cfg.model.name].build(cfg.model)
    model.load_state_dict(state)
    model.to(device).eval()
    objective = OBJECTIVES[cfg.objective.name].build(
        cfg.objective, seed=cfg.run.seed, rank=0, device=device
    )
    return cfg, model, objective, loaded


def to_uint8_images(samples_NCHW: np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8 N x H x W x C."""
    return (
        ((np.clip(samples_NCHW, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.sample", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--run", type=Path, required=True, help="run directory (holds config.yaml)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--weights", choices=["ema", "model"], default=None, help="default: EMA when saved"
    )
    parser.add_argument(
        "--prompts", nargs="*", default=[], help="prompts (text-conditioned models)"
    )
    parser.add_argument("--prompts-file", type=Path, default=None, help="one prompt per line")
    parser.add_argument("--num-per-prompt", type=int, default=1)
    parser.add_argument("--num", type=int, default=None, help="samples of an unconditional model")
    parser.add_argument("--steps", type=int, default=28, help="sampler steps")
    parser.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument(
        "--sampler", default=None, help="override the run's sampler (euler, heun, ...)"
    )
    parser.add_argument(
        "--no-t5", action="store_true", help="leave the T5 condition out (SD3 allows it)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--length",
        type=int,
        default=None,
        help="tokens per sample (language models; default: data.seq_len)",
    )
    parser.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling (language models)"
    )
    parser.add_argument(
        "--seconds", type=float, default=None,
        help="audio: length of each clip (seconds_total; default: the training window)",
    )  # fmt: skip
    parser.add_argument("--fps", type=int, default=8, help="video: frames per second of the mp4")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except SampleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from data_pipeline.grid import save_grid

    prompts = list(args.prompts)
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise SampleError(f"--prompts-file {args.prompts_file} does not exist")
        prompts += [
            line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()
        ]
    if args.num_per_prompt < 1 or args.steps < 1:
        raise SampleError("--num-per-prompt and --steps must be >= 1")
    device = torch.device(args.device)
    cfg, model, objective, step = load_run(args.run, args.step, args.weights, device)
    if hasattr(objective, "nelbo"):
        if prompts:
            raise SampleError("language models sample unconditionally: use --num, not prompts")
        return sample_text(args, cfg, model, objective, step)
    conditional = getattr(objective, "conditioner", None) is not None
    if conditional and not prompts:
        raise SampleError("this model is text-conditioned: give --prompts or --prompts-file")
    if not conditional:
        if prompts:
            raise SampleError("this model is unconditional: use --num instead of prompts")
        if not args.num:
            raise SampleError("give --num for an unconditional model")
    expanded = [p for p in prompts for _ in range(args.num_per_prompt)] if conditional else None
    count = len(expanded) if conditional else args.num
    audio = getattr(cfg.data, "kind", None) == "audio"
    extra = {}
    if audio:
        window = cfg.data.window_seconds
        seconds = window if args.seconds is None else args.seconds
        if not 0 < seconds <= window:
            raise SampleError(
                f"--seconds {seconds} must be in (0, {window}]: the model generates windows of "
                f"data.window_seconds ({window} s) and ends each clip where it is asked to"
            )
        extra = {
            "seconds_start": torch.zeros(count),
            "seconds_total": torch.full((count,), seconds),
        }
    elif args.seconds is not None:
        raise SampleError("--seconds is for audio models")
    shape = _image_shape(cfg, args.height, args.width)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((count, *shape), generator=gen).to(device)
    from tqdm import tqdm

    batch = 64
    outs = []
    for start in tqdm(range(0, count, batch), desc="sample", unit="batch", file=sys.stderr):
        part = slice(start, start + batch)
        outs.append(
            objective.generate(
                {"model": model},
                noise[part],
                steps=args.steps,
                prompts=expanded[part] if conditional else None,
                guidance=args.cfg,
                sampler=args.sampler,
                drop_t5=args.no_t5,
                extra={k: v[part] for k, v in extra.items()},
            )
            .float()
            .cpu()
        )
    samples = torch.cat(outs).numpy()
    if audio:
        return write_audio(args, cfg, samples, expanded or [""] * count, extra, step)
    if samples.ndim == 5:
        return write_videos(args, samples, expanded or [""] * count, step)
    images = to_uint8_images(samples)
    args.out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    labels = np.array(expanded if conditional else [""] * count)
    np.savez(buf, images=images, prompts=labels)
    tmp = args.out / "samples.npz.tmp"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, args.out / "samples.npz")
    save_grid(
        samples,
        args.out / "grid.png",
        columns=args.num_per_prompt if conditional else None,
        row_labels=prompts if conditional else None,
    )
    print(f"wrote {count} samples of step {step} to {args.out}/samples.npz and grid.png")
    return 0


def write_audio(args, cfg, samples_NCT: np.ndarray, prompts: list[str], extra, step) -> int:
    """``OUT/samples.npz`` (``audio``: the generated windows, float32 N x C x T; ``prompts``;
    ``seconds``), ``OUT/NNN.wav`` cut to the requested length, ``OUT/NNN.png`` its
    spectrogram, and ``OUT/spectrograms.png`` all of them, a row each."""
    from data_pipeline.audio import save_clip, write_audio_samples

    rate = cfg.data.sample_rate
    seconds = extra["seconds_total"].numpy()
    args.out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, audio=samples_NCT.astype(np.float32), prompts=np.array(prompts), seconds=seconds)
    tmp = args.out / "samples.npz.tmp"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, args.out / "samples.npz")
    labels = prompts if any(prompts) else None
    write_audio_samples(samples_NCT, rate, args.out, "spectrograms", labels, seconds, per_clip=True)
    for i, clip in enumerate(samples_NCT):  # the wav files hold the requested length only
        cut = torch.from_numpy(np.ascontiguousarray(clip[:, : round(float(seconds[i]) * rate)]))
        save_clip(cut, rate, args.out / f"{i:03d}.wav")
    print(
        f"wrote {len(samples_NCT)} clips of {float(seconds[0]):.2f} s of step {step} to "
        f"{args.out} (NNN.wav, NNN.png, spectrograms.png, samples.npz)"
    )
    return 0


def write_videos(args, samples_NCTHW: np.ndarray, prompts: list[str], step: int) -> int:
    """``OUT/samples.npz`` (``videos``: uint8 N x T x H x W x 3; ``prompts``), ``OUT/NNN.mp4``
    at ``--fps`` and ``OUT/frames.png`` (each clip's frames in a row, labelled)."""
    from data_pipeline.video import to_uint8_frames, write_video_samples

    args.out.mkdir(parents=True, exist_ok=True)
    videos = np.stack([to_uint8_frames(v) for v in samples_NCTHW])
    buf = io.BytesIO()
    np.savez(buf, videos=videos, prompts=np.array(prompts))
    tmp = args.out / "samples.npz.tmp"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, args.out / "samples.npz")
    labels = prompts if any(prompts) else None
    write_video_samples(samples_NCTHW, args.out, "frames", args.fps, labels, per_clip="{i:03d}.mp4")
    print(
        f"wrote {len(videos)} clips of {videos.shape[1]} frames of step {step} to {args.out} "
        "(NNN.mp4, frames.png, samples.npz)"
    )
    return 0


def sample_text(args: argparse.Namespace, cfg, model, objective, step: int) -> int:
    """Language models: ``--num`` sequences -> ``OUT/samples.jsonl``, one {"text": ...} each."""
    from data_pipeline.text_tokens import decode_text
    from trainer.objectives.text_eval import write_jsonl

    if not args.num or args.num < 1:
        raise SampleError("give --num K (>= 1) samples")
    length = args.length or getattr(cfg.data, "seq_len", None) or model.max_seq_len
    if length > model.max_seq_len:
        raise SampleError(
            f"--length {length} exceeds the model's max_seq_len ({model.max_seq_len})"
        )
    options = {}
    if args.sampler is not None:
        options["sampler"] = args.sampler
    if args.top_p is not None:
        options["top_p"] = args.top_p
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    from tqdm import tqdm

    texts: list[str] = []
    batch = 32
    with torch.no_grad():
        for start in tqdm(range(0, args.num, batch), desc="sample", unit="batch", file=sys.stderr):
            count = min(batch, args.num - start)
            try:
                tokens = objective.generate(
                    model, count, length, steps=args.steps, generator=gen, **options
                )
            except (TypeError, ValueError) as err:
                raise SampleError(f"cannot sample with these options: {err}") from None
            texts += [decode_text(objective.tokenizer, row.tolist()) for row in tokens.cpu()]
    write_jsonl(args.out / "samples.jsonl", texts)
    print(f"wrote {len(texts)} samples of step {step} to {args.out}/samples.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
