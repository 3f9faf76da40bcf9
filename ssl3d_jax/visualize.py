"""The 'visualize' mode: pictures of what each pretext task feeds the network, of predictions
and of training curves.

`config.mode='visualize'` (`run(config, workdir)`) writes PNG figures under `<workdir>/figures/`:

- `<task>.png` for each drawn pretext task (`config.visualize.tasks`, any registered task): the
  RPL reference / query pair and its class, the jigsaw grid shuffled and solved, the rotation
  classes, CPC's context and target patches, the exemplar triplet (`Task.plot`; a task without
  one: every sampled array, `figures.plot_sample`);
- `segmentation_<arm>.png`: predicted vs true labels of one test case, from a finished run's
  `<workdir>/finetune/<arm>/predictions/<case>_pred.nii.gz`;
- `curves.png`: loss per phase vs step, and the kNN probe / Dice / accuracy metrics, from
  `<workdir>/metrics.jsonl`.

Why: to check by eye that the tasks see what they should (patch geometry, labels, augmentation).
The inputs are real volumes of the configured dataset, read and preprocessed by the training
pipeline (`train.common.preprocessed_source`, 2D slices through `data.slices.SliceSource`), and
the samples come from each task's own `Task.sample`, the draw its loss makes, so the figures show
exactly what the network is fed. Drawing: `ssl3d_jax.figures`.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import jax
import numpy as np

from ssl3d_jax import figures, tasks
from ssl3d_jax.errors import ConfigError

log = logging.getLogger(__name__)


def task_figure(task: tasks.Task, volumes: np.ndarray, key, *, names, channel: int = 0):
    """`(Figure, panels)` of the configured pretext `task` on `volumes [B, *spatial, C]` (B >= 2,
    drawn: volume 0): one `task.sample` draw, drawn by `task.plot` (else `figures.plot_sample`)."""
    sample = jax.tree.map(np.asarray, jax.jit(task.sample)(volumes, key))
    if task.plot is not None:
        return task.plot(sample, volumes, names=names, channel=channel)
    return figures.plot_sample(
        sample, volumes, names=names, channel=channel, title=f"{task.name}: one sample"
    )


# --------------------------------------------------------------------------------------------
# The mode
# --------------------------------------------------------------------------------------------


def selected_tasks(config) -> tuple[str, ...]:
    """`config.visualize.tasks`: () → `(config.task,)`; `('all',)` → every registered task."""
    chosen = tuple(config.visualize.tasks or ())
    if not chosen:
        if not config.task:
            raise ConfigError(
                "config.visualize.tasks is empty and config.task is not set: use a task config "
                "or --config.visualize.tasks=all"
            )
        return (config.task,)
    return tasks.expand(chosen, key="config.visualize.tasks")


def task_for(config, name: str, in_channels: int) -> tasks.Task:
    """The `Task` drawn for `name`: built from this config when it is `config.task`; else from the
    task's own config file at this config's size and dimensionality (with this config's data and
    model), and this config's `config.<name>` section when it has one (overrides kept)."""
    if name == config.task:
        return tasks.get_task(config, in_channels=in_channels)
    from ssl3d_jax import experiment

    tc = experiment.task_config(name, config)
    if name in config:
        tc[name] = config[name]
    return tasks.get_task(tc, in_channels=in_channels)


def load_inputs(config, dataset, num: int = 2) -> tuple[np.ndarray, list[str]]:
    """`num` preprocessed training inputs `[num, *spatial, C]` exactly as pretraining reads them
    (3D volumes; 2D: the middle kept axial slice of each volume, or the images), and their case
    names. The first is `config.visualize.case` when set, else the first training case."""
    from ssl3d_jax.data import datasets, preprocess, slices
    from ssl3d_jax.train import common
    from ssl3d_jax.train import data as data_lib

    if dataset.kind == "unlabelled":
        names = sorted(c.name for c in dataset.cases)
    else:
        names = list(data_lib.base_split(config, dataset)["train"])
    want = config.visualize.case
    if want:
        known = {c.name for c in dataset.cases}
        if want not in known:
            raise ConfigError(f"config.visualize.case={want!r}: no such case in {dataset.root}")
        names = [want] + [n for n in names if n != want]
    if len(names) < num:
        raise ConfigError(f"visualize needs {num} cases, {dataset.root} has {len(names)}")
    cases = data_lib.select(dataset.cases, names[:num])
    dims = int(config.data.spatial_dims)
    if dataset.layout == "images":
        source = datasets.ImageSource(dataset, cases, size=config.data.size, with_label=False)
        images = [np.asarray(source[i]["image"]) for i in range(num)]
        return np.stack(images).astype(np.float32), names[:num]
    source = common.preprocessed_source(config, dataset, cases, with_label=False, progress=False)
    records = [source[i] for i in range(num)]
    if config.data.resize_mode == "none":  # the training crop, centred on no voxel in particular
        crop = preprocess.RandomCrop(config.data.size, foreground_prob=0.0)
        rng = np.random.default_rng(int(config.visualize.seed))
        records = [crop.random_map(dict(r), rng) for r in records]
    if dims == 2:
        sliced = slices.SliceSource(
            _ListSource(records), size=config.data.size, keep_fraction=config.data.slice_fraction
        )
        per = sliced.slices_per_volume
        records = [sliced[v * per + per // 2] for v in range(num)]
    return np.stack([np.asarray(r["image"], np.float32) for r in records]), names[:num]


class _ListSource:
    def __init__(self, records):
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i):
        return self._records[i]


def segmentation_figures(config, workdir: str, dataset) -> list:
    """`(arm, Figure)` per finetuning arm with saved predictions: the case
    `config.visualize.case` (else the first predicted case), on the axial slice with the most
    true foreground (the middle one without any); scan channel `config.visualize.channel`."""
    from ssl3d_jax import tensorboard
    from ssl3d_jax.data import nifti

    by_name = {c.name: c for c in dataset.cases}
    out = []
    for arm_dir in sorted(glob.glob(os.path.join(workdir, "finetune", "*"))):
        preds = sorted(glob.glob(os.path.join(arm_dir, "predictions", "*_pred.nii.gz")))
        arm = os.path.basename(arm_dir)
        cases = {os.path.basename(p)[: -len("_pred.nii.gz")]: p for p in preds}
        cases = {k: v for k, v in cases.items() if k in by_name and by_name[k].label is not None}
        if not cases:
            continue
        name = config.visualize.case if config.visualize.case in cases else sorted(cases)[0]
        case = by_name[name]
        pred, _ = nifti.load_nifti(cases[name], dtype=np.int32)
        true, _ = nifti.load_nifti(case.label, dtype=np.int32)
        ch = int(config.visualize.channel)
        if dataset.channel_index:
            scan, _ = nifti.load_nifti(case.images[0])
            if scan.ndim == 4:
                scan = scan[..., dataset.channel_index[ch]]
        else:
            scan, _ = nifti.load_nifti(case.images[ch])
        if pred.shape != true.shape or scan.shape[:3] != true.shape:
            log.warning(
                "Skipping %s: prediction %s, label %s and scan %s differ in shape",
                cases[name],
                pred.shape,
                true.shape,
                scan.shape,
            )
            continue
        z = tensorboard.best_slice(true, axis=figures.AXIAL)
        fig, _ = figures.plot_segmentation(
            scan[:, :, z],
            true[:, :, z],
            pred[:, :, z],
            title=f"{arm}: case {name}, axial slice {z}, {dataset.channels[ch]};",
        )
        out.append((arm, fig))
    return out


def run(config, workdir: str, *, dataset=None) -> list[str]:
    """Write the figures of `config.visualize` under `<workdir>/figures/`; returns their paths.

    Pretext-task figures always; `segmentation_<arm>.png` and `curves.png` only when the workdir
    holds predictions / `metrics.jsonl` (each skip is logged).
    """
    from ssl3d_jax.train import data as data_lib

    workdir = os.path.abspath(workdir)
    if jax.process_index() != 0:  # every process would draw the same figures
        return []
    out_dir = os.path.join(workdir, "figures")
    dpi = int(config.visualize.dpi)
    channel = int(config.visualize.channel)
    dataset = data_lib.open_dataset(config) if dataset is None else dataset
    if not 0 <= channel < dataset.in_channels:
        raise ConfigError(
            f"config.visualize.channel={channel}: the data has {dataset.in_channels} channel(s)"
        )
    drawn = selected_tasks(config)
    written = []
    volumes, names = load_inputs(config, dataset)
    log.info("Drawing %s on case(s) %s", ", ".join(drawn), ", ".join(names))
    key = jax.random.key(int(config.visualize.seed))
    for name in drawn:
        task = task_for(config, name, dataset.in_channels)
        fig, _ = task_figure(task, volumes, key, names=names, channel=channel)
        written.append(figures.save(fig, os.path.join(out_dir, f"{name}.png"), dpi=dpi))

    segs = segmentation_figures(config, workdir, dataset) if dataset.kind == "segmentation" else []
    if not segs:
        log.info(
            "No segmentation figure: no predictions under %s/finetune/<arm>/predictions "
            "(run a finetuning mode first)",
            workdir,
        )
    for arm, fig in segs:
        written.append(figures.save(fig, os.path.join(out_dir, f"segmentation_{arm}.png"), dpi=dpi))

    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            records = [json.loads(line) for line in f if line.strip()]
        results = os.path.join(workdir, "results.json")
        test_dice = None
        if os.path.exists(results):
            with open(results) as f:
                arms = json.load(f).get("arms", {})
            test_dice = {a: r["dice_mean"] for a, r in arms.items() if "dice_mean" in r}
        fig, _ = figures.plot_curves(records, test_dice=test_dice)
        written.append(figures.save(fig, os.path.join(out_dir, "curves.png"), dpi=dpi))
    else:
        log.info("No training curves: %s does not exist", metrics)
    for path in written:
        log.info("Wrote %s", path)
    return written
