"""TensorBoard logging: event files of a smoke run hold every metrics.jsonl scalar and images;
a resumed phase purges its later steps; the numpy image renderings.

Event files are read without the tensorboard package: TFRecord framing (uint64 length, uint32
CRC, data, uint32 CRC) around `tensorboardX.proto.event_pb2.Event` messages.
"""

from __future__ import annotations

import io
import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest
from launch_util import ROOT
from PIL import Image

from configs import rpl as rpl_config
from ssl3d_jax import run, tensorboard
from ssl3d_jax.data import phantom
from ssl3d_jax.train import loop

with tensorboard._without_torch():  # tensorboardX imports torch when it can (seconds)
    from tensorboardX.proto import event_pb2


def read_events(path) -> list:
    data = path.read_bytes()
    events, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[pos + 12 : pos + 12 + n])
        events.append(event)
        pos += 12 + n + 4
    return events


def load_run(folder) -> tuple[dict, dict]:
    """What TensorBoard shows for one run folder: {tag: {step: value}}, {tag: {step: PNG}}.

    Files in name order; a SessionLog START at step P (tensorboardX's purge_step) drops the
    events read so far with step >= P, as TensorBoard does.
    """
    scalars: dict = {}
    images: dict = {}
    for path in sorted(p for p in folder.iterdir() if p.name.startswith("events.out.tfevents")):
        for ev in read_events(path):
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                for series in (*scalars.values(), *images.values()):
                    for step in [s for s in series if s >= ev.step]:
                        del series[step]
            for v in ev.summary.value:
                if v.HasField("image"):
                    images.setdefault(v.tag, {})[ev.step] = v.image.encoded_image_string
                else:
                    scalars.setdefault(v.tag, {})[ev.step] = v.simple_value
    return scalars, images


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("tb")
    data = base / "data"
    phantom.write_brats_phantom(data, num_cases=5, shape=(30, 34, 28), seed=3)
    config = rpl_config.get_config("smoke")
    config.data.root = str(data)
    config.data.num_test = 1
    config.finetune.batch_size = 8  # tests run on 8 simulated devices
    config.finetune.arms = ("probe",)  # one cheap step function to compile
    config.pretrain.num_steps = config.finetune.num_steps = 2
    assert config.tensorboard  # on by default
    workdir = base / "work"
    results = run.run(config, str(workdir))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return config, workdir, records, results


@pytest.mark.slow
def test_every_metric_record_is_a_scalar_at_its_step(smoke_run):
    config, workdir, records, _ = smoke_run
    runs = {p: load_run(workdir / "tensorboard" / p) for p in ("pretrain", "finetune/probe")}
    phases = {r["phase"] for r in records}
    assert {"pretrain", "pretrain/knn", "finetune/probe"} <= phases
    checked = 0
    for r in records:
        scalars, _ = runs["pretrain" if r["phase"].startswith("pretrain") else "finetune/probe"]
        for k, v in r.items():
            if k in ("phase", "step", "time"):
                continue
            tag = f"{r['phase']}/{k}"
            assert tag in scalars, tag
            assert scalars[tag][r["step"]] == pytest.approx(v, rel=1e-6, abs=1e-30), tag
            checked += 1
    assert checked >= 2 * len(records)
    # One point per logged step: nothing but the records (no duplicates, no strays).
    pre_scalars, _ = runs["pretrain"]
    assert sorted(pre_scalars["pretrain/loss"]) == [
        r["step"] for r in records if r["phase"] == "pretrain"
    ]
    assert pre_scalars["pretrain/learning_rate"] == {
        0: pytest.approx(config.pretrain.learning_rate)
    }
    # The chance level beside the metrics (RPL, 3³ grid: 26 classes).
    chance = list(pre_scalars["pretrain/chance_loss"].values())
    assert chance and all(v == pytest.approx(math.log(26), rel=1e-6) for v in chance)


@pytest.mark.slow
def test_finetune_test_scores_and_learning_rate(smoke_run):
    config, workdir, _, results = smoke_run
    scalars, _ = load_run(workdir / "tensorboard" / "finetune" / "probe")
    arm = results["arms"]["probe"]
    for k, v in arm["metrics"].items():
        if math.isfinite(v):
            tag = f"finetune/probe/test/{k}"
            assert scalars[tag] == {config.finetune.num_steps: pytest.approx(v, rel=1e-6)}, tag
    lr = scalars["finetune/probe/learning_rate"]
    assert lr == {0: pytest.approx(config.finetune.probe_learning_rate)}
    # results.json also says how the pretraining ended relative to chance.
    pretext = results["pretext"]
    assert pretext["chance_loss"] == pytest.approx(math.log(26))
    assert pretext["step"] == config.pretrain.num_steps and isinstance(pretext["near_chance"], bool)


@pytest.mark.slow
def test_pretext_inputs_and_segmentation_overlays_are_images(smoke_run):
    config, workdir, _, _ = smoke_run
    _, images = load_run(workdir / "tensorboard" / "pretrain")
    grid = decode(images["pretrain/inputs"][0])  # grey, stored as RGB by tensorboardX
    size, channels = config.data.size, 4  # BraTS phantom: t1 t1ce t2 flair
    assert grid.shape[:2] == (8 * (size + 1), channels * (size + 1))  # one row per sample
    assert grid.std() > 10
    _, images = load_run(workdir / "tensorboard" / "finetune" / "probe")
    (tag,) = [t for t in images if t.startswith("finetune/probe/overlay/")]
    picture = decode(images[tag][config.finetune.num_steps])
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.size > 0
    assert picture.std() > 10
    third = (picture.shape[1] - 4) // 3
    truth = picture[:, third + 2 : 2 * third + 2].astype(int)
    assert (np.abs(truth[..., 0] - truth[..., 1]) > 20).any()  # tumour labels in colour


def test_resumed_phase_purges_its_later_steps_only(tmp_path):
    first = loop.MetricWriter(tmp_path / "metrics.jsonl", tensorboard=True)
    first.drop_after("pretrain", 0)
    for step in (1, 2, 3, 4):
        first.write({"phase": "pretrain", "step": step, "loss": float(step), "time": 0.0})
    first.close()
    # Resumed from the checkpoint at step 2: steps 3 and 4 are logged again, differently.
    second = loop.MetricWriter(tmp_path / "metrics.jsonl", tensorboard=True)
    assert second.drop_after("pretrain", 2) == 2
    for step in (3, 4):
        second.write({"phase": "pretrain", "step": step, "loss": 10.0 * step, "time": 0.0})
    second.close()
    folder = tmp_path / "tensorboard" / "pretrain"
    assert len(list(folder.iterdir())) == 2  # two event files, none overwritten
    scalars, _ = load_run(folder)
    assert scalars["pretrain/loss"] == {1: 1.0, 2: 2.0, 3: 30.0, 4: 40.0}
    assert "time" not in {t.split("/")[-1] for t in scalars}


def test_writer_off_by_default_even_with_a_folder(tmp_path):
    (tmp_path / "tensorboard").mkdir()  # e.g. left by an earlier run with TensorBoard on
    writer = loop.MetricWriter(tmp_path / "metrics.jsonl")
    writer.drop_after("pretrain", 0)
    writer.write({"phase": "pretrain", "step": 1, "loss": 1.0})
    writer.close()
    assert not any((tmp_path / "tensorboard").iterdir())


def test_overlay_colours_only_labelled_pixels():
    image = np.linspace(-2, 2, 12 * 10).reshape(12, 10)
    true = np.zeros((12, 10), int)
    true[2:5, 3:6] = 1
    pred = np.zeros((12, 10), int)
    pred[6:9, 1:4] = 2
    out = tensorboard.overlay(image, true, pred, pad=2)
    assert out.shape == (12, 34, 3) and out.dtype == np.uint8
    plain, truth, guess = out[:, :10], out[:, 12:22], out[:, 24:34]
    grey = np.all(plain == plain[..., :1], axis=-1)
    assert grey.all()
    for panel, labels in ((truth, true), (guess, pred)):
        coloured = ~np.all(panel == panel[..., :1], axis=-1)
        np.testing.assert_array_equal(coloured, labels > 0)
        np.testing.assert_array_equal(panel[labels == 0], plain[labels == 0])


def test_montage_layout_and_contrast():
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(3, 6, 7, 5, 2)).astype(np.float32)
    slices = tensorboard.mid_slices(batch, spatial_dims=3, axis=2)
    np.testing.assert_array_equal(slices, batch[:, :, :, 2])
    grid = tensorboard.montage(slices, pad=1)
    assert grid.shape == (3 * 7, 2 * 8) and grid.dtype == np.uint8
    assert grid[7:13, 8:15].max() == 255 and grid[7:13, 8:15].min() == 0
    assert (grid[6] == 0).all()  # padding row
    assert (tensorboard.to_uint8(np.full((4, 4), 3.0)) == 0).all()  # constant: no NaNs


def test_writing_events_does_not_import_torch(tmp_path):
    """tensorboardX imports torch (seconds, its own thread runtimes) unless kept from it."""
    code = (
        "import sys; from ssl3d_jax import tensorboard; "
        f"w = tensorboard.Writer({str(tmp_path)!r}); "
        "w.scalars({'phase': 'p', 'step': 1, 'loss': 1.0}); w.close(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    scalars, _ = load_run(tmp_path)
    assert scalars == {"p/loss": {1: 1.0}}
