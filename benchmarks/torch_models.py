"""PyTorch twins of ssl3d_jax's 3D U-Net models, for the CPU train-step comparison only.

Why: issue 6 asks for the ratio of our train step to PyTorch's for the same network on the same
machine. These modules rebuild `ssl3d_jax/models/unet.py` + `layers.py` (and the RPL head of
`ssl3d_jax/tasks/rpl.py` / `models/heads.py`) layer for layer, with the same widths and hence the
same parameter count (checked by tests/test_train_step_benchmark.py):

  ConvBlock      2 x [Conv3d 3x3x3 pad 1 no bias -> GroupNorm(eps 1e-6) -> ReLU]
  max_pool2      MaxPool3d(2, ceil_mode=True)  (ceil output size, as `layers.max_pool2`)
  UpConv2        ConvTranspose3d(k=2, s=2) with bias, cropped to the skip, concatenated
  classifier     Conv3d 1x1x1 with bias
  RPL head       global max-pool of ref and query, concat, [Linear -> ReLU -> LayerNorm] per
                 hidden width, Linear to P**3 - 1 classes

The losses are those of the JAX steps (soft Dice over the foreground classes, per example, plus
voxel cross-entropy for segmentation; cross-entropy for RPL); the optimizer is Adam. Only the
network math is compared: initialisation and parameter values are PyTorch's own (they do not
change the step's cost). torch is an optional dependency of `benchmarks/train_step.py` only;
importing this module without torch raises ImportError.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

# flax's GroupNorm / LayerNorm epsilon (torch's default is 1e-5).
FLAX_NORM_EPS = 1e-6


def group_count(channels: int, num_groups: int) -> int:
    """`ssl3d_jax.models.layers.group_count`: min(num_groups, channels), lowered to a divisor."""
    g = max(1, min(int(num_groups), int(channels)))
    while channels % g:
        g -= 1
    return g


class ConvBlock(nn.Module):
    """`layers.ConvBlock` without dropout: `[B, cin, D, H, W]` -> `[B, cout, D, H, W]`."""

    def __init__(self, cin: int, cout: int, num_groups: int):
        super().__init__()
        g = group_count(cout, num_groups)
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(g, cout, eps=FLAX_NORM_EPS)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(g, cout, eps=FLAX_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(x)))


class Encoder3D(nn.Module):
    """`unet.Encoder3D`: ConvBlock + ceil max-pool per width, then the bottom ConvBlock.

    `x [B, C, D, H, W]` -> `(features [B, bottom, d, h, w], skips shallow -> deep)`.
    """

    def __init__(
        self, in_channels: int, filters: Sequence[int], bottom_filters: int, num_groups: int
    ):
        super().__init__()
        self.down = nn.ModuleList()
        cin = in_channels
        for f in filters:
            self.down.append(ConvBlock(cin, f, num_groups))
            cin = f
        self.bottom = ConvBlock(cin, bottom_filters, num_groups)
        self.pool = nn.MaxPool3d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        return self.bottom(x), skips


class SegmentationModel(nn.Module):
    """`unet.SegmentationModel`: `x [B, C, D, H, W]` -> logits `[B, K, D, H, W]`."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        filters: Sequence[int],
        bottom_filters: int,
        num_groups: int,
    ):
        super().__init__()
        self.encoder = Encoder3D(in_channels, filters, bottom_filters, num_groups)
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        cin = bottom_filters
        for f in reversed(tuple(filters)):
            self.up.append(nn.ConvTranspose3d(cin, f, 2, stride=2))
            self.blocks.append(ConvBlock(2 * f, f, num_groups))
            cin = f
        self.classifier = nn.Conv3d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = self.encoder(x)
        for up, block, skip in zip(self.up, self.blocks, reversed(skips)):
            x = up(x)[..., : skip.shape[2], : skip.shape[3], : skip.shape[4]]
            x = block(torch.cat([x, skip], dim=1))
        return self.classifier(x)


class RPLModel(nn.Module):
    """`tasks.rpl.RPLModel`: pairs `[B, 2, C, d, h, w]` -> logits `[B, P**3 - 1]`."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        filters: Sequence[int],
        bottom_filters: int,
        num_groups: int,
        head_hidden: Sequence[int],
    ):
        super().__init__()
        self.encoder = Encoder3D(in_channels, filters, bottom_filters, num_groups)
        layers = []
        cin = 2 * bottom_filters
        for h in head_hidden:
            layers += [nn.Linear(cin, h), nn.ReLU(), nn.LayerNorm(h, eps=FLAX_NORM_EPS)]
            cin = h
        layers.append(nn.Linear(cin, num_classes))
        self.head = nn.Sequential(*layers)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        b = pairs.shape[0]
        features, _ = self.encoder(pairs.flatten(0, 1))
        features = features.amax(dim=(2, 3, 4)).reshape(b, -1)  # ref || query
        return self.head(features)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """`losses.soft_dice_loss` (foreground, per example) + `losses.cross_entropy`, weights 1."""
    probs = logits.softmax(dim=1)[:, 1:]
    onehot = F.one_hot(labels, num_classes).permute(0, 4, 1, 2, 3)[:, 1:].to(probs.dtype)
    inter = (probs * onehot).sum(dim=(2, 3, 4))
    denom = probs.sum(dim=(2, 3, 4)) + onehot.sum(dim=(2, 3, 4))
    dice = 1.0 - ((2.0 * inter + 1e-5) / (denom + 1e-5)).mean()
    return dice + F.cross_entropy(logits, labels)


def param_count(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
