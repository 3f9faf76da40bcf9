"""Preprocessing semantics (resampling, foreground crop, CT window, fitting, random crops), the
disk cache of preprocessed cases, and the progress bar."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle

import grain
import numpy as np
import pytest

from ssl3d_jax import progress
from ssl3d_jax.data import cache, preprocess
from ssl3d_jax.errors import ConfigError, DataError

SHAPE = (20, 16, 12)
SPACING = (1.2, 1.0, 2.0)


def _affine(spacing=SPACING):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = [-10.0, 5.0, 3.0]
    return a


def make_record(seed=0, shape=SHAPE, spacing=SPACING, channels=2, case_index=0):
    """A head-like MRI record: ellipsoid foreground (non-zero), two label blobs inside it."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    centre = (np.asarray(shape) - 1) / 2
    head = (((grid - centre) / (np.asarray(shape) * 0.38)) ** 2).sum(-1) <= 1
    image = np.zeros((*shape, channels), np.float32)
    image[head] = 100 + 20 * rng.standard_normal((head.sum(), channels))
    label = np.zeros(shape, np.int32)
    c1 = centre + np.array([-3, 2, 0]) + rng.integers(-1, 2, 3)
    label[(((grid - c1) / 3.5) ** 2).sum(-1) <= 1] = 1
    label[(((grid - (centre + [3, -2, 1])) / 2.5) ** 2).sum(-1) <= 1] = 3
    label &= np.where(head, -1, 0)  # labels only inside the head
    return {
        "image": image,
        "label": label,
        "case_index": np.int32(case_index),
        "affine": _affine(spacing),
    }


# ----------------------------------------------------------------------------------------------
# Preprocess steps


def test_ct_window_clip_and_scale():
    hu = np.full((10, 10, 10, 1), -1000.0, np.float32)  # air
    hu[2:8, 2:8, 2:8, 0] = 70.0  # soft tissue, mid-window
    hu[4, 4, 4, 0] = 1000.0  # bone, above the window
    hu[3, 3, 3, 0] = -100.0  # window bottom
    hu[5, 5, 5, 0] = 240.0  # window top
    t = preprocess.Preprocess(size=4, mode="none", modality="ct", crop_foreground=False)
    out = t.map({"image": hu, "case_index": 0, "affine": np.eye(4)})["image"][..., 0]
    assert out.shape == (10, 10, 10)
    assert out[4, 4, 4] == 1.0 and out[0, 0, 0] == 0.0
    assert out[3, 3, 3] == 0.0 and out[5, 5, 5] == 1.0
    np.testing.assert_allclose(out[2, 2, 2], 170 / 340, rtol=1e-6)
    assert out.min() >= 0 and out.max() <= 1
    # The normalisation key does not change CT (HU keep their meaning).
    t2 = preprocess.Preprocess(
        size=4, mode="none", modality="ct", crop_foreground=False, normalization="minmax"
    )
    np.testing.assert_array_equal(t2.map({"image": hu, "case_index": 0})["image"][..., 0], out)
    assert t.settings() == t2.settings()


def test_ct_body_crop_ignores_table():
    hu = np.full((16, 16, 16, 1), -1000.0, np.float32)
    hu[3:11, 4:12, 2:14] = 40.0  # body
    hu[14:16, 1:15, 0:16] = 300.0  # scanner table, a separate region
    t = preprocess.Preprocess(size=4, mode="none", modality="ct", keep_geometry=True)
    out = t.map({"image": hu, "case_index": 0})
    assert out["geometry"]["crop_box"] == [[3, 11], [4, 12], [2, 14]]
    assert out["image"].shape == (8, 8, 12, 1)


def test_spacing_output_shape_and_labels():
    rec = make_record()
    target = (1.5, 1.5, 1.5)
    t = preprocess.Preprocess(
        size=4, mode="none", spacing=target, crop_foreground=False, keep_geometry=True
    )
    out = t.map(rec)
    expected = tuple(int(round(n * s / g)) for n, s, g in zip(SHAPE, SPACING, target))
    assert expected == (16, 11, 16)
    assert out["image"].shape == (*expected, 2) and out["label"].shape == expected
    assert out["geometry"]["resampled_shape"] == list(expected)
    np.testing.assert_allclose(out["geometry"]["spacing"], SPACING)
    # Nearest-neighbour labels: every class survives, no value appears that was not there.
    assert set(np.unique(out["label"]).tolist()) == {0, 1, 3}
    # Isotropic spacing given as one number.
    one = preprocess.Preprocess(size=4, mode="none", spacing=1.5, crop_foreground=False)
    np.testing.assert_array_equal(one.map(rec)["label"], out["label"])


@pytest.mark.parametrize("mode", preprocess.RESIZE_MODES)
@pytest.mark.parametrize("spacing", [None, (1.5, 1.1, 1.7)])
def test_labels_never_gain_values(mode, spacing):
    rec = make_record(seed=1)
    t = preprocess.Preprocess(size=10, mode=mode, spacing=spacing)
    out = t.map(rec)
    assert out["label"].dtype == np.int32 and out["image"].dtype == np.float32
    assert set(np.unique(out["label"]).tolist()) <= {0, 1, 3}
    if mode != "none":
        assert out["image"].shape == (10, 10, 10, 2)
    else:
        assert all(n >= 10 for n in out["image"].shape[:3])


def test_crop_box_contains_foreground():
    rec = make_record(seed=2)
    t = preprocess.Preprocess(size=8, mode="none", keep_geometry=True)
    out = t.map(rec)
    box = out["geometry"]["crop_box"]
    fg = np.any(rec["image"] != 0, -1)
    inside = np.zeros_like(fg)
    inside[tuple(slice(a, b) for a, b in box)] = True
    assert fg.sum() > 0 and not (fg & ~inside).any()  # all foreground kept
    for ax, (a, b) in enumerate(box):  # and the box is tight
        other = tuple(i for i in range(3) if i != ax)
        hit = np.nonzero(fg.any(other))[0]
        assert (a, b) == (hit[0], hit[-1] + 1)
    # Mode "none" without resampling: exactly the cropped voxels (label) / shape.
    crop = tuple(slice(a, b) for a, b in box)
    assert out["image"].shape[:3] == tuple(b - a for a, b in box)
    np.testing.assert_array_equal(out["label"], rec["label"][crop])
    assert json.loads(json.dumps(out["geometry"])) == out["geometry"]


def test_mri_zscore_over_foreground():
    rec = make_record(seed=3)
    out = preprocess.Preprocess(size=8, mode="none", normalization="zscore").map(rec)
    img = out["image"]
    fg = np.any(img != 0, -1)
    np.testing.assert_allclose(img[fg].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(img[fg].std(0), 1, atol=1e-3)


def test_mode_none_pads_to_window():
    rec = make_record(shape=(6, 14, 9))
    t = preprocess.Preprocess(size=12, mode="none", crop_foreground=False, keep_geometry=True)
    out = t.map(rec)
    assert out["image"].shape == (12, 14, 12, 2)
    # Centred padding with background; the volume itself unchanged.
    assert out["geometry"]["fit"]["dst"] == [[3, 9], [0, 14], [1, 10]]
    np.testing.assert_array_equal(out["label"][3:9, :, 1:10], rec["label"])
    assert out["label"][:3].sum() == 0 and np.all(out["image"][:3] == 0)


def test_settings_and_bad_config():
    t = preprocess.Preprocess(size=16, spacing=(1, 1, 1))
    s = t.settings()
    assert json.loads(json.dumps(s)) == s
    assert s != preprocess.Preprocess(size=16, spacing=(1, 1, 2)).settings()
    assert s != preprocess.Preprocess(size=16, crop_foreground=False, spacing=(1, 1, 1)).settings()
    with pytest.raises(ConfigError, match="config.data.spacing"):
        preprocess.Preprocess(size=16, spacing=(1, -1, 1))
    with pytest.raises(ConfigError, match="config.data.ct_window"):
        preprocess.Preprocess(size=16, ct_window=(240, -100))
    with pytest.raises(ConfigError, match="config.data.resize_mode"):
        preprocess.Preprocess(size=16, mode="bogus")
    assert pickle.loads(pickle.dumps(t)).settings() == s


@pytest.mark.parametrize("normalization, value", [("zscore", -5.0), ("minmax", -1.0)])
@pytest.mark.parametrize(
    "mode, crop", [("resize", True), ("crop_pad", False), ("crop_pad", True), ("none", False)]
)
def test_background_value(normalization, value, mode, crop):
    """background='value': background (padding included) is the documented constant, below every
    foreground voxel; the foreground is exactly the 'zero' output; the cache key differs."""
    rec = make_record(seed=1)
    kw = dict(size=16, mode=mode, normalization=normalization, crop_foreground=crop)
    zero = preprocess.Preprocess(**kw).map(rec)["image"]
    out = preprocess.Preprocess(**kw, background="value").map(rec)["image"]
    assert out.shape == zero.shape
    background = out == value
    assert background.any() and (~background).any()
    assert (background.all(axis=-1) == background.any(axis=-1)).all()  # all channels at once
    np.testing.assert_array_equal(out[~background], zero[~background])  # foreground untouched
    assert out[~background].min() > value  # no foreground voxel takes the value
    if mode == "resize":  # the foreground mask is resized by nearest neighbour, as labels
        fg = preprocess.foreground_mask(rec["image"])
        box = tuple(slice(lo, hi) for lo, hi in preprocess._bbox(fg))
        want = preprocess.resample(fg[box], (16, 16, 16), order=0)
        np.testing.assert_array_equal(background.all(axis=-1), ~want)
    else:  # no interpolation: background is exactly where 'zero' gave 0 in every channel
        np.testing.assert_array_equal(background.all(axis=-1), (zero == 0).all(axis=-1))


def test_background_settings_and_errors():
    zero = preprocess.Preprocess(size=16)
    value = preprocess.Preprocess(size=16, background="value")
    assert zero.settings() != value.settings() and value.settings()["background"] == "value"
    assert cache.cache_key({}, zero.settings(), []) != cache.cache_key({}, value.settings(), [])
    # 'zero' is the output before the option existed: its cache key is unchanged.
    assert "background" not in zero.settings()
    assert "background" not in preprocess.Preprocess(size=16, background="zero").settings()
    # CT has no MRI foreground normalisation: the option does not apply.
    ct = dict(size=16, modality="ct")
    assert (
        preprocess.Preprocess(**ct).settings()
        == preprocess.Preprocess(**ct, background="value").settings()
    )
    with pytest.raises(ConfigError, match="config.data.background"):
        preprocess.Preprocess(size=16, background="mask")


def test_background_value_below_a_dark_foreground():
    """A channel whose z-scored foreground reaches -5 gets its background 1 below its minimum."""
    image = np.zeros((6, 6, 6, 2), np.float32)
    image[1:5, 1:5, 1:5] = 100.0
    image[1, 1, 1, 0] = 1.0  # one very dark foreground voxel in a tight distribution: z < -5
    fill = preprocess.background_value(
        preprocess.normalize_intensity(image), preprocess.foreground_mask(image), method="zscore"
    )
    z = preprocess.normalize_intensity(image)
    assert z[1, 1, 1, 0] < -5 and fill[0] == pytest.approx(z[1, 1, 1, 0] - 1) and fill[1] == -5


# ----------------------------------------------------------------------------------------------
# RandomCrop


def test_random_crop_deterministic_and_foreground():
    rec = preprocess.Preprocess(size=8, mode="none", crop_foreground=False).map(make_record())
    crop = preprocess.RandomCrop(8, foreground_prob=1.0)
    for seed in range(5):
        a = crop.random_map(rec, np.random.default_rng(seed))
        b = crop.random_map(rec, np.random.default_rng(seed))
        assert a["image"].shape == (8, 8, 8, 2) and a["label"].shape == (8, 8, 8)
        np.testing.assert_array_equal(a["image"], b["image"])
        assert (a["label"] > 0).any()  # centred on a tumour voxel
    # Uniform crops differ across seeds and stay inside the volume.
    uni = preprocess.RandomCrop(8, foreground_prob=0.0)
    crops = [uni.random_map(rec, np.random.default_rng(s))["image"].tobytes() for s in range(5)]
    assert len(set(crops)) > 1
    # Inside a grain pipeline: same seed, same crops.
    ds = grain.MapDataset.source([rec] * 4).seed(7).random_map(crop)
    again = grain.MapDataset.source([rec] * 4).seed(7).random_map(crop)
    for i in range(4):
        np.testing.assert_array_equal(ds[i]["image"], again[i]["image"])
    # Volumes smaller than S are padded first.
    small = crop.random_map(
        {"image": np.ones((5, 9, 3, 1), np.float32), "label": np.ones((5, 9, 3), np.int32)},
        np.random.default_rng(0),
    )
    assert small["image"].shape == (8, 8, 8, 1) and small["image"].sum() == 5 * 8 * 3


def test_random_crop_oversamples_foreground():
    rec = preprocess.Preprocess(size=6, mode="none", crop_foreground=False).map(make_record())
    hits = []
    for p in (0.0, 1.0):
        crop = preprocess.RandomCrop(6, foreground_prob=p)
        hits.append(
            np.mean(
                [
                    (crop.random_map(rec, np.random.default_rng(s))["label"] > 0).any()
                    for s in range(40)
                ]
            )
        )
    assert hits[1] == 1.0 and hits[0] < hits[1]


# ----------------------------------------------------------------------------------------------
# Disk cache


class ListSource:
    def __init__(self, records, fail_at=None):
        self.records = records
        self.fail_at = fail_at
        self.reads = 0

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError(f"simulated crash at case {i}")
        self.reads += 1
        return self.records[i]


class CountingPreprocess:
    def __init__(self, t):
        self.t = t
        self.calls = 0

    def settings(self):
        return self.t.settings()

    def map(self, record):
        self.calls += 1
        return self.t.map(record)


N_CASES = 5


@pytest.fixture
def records():
    return [make_record(seed=i, shape=(12, 14, 10), case_index=i) for i in range(N_CASES)]


@pytest.fixture
def files(tmp_path):
    paths = []
    for i in range(N_CASES):
        p = tmp_path / "raw" / f"case{i}.nii.gz"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x" * (i + 1))
        paths.append(p)
    return paths


def _tmp_files(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_cache_key(files):
    t = preprocess.Preprocess(size=8, mode="none", keep_geometry=True)
    info = {"channels": ["t1", "t2"], "label_values": [0, 1, 2, 4]}
    key = cache.cache_key(info, t.settings(), files)
    assert len(key) == 64
    assert cache.cache_key(dict(info), dict(t.settings()), list(files)) == key
    other = preprocess.Preprocess(size=8, mode="none", spacing=1.0).settings()
    assert cache.cache_key(info, other, files) != key
    assert cache.cache_key({**info, "label_values": [0, 1, 2, 3]}, t.settings(), files) != key
    st = files[2].stat()
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched
    assert cache.cache_key(info, t.settings(), files) != key
    with pytest.raises(DataError, match="missing.nii.gz"):
        cache.cache_key(info, t.settings(), [files[0].parent / "missing.nii.gz"])


def test_build_cache_and_read(tmp_path, records, files):
    t = preprocess.Preprocess(size=8, mode="none", keep_geometry=True)
    key = cache.cache_key({"channels": ["a", "b"]}, t.settings(), files)
    names = [f"case{i}" for i in range(N_CASES)]
    counting = CountingPreprocess(t)
    folder = cache.build_cache(
        ListSource(records), counting, tmp_path / "cache", key=key, names=names, progress=False
    )
    assert counting.calls == N_CASES and folder.endswith(key)
    settings = json.loads((tmp_path / "cache" / key / "settings.json").read_text())
    assert settings["settings"] == t.settings() and settings["names"] == names

    # Second build: nothing read, nothing preprocessed.
    again, src = CountingPreprocess(t), ListSource(records)
    assert cache.build_cache(src, again, tmp_path / "cache", key=key, names=names) == folder
    assert again.calls == 0 and src.reads == 0

    plain = preprocess.Preprocess(size=8, mode="none")
    cached = cache.CachedArraysSource(folder, names)
    cached = pickle.loads(pickle.dumps(cached))  # goes to grain workers
    with_geo = cache.CachedArraysSource(folder, names, with_geometry=True)
    assert len(cached) == N_CASES
    for i in range(N_CASES):
        direct, rec = plain.map(records[i]), cached[i]
        assert rec.keys() == direct.keys()
        for k in direct:
            np.testing.assert_array_equal(rec[k], direct[k])
            assert rec[k].dtype == direct[k].dtype
        assert type(rec["image"]) is np.ndarray  # a copy, not a memory map
        assert with_geo[i]["geometry"] == t.map(records[i])["geometry"]
    unlabelled = cache.CachedArraysSource(folder, names, with_label=False)[0]
    assert "label" not in unlabelled
    assert not _tmp_files(tmp_path / "cache")


def test_cached_reads_parse_npy_headers_one_thread_at_a_time(tmp_path, records, files, monkeypatch):
    """grain reads records on several threads; numpy's header parse (ast.literal_eval) is not
    thread-safe in CPython 3.11 (python/cpython#106905: a sweep died of it), so the cache opens
    its arrays under a lock. The wrapped np.load sleeps inside: without the lock threads overlap.
    """
    import threading
    import time

    t = preprocess.Preprocess(size=8, mode="none", keep_geometry=True)
    key = cache.cache_key({}, t.settings(), files)
    names = [f"case{i}" for i in range(N_CASES)]
    folder = cache.build_cache(
        ListSource(records), t, tmp_path, key=key, names=names, progress=False
    )
    src = cache.CachedArraysSource(folder, names)
    inside, most, guard, real_load = [0], [0], threading.Lock(), np.load

    def slow_load(*args, **kwargs):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.02)
        try:
            return real_load(*args, **kwargs)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(np, "load", slow_load)
    out = {}
    threads = [
        threading.Thread(target=lambda i=i: out.__setitem__(i, src[i % N_CASES])) for i in range(6)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert most[0] == 1
    for i, rec in out.items():
        expected = t.map(records[i % N_CASES])["image"]
        np.testing.assert_array_equal(rec["image"], expected)


def test_build_cache_resumes_after_crash(tmp_path, records, files):
    t = preprocess.Preprocess(size=8, mode="crop_pad", keep_geometry=True)
    key = cache.cache_key({}, t.settings(), files)
    names = [f"case{i}" for i in range(N_CASES)]
    first = CountingPreprocess(t)
    with pytest.raises(RuntimeError, match="case 3"):
        cache.build_cache(
            ListSource(records, fail_at=3), first, tmp_path, key=key, names=names, progress=False
        )
    assert first.calls == 3
    with pytest.raises(DataError, match="incomplete"):
        cache.CachedArraysSource(tmp_path / key, names)
    second = CountingPreprocess(t)
    folder = cache.build_cache(
        ListSource(records), second, tmp_path, key=key, names=names, progress=False
    )
    assert second.calls == N_CASES - 3
    assert not _tmp_files(tmp_path)
    src = cache.CachedArraysSource(folder, names)
    for i in range(N_CASES):
        np.testing.assert_array_equal(src[i]["image"], t.map(records[i])["image"])
    # A half-written file left by a killed writer is ignored and (once stale) removed.
    stale = tmp_path / key / ".case0.image.npy.abc.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    cache.build_cache(ListSource(records), second, tmp_path, key=key, names=names)
    assert not stale.exists() and second.calls == N_CASES - 3


def test_build_cache_needs_geometry(tmp_path, records):
    t = preprocess.Preprocess(size=8, mode="none")
    with pytest.raises(ValueError, match="keep_geometry"):
        cache.build_cache(
            ListSource(records), t, tmp_path, key="k", names=list("abcde"), progress=False
        )


# ----------------------------------------------------------------------------------------------
# Progress bar


def test_progress_bar_on_terminal(monkeypatch):
    monkeypatch.setattr(progress, "_REDRAW_S", 0.0)
    stream = io.StringIO()
    with progress.Progress(10, "train", enabled=True, stream=stream) as bar:
        for _ in range(3):
            bar.update(loss=0.31)
        line = bar.format()
    text = stream.getvalue()
    assert line.startswith("train  3/10 [30%] ") and "it/s" in line and "ETA" in line
    assert line.endswith("loss=0.31")
    assert text.count("\r") == 4 and text.endswith("\n")


def test_progress_bar_off_terminal_logs_deciles(caplog):
    stream = io.StringIO()  # not a TTY: disabled automatically
    with caplog.at_level(logging.INFO, logger="ssl3d_jax.progress"):
        with progress.Progress(200, "preprocess", stream=stream) as bar:
            for _ in range(200):
                bar.update()
    assert stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert 1 <= len(lines) <= 10 and lines[-1].startswith("preprocess  200/200 [100%]")
