"""PatchGAN discriminator (Isola et al. 2017, as in taming-transformers / LDM autoencoders):
strided 4x4 convs that give one real/fake logit per overlapping image patch.

GroupNorm replaces the original BatchNorm, so the result does not depend on how a batch
is split over ranks and there are no running statistics to shard or checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from models.common.init import ParamInit


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, groups: int = 8):
        super().__init__()
        mods: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1),
                nn.GroupNorm(min(groups, out), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        mods.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)

    def output_side(self, side: int) -> int:
        """Logits per side for an image side (0: too small for this many layers)."""
        for module in self.net:
            if isinstance(module, nn.Conv2d):
                k, st, pad = module.kernel_size[0], module.stride[0], module.padding[0]
                side = (side + 2 * pad - k) // st + 1
                if side < 1:
                    return 0
        return side

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> logits (B, 1, h, w), one per receptive-field patch."""
        if min(self.output_side(n) for n in images_BCHW.shape[-2:]) < 1:
            raise ValueError(
                f"images {tuple(images_BCHW.shape[-2:])} are too small for a discriminator "
                f"of {len([m for m in self.net if isinstance(m, nn.Conv2d)]) - 2} layers"
            )
        return self.net(images_BCHW)

    def init_weights(self, seed: int) -> None:
        """N(0, 0.02) convs as in pix2pix, zero biases, unit GroupNorm."""
        init = ParamInit(self, seed)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                init.normal_(module.weight, 0.02)
                init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                init.layer_norm_(module)

    def receptive_field(self) -> int:
        """Side in pixels of the patch each logit sees."""
        size = 1
        for module in reversed(self.net):
            if isinstance(module, nn.Conv2d):
                size = (size - 1) * module.stride[0] + module.kernel_size[0]
        return size
