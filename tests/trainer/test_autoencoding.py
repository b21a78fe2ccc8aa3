"""The autoencoding objective's pieces: perceptual loss from a local network, config checks,
adversarial losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from configlib import ConfigError, from_dict
from trainer.objectives.autoencoding import (
    Autoencoding,
    AutoencodingConfig,
    FeatureLoss,
    psnr,
    ssim,
)


@pytest.fixture(params=["pt2", "pt"])
def feature_net(tmp_path, request) -> str:
    """The same small network as a torch.export program (dynamic batch) or TorchScript."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
    path = tmp_path / f"features.{request.param}"
    if request.param == "pt2":
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.export.export(
            net, (torch.zeros(2, 3, 16, 16),), dynamic_shapes=({0: batch},)
        )
        torch.export.save(program, str(path))
    else:
        with pytest.warns(FutureWarning):  # torch deprecates TorchScript; still loaded
            torch.jit.script(net).save(str(path))
    return str(path)


def test_feature_loss_is_zero_only_for_equal_images(feature_net):
    loss = FeatureLoss(feature_net)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert float(loss(x, x)) == 0.0
    noisy = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert float(loss(x, noisy)) > 0.0
    assert not any(p.requires_grad for p in loss.parameters())  # frozen
    # the reconstruction gets a gradient through the frozen network, at any batch size
    loss(torch.cat([x, x]), torch.cat([noisy, noisy])).backward()
    assert noisy.grad is not None and float(noisy.grad.abs().sum()) > 0


def test_a_missing_perceptual_network_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="objective.perceptual: .*no such file"):
        FeatureLoss(str(tmp_path / "nowhere.pt"))


def test_perceptual_must_be_written_and_unused_keys_are_named():
    with pytest.raises(ConfigError, match="perceptual"):
        from_dict(AutoencodingConfig, {})
    with pytest.raises(ConfigError, match="gan_start_step: has no effect with gan_weight 0"):
        from_dict(AutoencodingConfig, {"perceptual": "none", "gan_start_step": 10})
    with pytest.raises(ConfigError, match="perceptual_weight: has no effect"):
        from_dict(AutoencodingConfig, {"perceptual": "none", "perceptual_weight": 2.0})


@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_adversarial_losses_reward_telling_real_from_fake(kind):
    cfg = from_dict(AutoencodingConfig, {"perceptual": "none", "gan_weight": 0.5, "gan_loss": kind})
    objective = Autoencoding(cfg, seed=0, rank=0, device=torch.device("cpu"))
    sure, unsure = torch.full((4, 1, 2, 2), 3.0), torch.zeros(4, 1, 2, 2)
    # a discriminator that separates real from fake has the lower loss
    assert objective._adversarial(sure, -sure) < objective._adversarial(unsure, unsure)
    # the generator's loss falls as the discriminator takes its images for real
    assert objective._adversarial(None, sure) < objective._adversarial(None, -sure)
    assert [p.name for p in objective.phases()] == ["autoencoder", "discriminator"]


def test_psnr_of_known_errors():
    x = torch.zeros(1, 3, 4, 4)
    assert psnr(x + 0.02, x) == pytest.approx(10 * torch.log10(torch.tensor(4 / 4e-4)).item())
    assert psnr(x, x) > 100


def _ssim_direct(x, y, window=11, sigma=1.5):
    """SSIM by the definition, window by window in float64 (the slow reference)."""
    import math

    taps = [math.exp(-((i - (window - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(window)]
    total = sum(taps)
    w = torch.tensor([[a * b / total**2 for b in taps] for a in taps], dtype=torch.float64)
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    values = []
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            for i in range(x.shape[2] - window + 1):
                for j in range(x.shape[3] - window + 1):
                    px = x[b, c, i : i + window, j : j + window].double()
                    py = y[b, c, i : i + window, j : j + window].double()
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx = (w * (px - mx) ** 2).sum()
                    vy = (w * (py - my) ** 2).sum()
                    cxy = (w * (px - mx) * (py - my)).sum()
                    num = (2 * mx * my + c1) * (2 * cxy + c2)
                    values.append(float(num / ((mx**2 + my**2 + c1) * (vx + vy + c2))))
    return sum(values) / len(values)


def test_ssim_matches_the_definition_and_orders_distortions():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 14, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert ssim(y, x) == pytest.approx(_ssim_direct(y, x), abs=1e-5)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    noisier = (x + 0.6 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    other = torch.rand(x.shape, generator=g) * 2 - 1  # unrelated images
    assert ssim(x, x) > ssim(y, x) > ssim(noisier, x) > ssim(other, x)
    assert abs(ssim(other, x)) < 0.1
    # images smaller than the window use an odd window of their side
    small = x[:, :, :8, :8]
    assert ssim(0.8 * small, small) == pytest.approx(
        _ssim_direct(0.8 * small, small, window=7), abs=1e-5
    )


def test_model_in_channels_must_match_the_autoencoders_latents():
    """Checked when the run is built, before data: one line naming the key and the fix."""
    from models.mmdit import MMDiTConfig
    from trainer.objectives.rectified_flow import RectifiedFlow, RectifiedFlowConfig

    vae = {"name": "kl_vae", "random_init": True, "size": "tiny", "latent_channels": 1}
    cfg = from_dict(RectifiedFlowConfig, {"name": "rectified_flow", "autoencoder": vae})
    obj = RectifiedFlow(cfg, seed=0, rank=0, device=torch.device("cpu"))
    assert obj.model_problems(from_dict(MMDiTConfig, {"in_channels": 1})) == []
    (problem,) = obj.model_problems(from_dict(MMDiTConfig, {"in_channels": 16}))
    assert problem == (
        "model.in_channels is 16 but the kl_vae autoencoder gives 1-channel latents: "
        "set model.in_channels: 1"
    )
    pixels = {"name": "rectified_flow", "autoencoder": {"name": "identity"}}
    identity = RectifiedFlow(
        from_dict(RectifiedFlowConfig, pixels), seed=0, rank=0, device=torch.device("cpu")
    )
    assert identity.model_problems(from_dict(MMDiTConfig, {"in_channels": 3})) == []
    assert (
        "gives 3-channel latents"
        in identity.model_problems(from_dict(MMDiTConfig, {"in_channels": 4}))[0]
    )
