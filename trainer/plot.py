"""``python -m trainer.plot RUN_DIR [--key KEY ...] [--out FILE]``: draw metrics of
``metrics.jsonl`` against the step as a PNG, one panel per metric (default: ``loss`` and
every other loss in the file, e.g. ``g_loss`` and ``discriminator/loss``, into
``RUN_DIR/loss.png``).

Pillow only, so it works on any install; each raw series is smoothed with an EMA drawn
over the faint raw curve, and the axes carry min/max labels.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def read_series(metrics_path: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def phase_loss_keys(metrics_path: Path) -> list[str]:
    """``loss`` first, then every other loss the file holds (``<phase>/loss`` of another
    phase, ``<term>_loss`` of a logged term such as the generator's ``g_loss``), in
    first-seen order."""
    keys = ["loss"]
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        keys += [k for k in record if k.endswith(("/loss", "_loss")) and k not in keys]
    return keys


def plot_panels(
    panels: list[tuple[str, list[int], list[float]]], out: Path, log_y: bool = True
) -> None:
    """One 800x450 panel per (title, steps, values), stacked top to bottom, one PNG."""
    from PIL import Image

    width, height = 800, 450
    img = Image.new("RGB", (width, height * len(panels)), "white")
    for i, (title, steps, values) in enumerate(panels):
        img.paste(_panel(steps, values, title, log_y, width, height), (0, i * height))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    img.save(tmp)
    tmp.replace(out)


def _panel(steps: list[int], values: list[float], title: str, log_y: bool, width: int, height: int):
    from PIL import Image, ImageDraw

    margin = 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    use_log = log_y and min(values) > 0
    ys = [math.log10(v) for v in values] if use_log else list(values)
    smooth, acc = [], ys[0]
    for y in ys:
        acc = 0.9 * acc + 0.1 * y
        smooth.append(acc)
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def point(step: float, y: float) -> tuple[float, float]:
        px = margin + (step - x0) / (x1 - x0) * (width - 2 * margin)
        py = height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin)
        return px, py

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.line([point(s, y) for s, y in zip(steps, ys)], fill=(180, 200, 235), width=1)
    draw.line([point(s, y) for s, y in zip(steps, smooth)], fill=(31, 90, 200), width=2)
    fmt = (lambda y: f"{10**y:.3g}") if use_log else (lambda y: f"{y:.3g}")
    draw.text((5, margin - 6), fmt(y1), fill="black")
    draw.text((5, height - margin - 6), fmt(y0), fill="black")
    draw.text((margin, height - margin + 8), str(x0), fill="black")
    draw.text((width - margin - 40, height - margin + 8), str(x1), fill="black")
    draw.text((margin, 20), f"{title}{' (log scale)' if use_log else ''} vs step", fill="black")
    return img


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.plot", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--key",
        action="append",
        default=None,
        help="metric to plot, repeatable: one panel each (default: loss and every phase's loss)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output PNG (default: RUN_DIR/<first key>.png)"
    )
    args = parser.parse_args(argv)
    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.exists():
        print(
            f"error: {metrics} does not exist (is {args.run_dir} a run directory?)", file=sys.stderr
        )
        return 2
    keys = args.key or phase_loss_keys(metrics)
    panels = []
    for key in keys:
        steps, values = read_series(metrics, key)
        if len(steps) < 2:
            print(f"error: fewer than 2 records of {key!r} in {metrics}", file=sys.stderr)
            return 2
        panels.append((key, steps, values))
    out = args.out or args.run_dir / f"{keys[0].replace('/', '_')}.png"
    plot_panels(panels, out)
    print(f"wrote {out} ({', '.join(keys)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
