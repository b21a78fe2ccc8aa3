"""Audio samples: the built-in synthetic tones, what a folder's clips hold, and the
loader's decode / resample / crop-or-pad step.

Shards hold ``flac`` (or ``wav``) members and a ``json`` with ``{"sample_rate",
"duration"}``. The loader returns, per sample, ``x`` (C, T) float in [-1, 1] over a
window of ``window_seconds`` (a random crop of a longer clip, seeded by (seed, epoch,
sample); a shorter clip is zero-padded), ``mask`` (T,) 1 over the clip's own samples, 0
over the padding, ``seconds_start`` (where the window starts in the clip) and
``seconds_total`` (the clip's duration), the timing conditioning of Stable Audio.

Shapes: C channels (1 mono, 2 stereo), T samples of the window.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

AUDIO_EXTS = {".flac": "flac", ".wav": "wav"}
# the built-in corpus: 8 notes of the C major scale (equal temperament, A4 = 440 Hz)
NOTES = {"C4": 261.63, "D4": 293.66, "E4": 329.63, "F4": 349.23, "G4": 392.0, "A4": 440.0,
         "B4": 493.88, "C5": 523.25}  # fmt: skip
TIMBRES = ("pure", "bright")  # a sine, or a sine with its 2nd and 3rd harmonics
DURATIONS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)  # seconds


class AudioError(ValueError):
    """A clip that cannot be used as the recipe asks (rate, length)."""


def tone(freq: float, seconds: float, rate: int, timbre: str, amplitude: float) -> np.ndarray:
    """A tone with 10 ms linear fade in and out (no clicks), float32 (T,)."""
    t = np.arange(round(seconds * rate)) / rate
    wave = np.sin(2 * np.pi * freq * t)
    if timbre == "bright":
        wave = wave + 0.5 * np.sin(4 * np.pi * freq * t) + 0.25 * np.sin(6 * np.pi * freq * t)
        wave = wave / 1.75
    fade = min(len(t) // 2, round(0.01 * rate))
    envelope = np.ones_like(t)
    if fade:
        envelope[:fade] = np.linspace(0, 1, fade)
        envelope[-fade:] = np.linspace(1, 0, fade)
    return (amplitude * wave * envelope).astype(np.float32)


def tone_caption(note: str, timbre: str) -> str:
    return f"a {timbre} tone at {note}"


def encode_flac(samples_TC: np.ndarray, rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples_TC, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def tones_samples(num: int, rate: int, seed: int) -> Iterator[tuple[str, dict, dict]]:
    """``num`` clips cycling over notes x timbres; duration and loudness drawn from ``seed``."""
    rng = np.random.default_rng([seed, 4410])
    notes = list(NOTES)
    for i in range(num):
        note = notes[i % len(notes)]
        timbre = TIMBRES[(i // len(notes)) % len(TIMBRES)]
        seconds = float(rng.choice(DURATIONS))
        amplitude = float(rng.uniform(0.3, 0.6))
        wave = tone(NOTES[note], seconds, rate, timbre, amplitude)
        meta = {"sample_rate": rate, "duration": seconds, "note": note, "freq": NOTES[note],
                "timbre": timbre, "source": "builtin-tones", "index": i}  # fmt: skip
        fields = {
            "flac": encode_flac(wave[:, None], rate),
            "txt": tone_caption(note, timbre).encode(),
            "json": json.dumps(meta).encode(),
        }
        yield f"{i:06d}", fields, meta


def describe_audio(data: bytes) -> dict:
    """(sample_rate, duration, channels) of an encoded clip; ValueError if undecodable."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise ValueError(err) from None
    return {"sample_rate": info.samplerate, "duration": info.duration, "channels": info.channels}


def decode_audio(data: bytes, *, rate: int, channels: int, resample: bool) -> np.ndarray:
    """Encoded audio -> float32 (T, channels) at ``rate`` (mono downmixed or duplicated)."""
    import soundfile as sf

    wave, clip_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if clip_rate != rate:
        if not resample:
            raise AudioError(
                f"sample rate {clip_rate} Hz is not data.sample_rate {rate} Hz (set "
                "data.resample: true, or rebuild the shards at that rate)"
            )
        from scipy.signal import resample_poly

        g = math.gcd(rate, clip_rate)
        wave = resample_poly(wave, rate // g, clip_rate // g, axis=0).astype(np.float32)
    if wave.shape[1] != channels:
        wave = wave.mean(1, keepdims=True) if channels == 1 else np.repeat(wave[:, :1], channels, 1)
    return np.clip(wave, -1.0, 1.0)


def window(
    wave_TC: np.ndarray, *, rate: int, seconds: float, min_seconds: float,
    rng: np.random.Generator | None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Crop (at random with ``rng``, else from the start) or zero-pad to ``seconds``."""
    length = round(seconds * rate)
    total = wave_TC.shape[0]
    if total < round(min_seconds * rate):
        raise AudioError(
            f"clip of {total / rate:.2f} s is shorter than data.min_seconds {min_seconds}"
        )
    start = 0
    if total > length and rng is not None:
        start = int(rng.integers(0, total - length + 1))
    piece = wave_TC[start : start + length]
    x = np.zeros((length, wave_TC.shape[1]), dtype=np.float32)
    x[: len(piece)] = piece
    mask = np.zeros(length, dtype=np.float32)
    mask[: len(piece)] = 1.0
    return {
        "x": torch.from_numpy(x.T.copy()),
        "mask": torch.from_numpy(mask),
        "seconds_start": torch.tensor(start / rate, dtype=torch.float32),
        "seconds_total": torch.tensor(total / rate, dtype=torch.float32),
    }


def save_clip(samples_CT: torch.Tensor, rate: int, path: Path) -> None:
    """A (C, T) clip in [-1, 1] as 16-bit wav, written atomically."""
    import soundfile as sf

    tmp = path.with_name(path.name + ".tmp.wav")
    sf.write(tmp, samples_CT.clamp(-1, 1).T.numpy(), rate, subtype="PCM_16")
    tmp.replace(path)


def log_spectrogram(
    samples_T: torch.Tensor, size: int = 256, floor_db: float = -80.0
) -> np.ndarray:
    """Magnitude in dB (top 0, clipped at ``floor_db``) scaled to [-1, 1], low frequencies
    at the bottom: (frequencies, frames)."""
    spec = torch.stft(
        samples_T.float(), size, size // 4, window=torch.hann_window(size), return_complex=True
    ).abs()
    db = 20 * torch.log10(spec.clamp_min(1e-7))
    db = (db - db.max()).clamp_min(floor_db)
    return (db.flip(0) / -floor_db * 2 + 1).numpy()


# --------------------------------------------------------------------- the tones' judge
def caption_note(caption: str) -> str | None:
    """The note a built-in tones caption names ("a bright tone at G4" -> "G4"), else None."""
    words = caption.split()
    return words[-1] if len(words) > 2 and words[-2] == "at" and words[-1] in NOTES else None


def nearest_note(hz: float) -> str:
    """The scale note closest to ``hz`` in pitch (log frequency)."""
    return min(NOTES, key=lambda n: abs(math.log2(max(hz, 1e-3) / NOTES[n])))


def dominant_hz(wave_T: np.ndarray, rate: int) -> float:
    """Frequency of the largest FFT magnitude (DC excluded) of a Hann-windowed clip."""
    if len(wave_T) < 2:
        return 0.0
    spectrum = np.abs(np.fft.rfft(wave_T * np.hanning(len(wave_T))))
    spectrum[0] = 0.0
    return float(np.fft.rfftfreq(len(wave_T), 1 / rate)[spectrum.argmax()])


def judge_tones(
    samples_NCT: np.ndarray,
    rate: int,
    captions: list[str],
    seconds_total: np.ndarray,
    *,
    margin: float = 0.05,
    tail_ratio: float = 0.1,
) -> dict[str, float]:
    """How well generated clips follow tones prompts and requested durations.

    * ``pitch_match``: share of clips whose dominant frequency over the requested
      duration is nearest the prompted note (clips whose caption names no note skipped);
    * ``duration_ok``: share of clips, among those requested shorter than the window by
      at least 0.1 s, whose mean energy from ``margin`` s after the requested end is below
      ``tail_ratio`` of the energy before it (the clip stops where asked) and not silent;
    * ``tail_energy``: the median of that energy ratio (1: no sign of an end).
    """
    mono = samples_NCT.mean(1)
    pitch, ends, ratios = [], [], []
    for wave, caption, seconds in zip(mono, captions, np.asarray(seconds_total), strict=True):
        end = min(len(wave), max(1, round(float(seconds) * rate)))
        body = wave[:end]
        note = caption_note(caption)
        if note is not None:
            pitch.append(nearest_note(dominant_hz(body, rate)) == note)
        tail = wave[min(len(wave), end + round(margin * rate)) :]
        if len(tail) >= round(0.1 * rate):
            body_energy = float(np.mean(body**2))
            ratio = float(np.mean(tail**2)) / max(body_energy, 1e-12)
            ratios.append(ratio)
            ends.append(ratio < tail_ratio and body_energy > 1e-4)
    out = {}
    if pitch:
        out["pitch_match"] = float(np.mean(pitch))
    if ends:
        out["duration_ok"] = float(np.mean(ends))
        out["tail_energy"] = float(np.median(ratios))
    return out


def write_audio_samples(
    samples_NCT: np.ndarray,
    rate: int,
    out_dir: Path,
    tag: str,
    prompts: list[str] | None = None,
    seconds: np.ndarray | None = None,
    *,
    per_clip: bool = False,
) -> None:
    """Generated clips -> ``{tag}.png``, their spectrograms a row each, labelled with
    prompt and requested length; and either ``{tag}_{i:03d}.wav`` per clip (evaluation)
    or, with ``per_clip``, ``{i:03d}.png`` per clip (the caller writes its wav files)."""
    from data_pipeline.grid import save_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    clips = torch.from_numpy(np.ascontiguousarray(samples_NCT, dtype=np.float32))
    if not per_clip:
        for i, clip in enumerate(clips):
            save_clip(clip, rate, out_dir / f"{tag}_{i:03d}.wav")
    size = 1 << max(5, min(10, round(math.log2(rate / 32))))  # ~30 ms frames
    images = np.stack([log_spectrogram(clip.mean(0), size)[None] for clip in clips])
    labels = [
        " ".join(
            part
            for part in (
                prompts[i] if prompts is not None else "",
                f"{float(seconds[i]):.2f} s" if seconds is not None else "",
            )
            if part
        )
        for i in range(len(clips))
    ]
    save_grid(
        images, out_dir / f"{tag}.png", columns=1,
        row_labels=labels if any(labels) else None, min_cell=128,
    )  # fmt: skip
    if per_clip:
        for i, image in enumerate(images):
            save_grid(image[None], out_dir / f"{i:03d}.png", columns=1,
                      row_labels=[labels[i]] if labels[i] else None, min_cell=128)  # fmt: skip
