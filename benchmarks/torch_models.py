"""PyTorch twins of ssl3d_jax's 3D U-Net models, for the CPU train-step comparison only.

Why: issue 6 asks for the ratio of our train step to PyTorch's for the same network on the same
machine. These modules rebuild `ssl3d_jax/models/unet.py` + `layers.py` and the pretext models of
`ssl3d_jax/tasks/{rpl,rotation,jigsaw,cpc,exemplar}.py` (heads: `models/heads.py`) layer for
layer, with the same widths and hence the same parameter count (checked by
tests/test_train_step_benchmark.py):

  ConvBlock      2 x [Conv3d 3x3x3 pad 1 no bias -> GroupNorm(eps 1e-6) -> ReLU]
  max_pool2      MaxPool3d(2, ceil_mode=True)  (ceil output size, as `layers.max_pool2`)
  UpConv2        ConvTranspose3d(k=2, s=2) with bias, cropped to the skip, concatenated
  classifier     Conv3d 1x1x1 with bias
  MLP head       [Linear -> ReLU -> LayerNorm] per hidden width, then Linear (`heads.MLPHead`)
  RPL            global max-pool of ref and query, concat, MLP head to P**3 - 1 classes
  rotation       whole volume, one more ceil max-pool of the bottom, flatten, MLP head to 10
  jigsaw         global max-pool of each of the N patches, concat in slot order, MLP head to K
  CPC            global max-pool per patch -> Linear(code_size) = latents; context latents
                 (static index table) -> GRU (Flax `GRUCell` gating, last state) -> one Linear
                 per prediction term; InfoNCE against all B * N latents of the batch
  exemplar       anchors || positives in one batch, global max-pool -> Linear(code_size) -> L2
                 normalisation; triplet loss with negatives gathered from the positives

The losses are those of the JAX steps (soft Dice over the foreground classes, per example, plus
voxel cross-entropy for segmentation; cross-entropy for RPL, rotation and jigsaw; InfoNCE for CPC;
the hinge triplet loss for exemplar); the optimizer is Adam. The JAX pretext steps build their
inputs inside the step (patches, rotations, puzzles, CPC augmentation, exemplar augmentation and
negatives); the twins get ready-made tensors of the same shapes instead (channels first). Only
the network math is compared: initialisation and parameter values are PyTorch's own (they do not
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


def mlp_head(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """`heads.MLPHead` without dropout: [Linear -> ReLU -> LayerNorm] per hidden width, Linear."""
    layers = []
    cin = int(in_features)
    for h in hidden:
        layers += [nn.Linear(cin, h), nn.ReLU(), nn.LayerNorm(h, eps=FLAX_NORM_EPS)]
        cin = h
    layers.append(nn.Linear(cin, out_features))
    return nn.Sequential(*layers)


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
        self.head = mlp_head(2 * bottom_filters, head_hidden, num_classes)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        b = pairs.shape[0]
        features, _ = self.encoder(pairs.flatten(0, 1))
        features = features.amax(dim=(2, 3, 4)).reshape(b, -1)  # ref || query
        return self.head(features)


def pooled_edge(size: int, levels: int) -> int:
    """`tasks.rotation._pooled_size`: `size` ceil-halved `levels + 1` times."""
    for _ in range(levels + 1):
        size = (size + 1) // 2
    return size


class RotationModel(nn.Module):
    """`tasks.rotation.RotationModel`: rotated volumes `[B, C, S, S, S]` -> logits `[B, 10]`.

    Encoder on the whole volume, the bottom max-pooled once more (2, ceil), flattened, MLP head
    on `pooled_edge(S, len(filters))**3 * bottom_filters` features. The JAX model flattens
    channels-last (`[B, d, h, w, F]`), this one channels-first (`[B, F, d, h, w]`): the first
    head layer sees its inputs in a fixed different order, which is a relabelling of its weight
    columns (same parameters, same FLOPs, same function up to that permutation). The JAX step
    also rotates the volumes inside the step (one gather per volume); the twin gets them rotated.
    """

    def __init__(
        self,
        in_channels: int,
        input_size: int,
        filters: Sequence[int],
        bottom_filters: int,
        num_groups: int,
        head_hidden: Sequence[int],
        num_classes: int = 10,
    ):
        super().__init__()
        self.input_size = int(input_size)
        self.encoder = Encoder3D(in_channels, filters, bottom_filters, num_groups)
        self.pool = nn.MaxPool3d(2, ceil_mode=True)
        edge = pooled_edge(self.input_size, len(tuple(filters)))
        self.head = mlp_head(edge**3 * bottom_filters, head_hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, _ = self.encoder(x)
        return self.head(self.pool(features).flatten(1))


class JigsawModel(nn.Module):
    """`tasks.jigsaw.JigsawModel`: puzzles `[B, N, C, d, h, w]` -> logits `[B, K]`.

    One encoder call on all `B * N` patches, global max-pool per patch, the N feature vectors
    concatenated in slot order (`[B, N * bottom_filters]`, as the JAX reshape), MLP head to the
    K permutation classes. The JAX step cuts and shuffles the patches inside the step; the twin
    gets the shuffled puzzles.
    """

    def __init__(
        self,
        in_channels: int,
        num_patches: int,
        num_permutations: int,
        filters: Sequence[int],
        bottom_filters: int,
        num_groups: int,
        head_hidden: Sequence[int],
    ):
        super().__init__()
        self.num_patches = int(num_patches)
        self.encoder = Encoder3D(in_channels, filters, bottom_filters, num_groups)
        self.head = mlp_head(self.num_patches * bottom_filters, head_hidden, num_permutations)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, n = patches.shape[:2]
        features, _ = self.encoder(patches.flatten(0, 1))
        return self.head(features.amax(dim=(2, 3, 4)).reshape(b, -1))


class FlaxGRU(nn.Module):
    """`nnx.RNN(nnx.GRUCell(in_features, hidden))` from a zero carry, returning the last state.

    Flax's cell: `dense_i` (in -> 3H, with bias) and `dense_h` (H -> 3H, no bias), gates r, z, n:
    `r = sig(xi_r + hh_r)`, `z = sig(xi_z + hh_z)`, `n = tanh(xi_n + r * hh_n)`,
    `h' = (1 - z) * n + z * h`. That is `torch.gru_cell` with the hidden bias `b_hh` absent
    (PyTorch's `nn.GRU` always has both biases: 6H instead of Flax's 3H bias parameters), so this
    module holds exactly Flax's three tensors and steps PyTorch's fused cell over the sequence.
    """

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.hidden = int(hidden)
        self.weight_ih = nn.Parameter(torch.empty(3 * self.hidden, int(in_features)))
        self.bias_ih = nn.Parameter(torch.zeros(3 * self.hidden))
        self.weight_hh = nn.Parameter(torch.empty(3 * self.hidden, self.hidden))
        nn.init.xavier_uniform_(self.weight_ih)
        nn.init.orthogonal_(self.weight_hh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x [R, T, in]` -> last state `[R, H]`."""
        h = x.new_zeros(x.shape[0], self.hidden)
        for t in range(x.shape[1]):
            h = torch.gru_cell(x[:, t], h, self.weight_ih, self.weight_hh, self.bias_ih, None)
        return h


class CPCModel(nn.Module):
    """`tasks.cpc.CPCModel`: patches `[B, N, C, p, p, p]` -> `(predictions [B, cols, K, E],
    latents [B, N, E])`, N = P**3 grid patches in row-major order, E = code_size.

    Latents: one encoder call on all `B * N` patches, global max-pool, `code` Linear. Context:
    the latents at `context_index` (`[cols, T]` grid indices, `tasks.cpc.context_indices`: the
    JAX model gathers with the same static table) -> `FlaxGRU` (last state) -> one Linear per
    prediction term (`predict0 .. predict{K-1}`), stacked. The JAX step cuts and augments the
    patches inside the step (crop-pad, flips: one gather); the twin gets ready-made patches.
    """

    def __init__(
        self,
        in_channels: int,
        context_index: Sequence[Sequence[int]],
        num_terms: int,
        code_size: int,
        gru_units: int,
        filters: Sequence[int],
        bottom_filters: int,
        num_groups: int,
    ):
        super().__init__()
        self.num_terms = int(num_terms)
        self.encoder = Encoder3D(in_channels, filters, bottom_filters, num_groups)
        self.code = nn.Linear(bottom_filters, code_size)
        self.context = FlaxGRU(code_size, gru_units)
        self.predict = nn.ModuleList(nn.Linear(gru_units, code_size) for _ in range(self.num_terms))
        self.register_buffer(
            "context_index", torch.as_tensor(context_index, dtype=torch.long), persistent=False
        )

    def forward(self, patches: torch.Tensor):
        b, n = patches.shape[:2]
        features, _ = self.encoder(patches.flatten(0, 1))
        latents = self.code(features.amax(dim=(2, 3, 4))).reshape(b, n, -1)
        cols, t = self.context_index.shape
        context = latents[:, self.context_index]  # [B, cols, T, E]
        state = self.context(context.reshape(b * cols, t, -1))
        predictions = torch.stack([p(state) for p in self.predict], dim=1)
        return predictions.reshape(b, cols, self.num_terms, -1), latents


class ExemplarModel(nn.Module):
    """`tasks.exemplar.ExemplarModel`: volumes `[N, C, S, S, S]` -> unit-norm codes `[N, E]`.

    Encoder, global max-pool, ONE `projection` Linear(bottom_filters -> code_size), then
    `z * rsqrt(sum(z**2) + 1e-12)`. The JAX step encodes anchors and positives in one call
    (`N = 2B`) after augmenting both views inside the step (flips, rotations, intensity, zoom:
    `ops/augment.py`, not part of the twin); the twin gets the two views ready-made.
    """

    def __init__(
        self,
        in_channels: int,
        code_size: int,
        filters: Sequence[int],
        bottom_filters: int,
        num_groups: int,
    ):
        super().__init__()
        self.encoder = Encoder3D(in_channels, filters, bottom_filters, num_groups)
        self.projection = nn.Linear(bottom_filters, code_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, _ = self.encoder(x)
        z = self.projection(features.amax(dim=(2, 3, 4)))
        return z * torch.rsqrt(z.square().sum(dim=-1, keepdim=True) + 1e-12)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """`losses.soft_dice_loss` (foreground, per example) + `losses.cross_entropy`, weights 1."""
    probs = logits.softmax(dim=1)[:, 1:]
    onehot = F.one_hot(labels, num_classes).permute(0, 4, 1, 2, 3)[:, 1:].to(probs.dtype)
    inter = (probs * onehot).sum(dim=(2, 3, 4))
    denom = probs.sum(dim=(2, 3, 4)) + onehot.sum(dim=(2, 3, 4))
    dice = 1.0 - ((2.0 * inter + 1e-5) / (denom + 1e-5)).mean()
    return dice + F.cross_entropy(logits, labels)


def info_nce(
    predictions: torch.Tensor,
    latents: torch.Tensor,
    target_index: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """`tasks.cpc.info_nce` as `tasks.cpc.loss_fn` calls it.

    `predictions [B, cols, K, E]`, `latents [B, N, E]`, `target_index [cols, K]` (grid index of
    each prediction's positive, `tasks.cpc.target_indices`). Every prediction is scored by dot
    product against all `B * N` latents of the batch; the loss is the mean softmax cross-entropy
    of its own volume's target latent among them.
    """
    b, n = latents.shape[:2]
    preds = predictions.reshape(b, -1, predictions.shape[-1])  # [B, cols * K, E]
    scores = torch.einsum("bme,ce->bmc", preds, latents.reshape(b * n, -1)) / temperature
    positive = target_index.reshape(1, -1) + n * torch.arange(b, device=latents.device)[:, None]
    return F.cross_entropy(scores.reshape(-1, b * n), positive.reshape(-1))


def _distance(a: torch.Tensor, b: torch.Tensor, squared: bool) -> torch.Tensor:
    """`tasks.exemplar.distance`: squared Euclidean, or `sqrt(max(d2, 1e-12))`."""
    d2 = (a - b).square().sum(dim=-1)
    return d2 if squared else torch.sqrt(torch.clamp(d2, min=1e-12))


def triplet_loss(
    codes: torch.Tensor, negative_index: torch.Tensor, margin: float, squared: bool
) -> torch.Tensor:
    """`tasks.exemplar.loss_fn` without `batch_hard`: codes `[2B, E]` = anchors || positives,
    negative of anchor i = positive `negative_index[i]`, `mean(max(d(a,p) - d(a,n) + margin, 0))`.
    """
    b = codes.shape[0] // 2
    a, p = codes[:b], codes[b:]
    n = p[negative_index]
    return torch.clamp(_distance(a, p, squared) - _distance(a, n, squared) + margin, min=0).mean()


def param_count(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))
