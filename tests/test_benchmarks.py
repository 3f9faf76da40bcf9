"""The pretext-batch benchmark compares like with like, and its script runs end to end.

`benchmarks/numpy_reference.py` re-implements each task's batch generation in the original's
NumPy style; `benchmarks/pretext_batches.py` times it against our jitted functions. A speed-up
only means something if both build the same thing, so for every task both outputs are checked
against the task's definition on tiny inputs (24³ x 4 channels, the `smoke` config's task
parameters, batch 2): every voxel of the test volumes holds its own flat index + 1, so each value
in an output names the voxel it was cut from. The jitted functions are shared with the
benchmark's `main` (`pretext_batches.build` is cached), which runs last at the same shapes.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from benchmarks import numpy_reference as ref
from benchmarks import pretext_batches as pb
from ssl3d_jax.tasks import jigsaw, rotation

SIZE, BATCH, EDGE, CHANNELS = "smoke", 2, 24, 4


@pytest.fixture(scope="module")
def volumes() -> np.ndarray:
    n = BATCH * EDGE**3 * CHANNELS
    return (np.arange(n, dtype=np.float32) + 1).reshape(BATCH, EDGE, EDGE, EDGE, CHANNELS)


def both(task: str, volumes: np.ndarray, seed: int = 0) -> list[list[np.ndarray]]:
    """Outputs of ours and of the NumPy reference (same signature asserted)."""
    ours_fn, ref_fn, _, edge = pb.build(task, SIZE)
    assert edge == EDGE
    ours = pb._as_tuple(ours_fn(jax.device_put(volumes), jax.random.key(seed)))
    np.random.seed(seed)
    refs = pb._as_tuple(ref_fn(volumes))
    ours, refs = [np.asarray(a) for a in ours], [np.asarray(a) for a in refs]
    assert pb.signature(ours) == pb.signature(refs)
    return [ours, refs]


def source_start(volumes: np.ndarray, b: int, patch: np.ndarray) -> np.ndarray:
    """Start corner in `volumes[b]` of an un-augmented patch `[p, p, p, C]`; asserts the patch
    is exactly that crop."""
    index = np.unravel_index(int(patch[0, 0, 0, 0]) - 1, volumes.shape)
    assert index[0] == b and index[4] == 0
    start = np.array(index[1:4])
    d, h, w = start
    p = patch.shape[:3]
    np.testing.assert_array_equal(patch, volumes[b, d : d + p[0], h : h + p[1], w : w + p[2]])
    return start


def grid_cell(start: np.ndarray, cell: int, jitter: int, side: int) -> int:
    """Row-major grid index of the cell a jittered patch starting at `start` belongs to."""
    i, offset = np.divmod(start, cell)
    assert (offset <= jitter).all(), f"offset {offset} beyond the jitter {jitter}"
    return int((i[0] * side + i[1]) * side + i[2])


def test_rpl_pairs_are_centre_and_labelled_query(volumes):
    c = pb.load_config("rpl", SIZE).rpl
    side, jitter = int(c.patches_per_side), int(c.jitter)
    centre, cell = side**3 // 2, EDGE // side
    for pairs, labels in both("rpl", volumes):
        assert labels.dtype == np.int32 and ((labels >= 0) & (labels < side**3 - 1)).all()
        for b in range(BATCH):
            query = labels[b] + (labels[b] >= centre)
            for slot, want in ((0, centre), (1, query)):
                start = source_start(volumes, b, pairs[b, slot])
                assert grid_cell(start, cell, jitter, side) == want


def test_jigsaw_slots_hold_the_labelled_permutation(volumes):
    c = pb.load_config("jigsaw", SIZE).jigsaw
    side, jitter = int(c.patches_per_side), int(c.jitter)
    perms = jigsaw.permutation_set(int(c.num_permutations), side**3, int(c.permutation_seed))
    for shuffled, labels in both("jigsaw", volumes):
        assert ((labels >= 0) & (labels < len(perms))).all()
        for b in range(BATCH):
            cells = [
                grid_cell(source_start(volumes, b, shuffled[b, s]), EDGE // side, jitter, side)
                for s in range(side**3)
            ]
            assert cells == perms[labels[b]].tolist()


def test_rotation_is_the_labelled_class(volumes):
    table = rotation.rotation_table(3)
    for rotated, labels in both("rotation", volumes):
        assert ((labels >= 0) & (labels < 10)).all()
        for b in range(BATCH):
            k, plane = table[labels[b]]
            np.testing.assert_array_equal(rotated[b], np.rot90(volumes[b], k, axes=plane))


def test_reference_rotation_table_is_ours():
    volume = np.arange(3 * 4 * 5 * 2).reshape(3, 4, 5, 2)
    cube = np.arange(4**3 * 2).reshape(4, 4, 4, 2)
    turned = []
    for label, (k, plane) in enumerate(rotation.rotation_table(3)):
        got = ref._rotate_class(cube, label)
        np.testing.assert_array_equal(got, np.rot90(cube, k, axes=plane))
        turned.append(got.tobytes())
        assert ref._rotate_class(volume, label).size == volume.size
    assert len(set(turned)) == 10


def check_cpc_patches(volumes, patches, c) -> int:
    """Asserts that every patch is its grid cell after the original's augmentation; returns how
    many were flipped along axis 0.

    Voxel values name their source, so a patch must be a translated (along axis 0 possibly
    mirrored) crop of its cell's neighbourhood, inside the centred `int(patch_crop * p)` box with
    zeros outside, shifted by at most jitter + patch crop room + volume crop room per axis.
    """
    side, jitter = int(c.patches_per_side), int(c.jitter)
    g = EDGE // side
    p = g - jitter
    cv = max(int(EDGE * float(c.volume_crop)), 1)
    cp = max(int(p * float(c.patch_crop)), 1)
    pad_v, pad_p = (EDGE - cv) // 2, (p - cp) // 2
    high = jitter + (p - cp) + (EDGE - cv)
    flipped = 0
    for b in range(BATCH):
        for n, cell in enumerate(np.ndindex(side, side, side)):
            patch, cell = patches[b, n], np.array(cell)
            box = np.zeros(patch.shape, bool)
            box[pad_p : pad_p + cp, pad_p : pad_p + cp, pad_p : pad_p + cp] = True
            assert not patch[~box].any()
            local = np.argwhere(patch != 0)
            assert len(local)
            src = np.stack(np.unravel_index(patch[patch != 0].astype(np.int64) - 1, volumes.shape))
            np.testing.assert_array_equal(src[0], b)
            np.testing.assert_array_equal(src[4], local[:, 3])
            for axis in (1, 2):
                shift = src[axis + 1] - local[:, axis]
                assert (shift == shift[0]).all()
                assert 0 <= shift[0] - cell[axis] * g + pad_p + pad_v <= high
            shift, mirror = src[1] - local[:, 0], src[1] + local[:, 0]
            plain = (shift == shift[0]).all() and (
                0 <= shift[0] - cell[0] * g + pad_p + pad_v <= high
            )
            mirrored = bool(c.flip_patches) and (mirror == mirror[0]).all()
            mirrored = mirrored and (
                -(p - cp) <= mirror[0] - cell[0] * g - (p - 1) - pad_p + pad_v <= jitter + EDGE - cv
            )
            assert plain or mirrored, (b, n)
            flipped += bool(mirrored and not plain)
    return flipped


def test_cpc_patches_are_augmented_grid_cells(volumes):
    c = pb.load_config("cpc", SIZE).cpc
    assert bool(c.flip_patches) and float(c.patch_crop) < 1 and float(c.volume_crop) < 1
    for (patches,) in both("cpc", volumes):
        flipped = check_cpc_patches(volumes, patches, c)
        # Each patch is flipped with probability 1/2: both kinds among 128 patches.
        assert 0 < flipped < BATCH * int(c.patches_per_side) ** 3


@pytest.mark.slow
def test_exemplar_negatives_are_other_volumes_positives(volumes):
    for anchors, positives, negatives, index in both("exemplar", volumes):
        assert index.dtype == np.int32
        assert sorted(index.tolist()) == list(range(BATCH))
        assert (index != np.arange(BATCH)).all()
        np.testing.assert_array_equal(negatives, positives[index])
        assert np.isfinite(anchors).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rotate_prob=1.0, rot90_prob=0.0, max_degrees=0.0),  # scipy rotate by 0°
        dict(zoom_prob=1.0, min_scale=1.0, max_scale=1.0),  # scipy zoom by 1, re-crop
        dict(intensity_prob=1.0, shift=0.0, contrast=0.0),  # c = 1, delta = 0
    ],
)
def test_reference_exemplar_paths_are_identities_at_zero_strength(volumes, kwargs):
    off = dict(flip_prob=0.0, rotate_prob=0.0, intensity_prob=0.0, zoom_prob=0.0)
    np.random.seed(0)
    anchors, positives, _, _ = ref.exemplar_triplets(
        volumes, augment_positive=False, **{**off, **kwargs}
    )
    np.testing.assert_array_equal(positives, volumes)
    np.testing.assert_allclose(anchors, volumes, rtol=1e-4, atol=0.5)


def test_exemplar_flips_agree(volumes):
    """With every flip on and everything else off, ours and the reference give the same anchor."""
    from ssl3d_jax.tasks import exemplar

    aug = dict(flip_prob=1.0, rotate_prob=0.0, intensity_prob=0.0, zoom_prob=0.0)
    flipped = volumes[:, ::-1, ::-1, ::-1]
    ours = jax.jit(
        lambda v, k: exemplar.make_triplets(v, k, augment_positive=False, augment_kwargs=aug)
    )(jax.device_put(volumes), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(ours[0]), flipped)
    np.random.seed(0)
    anchors, positives, _, _ = ref.exemplar_triplets(volumes, augment_positive=False, **aug)
    np.testing.assert_array_equal(anchors, flipped)
    np.testing.assert_array_equal(positives, volumes)


EXPECTED_OUTPUTS = {
    # The whole-volume grid (grid_fraction 1) with the smoke configs' jitter of 1: 8³ cells.
    "rpl": [[2, 2, 7, 7, 7, 4, "float32"], [2, "int32"]],
    "rotation": [[2, 24, 24, 24, 4, "float32"], [2, "int32"]],
    "jigsaw": [[2, 27, 7, 7, 7, 4, "float32"], [2, "int32"]],
    "cpc": [[2, 64, 6, 6, 6, 4, "float32"]],
    "exemplar": [[2, 24, 24, 24, 4, "float32"]] * 3 + [[2, "int32"]],
}


def test_main_writes_json_and_markdown_rows(tmp_path):
    argv = ["--sizes", SIZE, "--batch", str(BATCH), "--repeats", "1", "--out", str(tmp_path)]
    result = pb.main(argv)
    saved = json.loads((tmp_path / "pretext_batches.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["command"] == "python benchmarks/pretext_batches.py " + " ".join(argv)
    assert saved["machine"]["device"].startswith("cpu")
    assert [r["task"] for r in saved["rows"]] == list(pb.TASKS)
    markdown = (tmp_path / "pretext_batches.md").read_text()
    assert saved["command"] in markdown and saved["machine"]["cpu"] in markdown
    for row in saved["rows"]:
        assert row["size"] == SIZE and row["batch"] == BATCH
        assert row["input"] == [BATCH, EDGE, EDGE, EDGE, CHANNELS, "float32"]
        assert row["outputs"] == EXPECTED_OUTPUTS[row["task"]]
        for side in ("ours", "numpy"):
            stats = row[side]
            assert stats["repeats"] == 1 and stats["median_ms"] > 0
            assert stats["volumes_per_s"] == pytest.approx(
                BATCH / (stats["median_ms"] / 1e3), rel=0.01
            )
        assert row["speedup"] == pytest.approx(
            row["numpy"]["median_ms"] / row["ours"]["median_ms"], abs=0.01
        )
        assert f"| {row['task']} | {SIZE} | {BATCH} × {EDGE}×{EDGE}×{EDGE}×{CHANNELS} |" in (
            markdown
        )


def test_main_rejects_unknown_task(tmp_path):
    with pytest.raises(SystemExit):
        pb.main(["--tasks", "rpl,colour", "--out", str(tmp_path)])


def test_run_all_assembles_every_fragment(tmp_path):
    from benchmarks import run_all

    text = run_all.assemble(str(tmp_path / "RESULTS.md"))
    assert (tmp_path / "RESULTS.md").read_text() == text
    for name, (_, md) in run_all.BENCHMARKS.items():
        first = next(line for line in open(md, encoding="utf-8") if line.startswith("#"))
        # every fragment's title, nested at level 2 under the file's title
        assert "\n## " + first.lstrip("#").strip() + "\n" in text, name
    assert text.startswith("# Benchmark results\n")
