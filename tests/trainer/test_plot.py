"""trainer.plot: one panel per metric, the losses of every phase by default."""

from __future__ import annotations

import json

from PIL import Image

from trainer.plot import main, phase_loss_keys


def _metrics(run, records):
    run.mkdir()
    lines = [json.dumps(r) for r in records] + ["{torn line"]  # a crash mid-write
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run / "metrics.jsonl"


def test_default_panels_are_every_loss_and_keys_are_checked(tmp_path, capsys):
    records = [
        {"step": s, "loss": 1 / s, "g_loss": 0.0 if s < 3 else 0.5, "lr": 1e-3}
        | ({"discriminator/loss": 2.0 - s / 10} if s >= 2 else {})
        for s in range(1, 11)
    ]
    run = tmp_path / "run"
    metrics = _metrics(run, records)
    assert phase_loss_keys(metrics) == ["loss", "g_loss", "discriminator/loss"]
    assert main([str(run)]) == 0
    with Image.open(run / "loss.png") as img:
        assert img.size == (800, 3 * 450)
        # each panel drew its smoothed curve (the EMA blue), not only axes and labels
        for i in range(3):
            panel = img.crop((0, i * 450, 800, (i + 1) * 450)).convert("RGB")
            assert (31, 90, 200) in {c for _, c in panel.getcolors(800 * 450)}
    assert main([str(run), "--key", "lr", "--out", str(tmp_path / "lr.png")]) == 0
    with Image.open(tmp_path / "lr.png") as img:
        assert img.size == (800, 450)
    assert main([str(run), "--key", "loss", "--key", "eval/psnr"]) == 2
    assert "fewer than 2 records of 'eval/psnr'" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing")]) == 2
