"""A small residual CNN (He et al., "Deep Residual Learning", CVPR 2016) for 28x28 images.

A full-resolution stem, then three stages of basic blocks (widths ``w, 2w, 4w``), each
halving the resolution (28 -> 14 -> 7 -> 4), so the last stage's batch statistics come from
only 16 positions per sample, as in the deep layers of an ImageNet ResNet (the demo's 2x
pooled 14x14 images: 14 -> 7 -> 4 -> 2, 4 positions);
global average pooling and a linear classifier. Every normalization layer is built by
:func:`normkit.create_norm`, so the same network runs with BN, GN, LN, IN or SN, the
comparison of the SN paper (Luo et al., ICLR 2019) at a size that trains in seconds on a CPU.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from torch import Tensor, nn

__all__ = ["ResNetSmall", "norm_factory"]


def norm_factory(norm: str, gn_groups: int = 8, **norm_kwargs: Any) -> Callable[[int], nn.Module]:
    """``channels -> layer`` for the normalizer ``norm`` (any name :func:`normkit.create_norm`
    takes). Group norms get ``gcd(gn_groups, channels)`` groups, so any width works."""
    from normkit import GroupNorm, create_norm

    probe = create_norm(norm, 8, **norm_kwargs)  # fails early on an unknown name or bad kwargs
    grouped = isinstance(probe, GroupNorm) and probe.num_groups > 1  # GN, not LN (= 1 group)

    def make(channels: int) -> nn.Module:
        extra = {"num_groups": math.gcd(gn_groups, channels)} if grouped else {}
        return create_norm(norm, channels, **extra, **norm_kwargs)

    return make


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``relu(x + norm(conv(relu(norm(conv(x))))))``, with a 1x1 conv + norm shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, make_norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.norm1 = make_norm(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.norm2 = make_norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), make_norm(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNetSmall(nn.Module):
    """Residual CNN with 10 normalization layers (stem, two per block, three shortcuts).

    Args:
        norm: normalizer name for :func:`normkit.create_norm` (``'bn'``, ``'gn'``, ``'sn'``, ...).
        num_classes: output classes. Default: 10.
        in_channels: input channels. Default: 1.
        width: channels of the first stage; the others have ``2 * width`` and ``4 * width``.
            Default: 16.
        gn_groups: groups of GN layers, ``gcd(gn_groups, C)`` per layer (the GN paper finds 8
            to 32 groups alike). Default: 8.
        **norm_kwargs: passed to :func:`normkit.create_norm`.

    Shape:
        - Input: ``(N, in_channels, H, W)`` (any ``H, W >= 1``).
        - Output: ``(N, num_classes)`` logits.

    Examples::

        >>> import torch
        >>> from experiments.batch_size import ResNetSmall
        >>> ResNetSmall("sn")(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self, norm: str, num_classes: int = 10, in_channels: int = 1, width: int = 16, gn_groups: int = 8, **norm_kwargs: Any
    ) -> None:
        super().__init__()
        make_norm = norm_factory(norm, gn_groups, **norm_kwargs)
        self.stem = nn.Sequential(_conv3x3(in_channels, width), make_norm(width), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(
            BasicBlock(width, width, 2, make_norm),
            BasicBlock(width, 2 * width, 2, make_norm),
            BasicBlock(2 * width, 4 * width, 2, make_norm),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))
