"""The 'visualize' mode (`ssl3d_jax.visualize`): every figure is written, decodes, has the
configured pixel size and is not blank, in 3D and 2D; and the arrays drawn are what the tasks
compute (rotation classes, the solved jigsaw grid, the RPL pair, the curves)."""

from __future__ import annotations

import json
import logging

import jax
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from configs import jigsaw as jigsaw_config
from configs import rpl as rpl_config
from ssl3d_jax import run as run_lib
from ssl3d_jax import figures, tasks, visualize
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.tasks import rotation
from ssl3d_jax.train import data as data_lib

DPI = 50
# FIGSIZE inches x DPI, written out so that a changed figure size fails here.
PIXELS = {
    "rpl": (500, 175),
    "jigsaw": (500, 300),
    "rotation": (625, 275),
    "cpc": (600, 300),
    "exemplar": (500, 150),
    "segmentation": (450, 175),
    "curves": (500, 200),
}


def _config(module, arg: str, **visualize_keys):
    config = module.get_config(arg)
    config.mode = "visualize"
    config.visualize.dpi = DPI
    for k, v in visualize_keys.items():
        config.visualize[k] = v
    return config


def _check_png(path, kind: str) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == PIXELS[kind], (path, im.size)
        pixels = np.asarray(im.convert("RGB"), np.float32)
    assert pixels.std() > 0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # an image, not a flat colour


def _fake_finished_run(config, workdir) -> str:
    """A prediction NIfTI (the true label with part of the tumour missed) of one case, in the
    scan's grid as finetuning writes it, and a metrics.jsonl of two phases and a kNN probe."""
    dataset = data_lib.open_dataset(config)
    case = sorted(dataset.cases, key=lambda c: c.name)[-1]
    label = nib.load(case.label)
    pred = np.asarray(label.dataobj).astype(np.int16)
    pred[: pred.shape[0] // 2] = 0
    out = workdir / "finetune" / "pretrained" / "predictions"
    out.mkdir(parents=True)
    nib.save(nib.Nifti1Image(pred, label.affine), str(out / f"{case.name}_pred.nii.gz"))
    records = [{"phase": "pretrain", "step": s, "loss": 3.0 - s / 4, "time": 0.0} for s in (1, 2)]
    records += [{"phase": "pretrain/knn", "step": 2, "knn_accuracy": 0.6, "time": 0.0}]
    records += [{"phase": "finetune/scratch", "step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return case.name


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vis3d")
    config = _config(rpl_config, "smoke", tasks=("all",))
    _fake_finished_run(config, workdir)
    return workdir, run_lib.run(config, str(workdir))


@pytest.mark.slow
def test_visualize_mode_writes_every_figure_3d(run_3d):
    workdir, written = run_3d
    names = [p.rsplit("/", 1)[1] for p in written]
    assert names == [f"{t}.png" for t in tasks.names()] + [
        "segmentation_pretrained.png",
        "curves.png",
    ]
    for path in written:
        assert path.startswith(str(workdir / "figures"))
        kind = path.rsplit("/", 1)[1][: -len(".png")].split("_")[0]
        _check_png(path, kind)


@pytest.mark.slow
def test_visualize_mode_2d_and_skips_without_run(tmp_path, caplog):
    config = _config(jigsaw_config, "smoke,2d", tasks=("all",))
    with caplog.at_level(logging.INFO, logger="ssl3d_jax"):
        written = run_lib.run(config, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in written] == [f"{t}.png" for t in tasks.names()]
    for path in written:
        _check_png(path, path.rsplit("/", 1)[1][: -len(".png")])
    assert "No segmentation figure" in caplog.text
    assert "No training curves" in caplog.text
    assert f"Wrote {tmp_path / 'figures' / 'cpc.png'}" in caplog.text


def test_default_draws_the_config_task_and_rejects_unknown_tasks():
    config = _config(jigsaw_config, "smoke")
    assert visualize.selected_tasks(config) == ("jigsaw",)
    config.visualize.tasks = ("jigsaw", "rpl")
    assert visualize.selected_tasks(config) == ("jigsaw", "rpl")
    config.visualize.tasks = ("rotations",)
    with pytest.raises(ConfigError, match="config.visualize.tasks"):
        visualize.selected_tasks(config)


def _volumes(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _task(name: str, dims: int = 3, **section) -> tasks.Task:
    """Registered task `name` built from its smoke config with `config.<name>` keys replaced."""
    config = tasks.task_config(name, "smoke" if dims == 3 else "smoke,2d")
    for key, value in section.items():
        config[name][key] = value
    return tasks.lookup(name).make(config, in_channels=1)


def test_rotation_panels_are_the_task_rotations():
    vol = _volumes((2, 6, 6, 6, 2))
    fig, panels = visualize.task_figure(_task("rotation"), vol, jax.random.key(0), names="ab")
    drawn = panels["rotated"]
    assert drawn.shape == (10, 6, 6)
    for k in range(10):
        expected = np.asarray(rotation.rotate(vol[0], k))[:, :, 3, 0]  # middle slice, axis 2
        np.testing.assert_array_equal(drawn[k], expected)
    # Classes 1-3 turn the (0, 1) plane, which holds the drawn slice: the slice itself turns.
    for k in (1, 2, 3):
        np.testing.assert_array_equal(drawn[k], np.rot90(drawn[0], k))
    assert len({d.tobytes() for d in drawn}) == 10


@pytest.mark.parametrize("dims", [3, 2])
def test_jigsaw_solved_grid_is_the_unshuffled_grid(dims):
    # Jitter 0: the grid tiles the input exactly, so the solved tiles are plain slices of it.
    size, p = 6, 3
    vol = _volumes((2,) + (size,) * dims + (1,), seed=dims)
    section = dict(patches_per_side=p, jitter=0, grid_fraction=1.0, num_permutations=10)
    task = _task("jigsaw", dims, permutation_seed=0, puzzles_per_volume=1, **section)
    _, panels = visualize.task_figure(task, vol, jax.random.key(3), names="ab")
    s = size // p
    for index in range(p**dims):
        cell = np.unravel_index(index, (p,) * dims)
        patch = vol[0][tuple(slice(c * s, (c + 1) * s) for c in cell)]
        np.testing.assert_array_equal(panels["solved"][index], figures.to_2d(patch))
    assert not np.array_equal(panels["shuffled"], panels["solved"])  # class 0 is not identity
    if dims == 2:  # the solved mosaic is the image itself, with blank gaps between tiles
        image = panels["solved_mosaic_0"]
        keep = [i for i in range(image.shape[0]) if i % (s + 1) != s]
        np.testing.assert_array_equal(image[np.ix_(keep, keep)], vol[0, ..., 0])


def test_rpl_pair_and_offset():
    size, p = 9, 3
    vol = _volumes((2, size, size, size, 1), seed=1)
    task = _task("rpl", patches_per_side=p, jitter=0, grid_fraction=1.0)
    fig, panels = visualize.task_figure(task, vol, jax.random.key(5), names="ab")
    title = fig.get_suptitle()
    label = int(title.split("class ")[1].split(",")[0])
    offset = figures.rpl_offset(label, p, 3)
    assert str(offset) in title and offset != (0, 0, 0)
    cell = tuple(1 + o for o in offset)  # the centre cell is (1, 1, 1)
    query = vol[0][tuple(slice(3 * c, 3 * c + 3) for c in cell)]
    np.testing.assert_array_equal(panels["query"], figures.to_2d(query))
    np.testing.assert_array_equal(panels["reference"], figures.to_2d(vol[0, 3:6, 3:6, 3:6]))
    # The class ↔ offset map skips the centre: 26 distinct non-zero offsets.
    offsets = {figures.rpl_offset(c, 3, 3) for c in range(26)}
    assert len(offsets) == 26 and (0, 0, 0) not in offsets


def test_curves_are_the_metrics_per_phase():
    records = [
        {"phase": "pretrain", "step": 2, "loss": 2.0},
        {"phase": "pretrain", "step": 1, "loss": 3.0},
        {"phase": "pretrain/knn", "step": 2, "knn_accuracy": 0.5},
    ]
    _, panels = figures.plot_curves(records)
    np.testing.assert_array_equal(panels["pretrain/loss"], [[1, 2], [3.0, 2.0]])
    np.testing.assert_array_equal(panels["pretrain/knn/knn_accuracy"], [[2], [0.5]])
