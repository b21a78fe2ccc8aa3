"""Pictures of samples: a grid of images (or frames, or spectrograms) in one PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def save_grid(
    images_NCHW: np.ndarray,
    path: Path,
    columns: int | None = None,
    row_labels: list[str] | None = None,
    min_cell: int = 32,
) -> None:
    """Images in [-1, 1] -> one PNG grid (written atomically). Images smaller than
    ``min_cell`` px are enlarged by a whole factor (nearest neighbour, so pixels stay
    pixels); ``row_labels`` (e.g. each row's prompt) are written left of their rows."""
    from PIL import Image, ImageDraw

    n, c, h, w = images_NCHW.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    pixels = (
        ((np.clip(images_NCHW, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    )
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    grid = np.full((rows * (h + 2), columns * (w + 2), c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, col * (w + 2) + 1 : col * (w + 2) + 1 + w] = (
            pixels[i]
        )
    image = Image.fromarray(grid[..., 0] if c == 1 else grid).convert("RGB")
    if row_labels:
        draw = ImageDraw.Draw(image)
        margin = 8 + max(int(draw.textlength(label)) for label in row_labels)
        labelled = Image.new("RGB", (image.width + margin, image.height), "white")
        labelled.paste(image, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        for r, label in enumerate(row_labels[:rows]):
            draw.text((4, r * (h + 2) + (h + 2) // 2 - 5), label, fill="black")
        image = labelled
    tmp = path.with_name(path.name + ".tmp.png")
    image.save(tmp)
    tmp.replace(path)
