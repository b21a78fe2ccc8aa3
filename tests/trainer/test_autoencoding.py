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
)


@pytest.fixture
def feature_net(tmp_path) -> str:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
    path = tmp_path / "features.pt"
    torch.jit.script(net).save(str(path))
    return str(path)


def test_feature_loss_is_zero_only_for_equal_images(feature_net):
    loss = FeatureLoss(feature_net)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert float(loss(x, x)) == 0.0
    assert float(loss(x, x + 0.3 * torch.randn_like(x))) > 0.0
    assert not any(p.requires_grad for p in loss.parameters())  # frozen


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
