"""Config sections shared by every pretext task: seed, data, model, pretraining, finetuning.

A task config (`configs/<task>.py`) calls `base_config(arg)` and adds its own `config.<task>`
section. `arg` is what follows the colon in `--config=configs/<task>.py:ARG`: a comma-separated
list of a size and a dimensionality, e.g. `smoke`, `2d`, `smoke,2d`, `paper`. Sizes:

- `paper`: the paper's BraTS setting (128³ inputs, batch sizes of the original configs, 1000
  epochs' worth of steps). Needs an accelerator.
- `default`: small enough that `python launch/main.py --config=configs/<task>.py` pretrains,
  finetunes and evaluates on the built-in phantom on a 2-core CPU in a few minutes.
- `smoke`: seconds-scale, for tests and CI.

Dimensionality: `3d` (default) trains on volumes `[D, H, W, C]`; `2d` trains on axial slices
`[H, W, C]` of the same scans (the paper's 2D baselines), with 2D encoders and decoders.

Every key can be overridden on the command line, e.g. `--config.data.root=/data/BraTS2021`.
Keys are locked, so a mistyped key is an error rather than a silently ignored setting (the
original's JSON configs swallowed unknown keys).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

SIZES = ("paper", "default", "smoke")
DIMS = {"2d": 2, "3d": 3}


def parse_arg(arg: str | None) -> tuple[str, int]:
    """`"smoke,2d"` → `("smoke", 2)`; defaults `("default", 3)`."""
    size, dims = "default", 3
    for part in (arg or "").split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in SIZES:
            size = part
        elif part in DIMS:
            dims = DIMS[part]
        else:
            raise ValueError(
                f"config argument {arg!r}: {part!r} is neither a size {SIZES} nor a "
                f"dimensionality {tuple(DIMS)}; e.g. configs/rpl.py:smoke,2d"
            )
    return size, dims


def base_config(arg: str | None) -> ml_collections.ConfigDict:
    size, dims = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.size = size  # informational: which preset the numbers below come from
    c.task = ""
    c.seed = 0
    # 'pretrain_finetune' runs everything; 'pretrain' and 'finetune' run one half.
    c.mode = "pretrain_finetune"

    # --- data -------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    # BraTS training folder (`<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`). None: the built-in
    # synthetic phantom, generated once into a cache folder.
    c.data.root = config_dict.placeholder(str)
    c.data.modalities = ("t1", "t1ce", "t2", "flair")
    # 3: volumes; 2: axial slices of the same preprocessed volumes.
    c.data.spatial_dims = dims
    # Edge of the preprocessed cube; in 2D the slices are size × size.
    c.data.size = {"paper": 128, "default": 40 if dims == 3 else 64, "smoke": 24}[size]
    c.data.slice_fraction = 0.6  # 2D: central fraction of the axial slices used per volume
    c.data.resize_mode = "resize"  # or 'crop_pad'
    c.data.normalization = "zscore"  # or 'minmax'; per modality, over the foreground
    c.data.num_test = {"paper": 50, "default": 6, "smoke": 2}[size]  # held-out evaluation cases
    c.data.num_workers = 0  # grain worker processes (0: threads in the main process)
    c.data.num_threads = 2
    # Preprocessed cases kept in memory per process (MiB); 0 re-reads the NIfTI files every epoch.
    c.data.cache_mb = 2048
    c.data.phantom = ml_collections.ConfigDict()
    c.data.phantom.num_cases = {"paper": 64, "default": 24, "smoke": 6}[size]
    c.data.phantom.seed = 0

    # --- model (the paper's 3D U-Net encoder; decoder for finetuning) -------------------------
    c.model = ml_collections.ConfigDict()
    # The paper's widths are 16 → 256. The default halves them: XLA:CPU 3D convs are slow, and a
    # 2 × 40³ segmentation step takes 1.4 s at half width vs 2.2 s at full width on 2 cores.
    c.model.filters = {
        "paper": (16, 32, 64, 128),
        "default": (8, 16, 32, 64),
        "smoke": (4, 8, 8, 8),
    }[size]
    c.model.bottom_filters = {"paper": 256, "default": 128, "smoke": 8}[size]
    # GroupNorm groups (BatchNorm in the original; see models/layers.py). One group at smoke
    # width: with 5³ patches the bottom is 1³, and a group of one channel normalises to 0.
    c.model.num_groups = 1 if size == "smoke" else 8
    c.model.dropout_rate = 0.0  # the original used 0.5 in every block

    # --- pretraining ------------------------------------------------------------------------
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.batch_size = 8
    c.pretrain.num_steps = {"paper": 100_000, "default": 1000, "smoke": 4}[size]
    c.pretrain.learning_rate = 1e-4 if size == "paper" else 1e-3
    c.pretrain.log_every = {"paper": 100, "default": 50, "smoke": 1}[size]
    c.pretrain.checkpoint_every = {"paper": 5000, "default": 250, "smoke": 2}[size]
    c.pretrain.keep_checkpoints = 3

    # --- finetuning (3D U-Net segmentation of the BraTS regions) -----------------------------
    c.finetune = ml_collections.ConfigDict()
    # 'pretrained': encoder restored from the pretraining checkpoint; 'scratch': random init.
    c.finetune.arms = ("pretrained", "scratch")
    # Pretraining checkpoint folder to restore the encoder from; None: <workdir>/checkpoints.
    c.finetune.init_from = config_dict.placeholder(str)
    c.finetune.num_labeled = {"paper": -1, "default": 4, "smoke": 2}[size]  # -1: all training cases
    c.finetune.batch_size = 2 if dims == 3 else 8  # volumes, or slices in 2D
    c.finetune.num_steps = {"paper": 20_000, "default": 100 if dims == 3 else 300, "smoke": 3}[size]
    # Steps with the encoder frozen before it is trained too (the paper's warm-up).
    c.finetune.warmup_frozen_steps = {"paper": 1000, "default": 25, "smoke": 1}[size]
    c.finetune.learning_rate = 1e-3
    c.finetune.dice_weight = 1.0
    c.finetune.ce_weight = 1.0
    c.finetune.log_every = {"paper": 100, "default": 10, "smoke": 1}[size]
    c.finetune.checkpoint_every = {"paper": 5000, "default": 50, "smoke": 2}[size]
    return c
