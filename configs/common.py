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
    # TensorBoard event files under <workdir>/tensorboard/<phase> beside metrics.jsonl: every
    # metric record, the learning rate, throughput, pretext input samples, segmentation overlays
    # (`tensorboard --logdir <workdir>/tensorboard`).
    c.tensorboard = True

    # --- multi-host ---------------------------------------------------------------------------
    c.distributed = ml_collections.ConfigDict()
    # Call jax.distributed.initialize() before anything touches the devices: 'on', 'off', or
    # 'auto' (when the environment names a coordinator: JAX_COORDINATOR_ADDRESS, or a cluster
    # that JAX detects itself: SLURM, Open MPI, Cloud TPU pods with several hosts).
    c.distributed.initialize = "auto"
    c.distributed.coordinator_address = config_dict.placeholder(str)  # 'host:port'
    c.distributed.num_processes = config_dict.placeholder(int)
    c.distributed.process_id = config_dict.placeholder(int)
    # CPU-only multi-process runs need a collectives backend for their all-reduces.
    c.distributed.cpu_collectives = "gloo"

    # --- data -------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    # Dataset folder. None: the built-in synthetic BraTS-layout phantom, generated once into a
    # cache folder. Layouts (README "Data layouts"): a BraTS training folder
    # (`<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`), a Medical Segmentation Decathlon task
    # (`dataset.json`, imagesTr/, labelsTr/), a folder of unlabelled NIfTI (pretraining only), or
    # a folder of 2D images with a CSV of grades (classification).
    c.data.root = config_dict.placeholder(str)
    c.data.layout = "auto"  # 'auto' detects it from the root; or brats | decathlon | nifti | images
    # Input channels by name, in model order (BraTS: t1 t1ce t2 flair; Decathlon: dataset.json's
    # modality names). None: every channel of the dataset.
    c.data.modalities = config_dict.placeholder(tuple)
    c.data.labels_csv = config_dict.placeholder(str)  # images layout; None: the CSV in the root
    c.data.ct_window = (-100.0, 240.0)  # CT: HU clipping window (abdomen soft tissue)
    # Target voxel spacing in mm per axis before fitting; None keeps each scan's own spacing.
    c.data.spacing = config_dict.placeholder(tuple)
    c.data.crop_foreground = True  # crop to the body / brain bounding box before fitting
    # Preprocessed arrays are written once to a disk cache keyed on every preprocessing setting
    # (so that training never decodes gzip NIfTI again); None: $SSL3D_JAX_CACHE/preprocessed or
    # ~/.cache/ssl3d_jax/preprocessed. '' disables the disk cache.
    c.data.cache_dir = config_dict.placeholder(str)
    # 3: volumes; 2: axial slices of the same preprocessed volumes.
    c.data.spatial_dims = dims
    # Edge of the preprocessed cube; in 2D the slices are size × size.
    c.data.size = {"paper": 128, "default": 40 if dims == 3 else 64, "smoke": 24}[size]
    c.data.slice_fraction = 0.6  # 2D: central fraction of the axial slices used per volume
    # 'resize': the whole (cropped) scan becomes the model's input cube; 'crop_pad': centre
    # crop / pad to the cube; 'none': keep the scan's size, train on random size³ crops and
    # evaluate with sliding windows.
    c.data.resize_mode = "resize"
    c.data.normalization = "zscore"  # or 'minmax'; per modality, over the foreground
    # MRI background after normalisation: 'zero' (0, which after z-scoring is also the mean tissue
    # value and the convolutions' zero padding) or 'value' (-5 after z-scoring, -1 after min-max:
    # below every foreground value; ssl3d_jax/data/preprocess.py). docs/results/shortcut_audit.md
    # measures what each does to the grid tasks' single-patch position shortcut.
    c.data.background = "zero"
    c.data.num_test = {"paper": 50, "default": 8, "smoke": 2}[size]  # held-out evaluation cases
    # Validation cases, drawn (from `seed`) from the non-test cases and held out of pretraining
    # and of the labelled sets: every finetuning run scores them too (`val_metrics` of its
    # results), for choosing settings such as the probe learning rate; the test cases are only
    # reported. 0: no validation split.
    c.data.num_val = {"paper": 10, "default": 4, "smoke": 1}[size]
    c.data.num_workers = 0  # grain worker processes (0: threads in the main process)
    c.data.num_threads = 2
    # Batches read and copied to the device ahead of the train step by a background thread, so
    # that the step never waits for them while the pipeline keeps up (0: read between steps).
    c.data.prefetch = 2
    # Preprocessed cases kept in memory per process (MiB); 0 re-reads the NIfTI files every epoch.
    c.data.cache_mb = 2048
    c.data.phantom = ml_collections.ConfigDict()
    c.data.phantom.num_cases = {"paper": 64, "default": 32, "smoke": 6}[size]
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
    # 'bfloat16': convs and matmuls compute in bf16 (params, optimizer state and loss reductions
    # stay float32); 'float32' everywhere else. bf16 halves activation memory on accelerators;
    # XLA:CPU emulates it (converts around every conv), so keep float32 on CPU.
    c.model.compute_dtype = "float32"
    # Recompute each encoder / decoder block's activations in the backward pass instead of
    # storing them (jax.checkpoint): ~1/3 more compute, much less memory, so that 128³ fits.
    c.model.remat = False
    # How the convolutions are computed (ssl3d_jax/ops/conv.py; same parameters, same results up
    # to float summation order): 'auto' = on CPU oneDNN's primitives through jax.ffi where the
    # extension is built (PyTorch's speed), else per layer the pure-XLA formulation XLA:CPU runs
    # fastest (benchmarks/results/layers.md); off CPU XLA's. 'onednn' forces oneDNN (an error
    # where it cannot run); 'taps2d' / 'stacked' / 'wstacked' force a rewrite; 'xla' = nnx.Conv.
    c.model.conv_impl = "auto"
    # Encoder downsampling: 'max_pool' (the paper) or 'conv' (NOT the paper: nnU-Net-style
    # stride-2 3x3x3 conv + GroupNorm + ReLU per level, extra parameters pool0, pool1, ...).
    c.model.downsample = "max_pool"

    # --- pretraining ------------------------------------------------------------------------
    c.pretrain = ml_collections.ConfigDict()
    c.pretrain.batch_size = 8
    c.pretrain.num_steps = {"paper": 100_000, "default": 1000, "smoke": 4}[size]
    c.pretrain.learning_rate = 1e-4 if size == "paper" else 1e-3
    # Gradient accumulation: each step averages the gradients of `grad_accum_steps` equal
    # micro-batches of batch_size / grad_accum_steps, so the paper's batch sizes fit one device.
    # Exact for losses that are means over samples (RPL, rotation, jigsaw); CPC and Exemplar draw
    # their negatives from each micro-batch, so for them accumulation changes the task (a warning
    # is logged). batch_size / grad_accum_steps must be a multiple of the device count.
    c.pretrain.grad_accum_steps = 1
    c.pretrain.log_every = {"paper": 100, "default": 50, "smoke": 1}[size]
    c.pretrain.checkpoint_every = {"paper": 5000, "default": 250, "smoke": 2}[size]
    c.pretrain.keep_checkpoints = 3
    # Online signal: every `knn_every` steps (0: never), a kNN classifier on the encoder's pooled
    # features of labelled training data (segmentation: patches with / without foreground;
    # classification: the grades), half of the cases as memory bank, half as queries.
    c.pretrain.knn_every = {"paper": 5000, "default": 250, "smoke": 2}[size]
    c.pretrain.knn_cases = {"paper": 16, "default": 8, "smoke": 2}[size]
    c.pretrain.knn_k = 20

    # --- finetuning (3D U-Net segmentation of the BraTS regions) -----------------------------
    c.finetune = ml_collections.ConfigDict()
    # 'pretrained': encoder restored from the pretraining checkpoint (frozen warm-up, then
    # everything trains); 'scratch': random init; 'probe': the restored encoder stays frozen and
    # only a linear read-out trains (voxel-wise for segmentation, on pooled features for
    # classification). Controls: 'random_warmup' ('pretrained' with the random encoder instead of
    # the restored one: same frozen warm-up) and 'random_probe' ('probe' on a random encoder).
    c.finetune.arms = ("pretrained", "scratch")
    # Pretraining checkpoint folder to restore the encoder from; None: <workdir>/checkpoints.
    c.finetune.init_from = config_dict.placeholder(str)
    c.finetune.num_labeled = {"paper": -1, "default": 4, "smoke": 2}[size]  # -1: all training cases
    c.finetune.batch_size = 2 if dims == 3 else 8  # volumes, or slices in 2D
    # Default: 300 steps at lr 3e-3, chosen on the validation split of the phantom v2 (then 24
    # cases; scratch arm, 4 labelled cases, 300 steps; val WT/TC/ET 0.90/0.88/0.81 at 3e-3 vs
    # 0.87/0.68/0.61 at 1e-3, and 100 steps at 1e-3 still near the start: the v2 phantom's
    # tumours are smaller and more varied).
    c.finetune.num_steps = {"paper": 20_000, "default": 300, "smoke": 3}[size]
    # Steps with the encoder frozen before it is trained too (the paper's warm-up).
    c.finetune.warmup_frozen_steps = {"paper": 1000, "default": 50, "smoke": 1}[size]
    c.finetune.learning_rate = 1e-3 if size == "paper" else 3e-3
    c.finetune.grad_accum_steps = 1  # as config.pretrain.grad_accum_steps
    # The probe arms train only a linear read-out, which needs larger steps (1e-3 left it
    # predicting background). Chosen on the validation split (docs/results/probe_lr_search.md:
    # random encoder, 10% labels, mean val Dice 0.373 / 0.419 / 0.411 at 1e-2 / 3e-2 / 1e-1).
    c.finetune.probe_learning_rate = 3e-2
    c.finetune.dice_weight = 1.0
    c.finetune.ce_weight = 1.0
    c.finetune.log_every = {"paper": 100, "default": 10, "smoke": 1}[size]
    c.finetune.checkpoint_every = {"paper": 5000, "default": 50, "smoke": 2}[size]
    # Test-set predictions as NIfTI in each scan's own grid (open on top of the scan in ITK-SNAP
    # or 3D Slicer), under <workdir>/finetune/<arm>/predictions.
    c.finetune.save_predictions = True
    c.finetune.hd95 = False  # also report the 95th-percentile Hausdorff distance (mm); slow
    c.finetune.sliding_window_overlap = 0.5  # resize_mode 'none': overlap of evaluation windows

    # --- classification finetuning (2D image datasets with grades, e.g. diabetic retinopathy) --
    c.classify = ml_collections.ConfigDict()
    c.classify.head_hidden = 64  # MLP head width of the finetuned arms (the original: 1024)
    c.classify.head_dropout = 0.0  # the original: 0.5
    c.classify.flip = True  # random horizontal / vertical flips of the training images

    # --- the paper's data-efficiency protocol (config.mode='experiment') --------------------
    c.experiment = ml_collections.ConfigDict()
    # Fractions of the non-test cases that are labelled for finetuning (the paper: 5..100%).
    c.experiment.fractions = {
        "paper": (0.05, 0.1, 0.25, 0.5, 1.0),
        "default": (0.1, 0.25, 1.0),
        "smoke": (0.5, 1.0),
    }[size]
    # Repetition r redraws the labelled subsets (from (seed, r)) and the seed of pretraining and
    # finetuning: `seed + 1000 * r` (ssl3d_jax.experiment.repetition_seed; repetition 0 uses
    # `seed`). The test and validation cases stay those of `seed` in every repetition.
    c.experiment.repetitions = {"paper": 3, "default": 1, "smoke": 1}[size]
    # 'scratch', 'random_warmup' and 'random_probe' do not depend on the pretext task: a sweep
    # runs them once.
    c.experiment.arms = ("pretrained", "scratch", "probe", "random_warmup", "random_probe")
    # Folder of the split files shared by every method of a comparison; None: <workdir>/splits.
    c.experiment.splits_dir = config_dict.placeholder(str)
    # config.mode='sweep': the pretext tasks compared, each with its own config file; ('all',):
    # every registered task (`ssl3d --list`: the five of the paper, and any in $SSL3D_JAX_TASKS).
    c.experiment.tasks = ("all",)

    # --- pictures (config.mode='visualize', `ssl3d_jax.visualize`) -----------------------------
    c.visualize = ml_collections.ConfigDict()
    # Pretext tasks drawn: () the config's own task; ('all',) every registered task (a task without
    # its section in this config uses its config file's defaults at this size and dimensionality).
    c.visualize.tasks = ()
    # Case drawn (pretext inputs and segmentation); None: the first training / predicted case.
    c.visualize.case = config_dict.placeholder(str)
    c.visualize.channel = 0  # input channel shown (index into the dataset's channels)
    c.visualize.seed = 0  # key of the task samples drawn
    c.visualize.dpi = 80  # PNG pixels = figure inches (ssl3d_jax.figures.FIGSIZE) x dpi
    return c
