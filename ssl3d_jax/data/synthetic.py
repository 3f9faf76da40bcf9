"""Small generated datasets in each layout of `datasets`, for tests and demos.

Every writer is deterministic in its arguments (case i depends only on (seed, i)), writes tiny
volumes by default (24 x 28 x 20 voxels) with anisotropic, oblique and axis-flipped affines (so
readers must reorient), and makes the labels mean something:
  * BraTS / Decathlon brain: the MRI phantom of `phantom.py` (nested tumour regions), stored with
    each format's own label codes and channel order;
  * Decathlon pancreas: a CT abdomen in Hounsfield units (air -1000, fat -100, soft tissue 40,
    pancreas ~100, tumour ~60, bone 700+), so a HU-window test has values on both sides;
  * nifti folder: unlabelled scans of mixed shapes, `.nii` and `.nii.gz`, nested folders;
  * images: RGB "fundus" PNGs whose grade is the number of bright blobs, plus `trainLabels.csv`.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib

import numpy as np

from ssl3d_jax.data import phantom
from ssl3d_jax.data.brats import MODALITIES
from ssl3d_jax.data.nifti import save_nifti

SHAPE = (24, 28, 20)
SPACING = (1.2, 1.0, 1.5)
CT_SPACING = (0.8, 0.9, 2.5)

# Decathlon Task01_BrainTumour conventions (from its dataset.json).
BRAIN_MODALITIES = ("FLAIR", "T1w", "t1gd", "T2w")
BRAIN_LABELS = ("background", "edema", "non-enhancing tumor", "enhancing tumour")
# Decathlon channel -> index into phantom's MODALITIES (t1, t1ce, t2, flair).
_BRAIN_FROM_PHANTOM = (3, 0, 1, 2)
# BraTS on-disk label -> Decathlon label: oedema 2 -> 1, necrotic / non-enhancing 1 -> 2, ET 4 -> 3.
_BRATS_TO_DECATHLON = np.array([0, 2, 1, 0, 3], np.uint8)

PANCREAS_LABELS = ("background", "pancreas", "cancer")
HU = {"air": -1000.0, "fat": -100.0, "soft": 40.0, "pancreas": 100.0, "tumour": 60.0}
HU_BONE = (700.0, 1200.0)  # cortical rim up to the top, marrow at the bottom


def _store_las(a: np.ndarray) -> np.ndarray:
    """RAS voxel order -> the LAS order of `phantom.phantom_affine` (axis 0 flipped)."""
    return np.ascontiguousarray(a[::-1])


def _decathlon_json(root: pathlib.Path, *, name, modalities, labels, train, test, **extra):
    doc = {
        "name": name,
        "description": "synthetic, written by ssl3d_jax.data.synthetic",
        "tensorImageSize": "4D" if len(modalities) > 1 else "3D",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": {str(i): n for i, n in enumerate(labels)},
        "numTraining": len(train),
        "numTest": len(test),
        "training": [
            {"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in train
        ],
        "test": [f"./imagesTs/{n}.nii.gz" for n in test],
        **extra,
    }
    (root / "dataset.json").write_text(json.dumps(doc, indent=4))


def _macos_junk(path: pathlib.Path) -> None:
    """A `._<name>` AppleDouble file beside `path`, as in the Decathlon tar files."""
    (path.parent / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07" + bytes(60))


def write_brats(
    root: str | os.PathLike,
    *,
    num_cases: int = 3,
    seed: int = 0,
    shape=SHAPE,
    spacing=SPACING,
    naming: str = "2021",
) -> list[pathlib.Path]:
    """BraTS-layout phantom cases with real release names.

    naming: "2021": `BraTS2021_0000i/BraTS2021_0000i_{t1,t1ce,t2,flair,seg}.nii.gz`;
      "2020": `BraTS20_Training_00i/...`; "2018": `HGG/Brats18_2013_i_1/...` and `LGG/...` (odd
      cases), as in the 2018 / 2019 releases.
    Returns the case folders in case-name order.
    """
    root = pathlib.Path(root)
    affine = phantom.phantom_affine(shape, spacing)
    folders = []
    for i in range(num_cases):
        if naming == "2021":
            name, group = f"BraTS2021_{i:05d}", ""
        elif naming == "2020":
            name, group = f"BraTS20_Training_{i + 1:03d}", ""
        elif naming == "2018":
            name, group = f"Brats18_2013_{i}_1", ("HGG", "LGG")[i % 2]
        else:
            raise ValueError(f"naming={naming!r}: expected '2021', '2020' or '2018'.")
        folder = root / group / name
        image, seg = phantom.make_phantom_case(shape, spacing, seed=seed, index=i)
        for c, m in enumerate(MODALITIES):
            vol = np.clip(np.rint(image[..., c]), 0, 32767).astype(np.int16)
            save_nifti(folder / f"{name}_{m}.nii.gz", _store_las(vol), affine)
        save_nifti(folder / f"{name}_seg.nii.gz", _store_las(seg), affine)
        folders.append(folder)
    return sorted(folders, key=lambda p: p.name)


def write_decathlon_brain(
    root: str | os.PathLike,
    num_cases: int = 4,
    seed: int = 0,
    *,
    num_test: int = 1,
    shape=SHAPE,
    spacing=SPACING,
) -> pathlib.Path:
    """A Task01_BrainTumour-like dataset: 4D float32 images [X, Y, Z, 4] (FLAIR, T1w, t1gd,
    T2w on the last axis), uint8 labels 0 background, 1 edema, 2 non-enhancing tumour,
    3 enhancing tumour, `num_test` unlabelled test images, and macOS `._` junk files.

    Returns `root`.
    """
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    affine = phantom.phantom_affine(shape, spacing)
    train, test = [], []
    for i in range(num_cases + num_test):
        name = f"BRATS_{i + 1:03d}"
        image, seg = phantom.make_phantom_case(shape, spacing, seed=seed, index=i)
        image = image[..., list(_BRAIN_FROM_PHANTOM)].astype(np.float32)
        if i < num_cases:
            path = root / "imagesTr" / f"{name}.nii.gz"
            save_nifti(
                root / "labelsTr" / f"{name}.nii.gz", _store_las(_BRATS_TO_DECATHLON[seg]), affine
            )
            train.append(name)
        else:
            path = root / "imagesTs" / f"{name}.nii.gz"
            test.append(name)
        save_nifti(path, _store_las(image), affine)
        if i == 0:
            _macos_junk(path)
    _decathlon_json(
        root,
        name="BRATS",
        modalities=BRAIN_MODALITIES,
        labels=BRAIN_LABELS,
        train=train,
        test=test,
        reference="synthetic phantom",
    )
    return root


def make_ct_case(shape=SHAPE, spacing=CT_SPACING, *, seed: int = 0, index: int = 0):
    """One CT abdomen in RAS voxel order.

    Returns:
      (hu float32 [D, H, W] in Hounsfield units, label uint8 [D, H, W]: 0 background,
       1 pancreas, 2 tumour (inside the pancreas)).
    Axes: 0 right->left... (R-L), 1 posterior->anterior, 2 inferior->superior.
    """
    rng = np.random.default_rng([seed, index, 7])
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing, np.float64)
    coords = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * sp for n, sp in zip(shape, spacing)]
    x, y, z = np.meshgrid(*coords, indexing="ij", sparse=True)
    half = np.asarray(shape) * spacing / 2
    # Body: an elliptic cylinder along z, fat layer beneath the skin.
    ax, ay = half[0] * rng.uniform(0.80, 0.90), half[1] * rng.uniform(0.70, 0.85)
    r = np.sqrt((x / ax) ** 2 + (y / ay) ** 2) + 0 * z
    hu = np.full(shape, HU["air"], np.float32)
    hu[r < 1.0] = HU["fat"]
    hu[r < 0.82] = HU["soft"]
    # Spine: a vertebral body posterior of centre, bright cortical rim, dimmer marrow.
    sx, sy = 0.0, -0.55 * ay
    rs = np.sqrt((x - sx) ** 2 + (y - sy) ** 2) + 0 * z
    rad = max(0.16 * ax, 2.0 * float(spacing[:2].max()))
    hu[rs < rad] = HU_BONE[1]
    hu[rs < 0.6 * rad] = HU_BONE[0]
    # Pancreas: an elongated ellipsoid left-right, anterior of the spine.
    c = np.array([rng.uniform(-0.15, 0.15) * ax, rng.uniform(0.0, 0.2) * ay, 0.0])
    pa = np.array(
        [0.5 * ax, max(0.22 * ay, 2.5 * spacing[1]), max(0.35 * half[2], 1.5 * spacing[2])]
    )
    rp = ((x - c[0]) / pa[0]) ** 2 + ((y - c[1]) / pa[1]) ** 2 + ((z - c[2]) / pa[2]) ** 2
    label = np.zeros(shape, np.uint8)
    label[rp < 1.0] = 1
    # Tumour: a sphere inside the pancreas, at least ~2 voxels across.
    tc = c + np.array([rng.uniform(-0.4, 0.4) * pa[0], 0.0, 0.0])
    tr = max(0.6 * pa[1], 0.7 * float(spacing.max()))
    rt = np.sqrt((x - tc[0]) ** 2 + (y - tc[1]) ** 2 + (z - tc[2]) ** 2)
    label[(rt < tr) & (label == 1)] = 2
    hu[label == 1] = HU["pancreas"]
    hu[label == 2] = HU["tumour"]
    body = r < 1.0
    hu = hu + np.where(body, rng.normal(0, 8.0, shape), rng.normal(0, 2.0, shape)).astype(
        np.float32
    )
    return hu.astype(np.float32), label


def write_decathlon_pancreas(
    root: str | os.PathLike,
    num_cases: int = 3,
    seed: int = 0,
    *,
    num_test: int = 1,
    shape=SHAPE,
    spacing=CT_SPACING,
) -> pathlib.Path:
    """A Task07_Pancreas-like dataset: 3D int16 CT in HU, uint8 labels 0 background,
    1 pancreas, 2 cancer, `num_test` unlabelled test images. Returns `root`."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    affine = phantom.phantom_affine(shape, spacing)
    train, test = [], []
    for i in range(num_cases + num_test):
        name = f"pancreas_{i + 1:03d}"
        hu, label = make_ct_case(shape, spacing, seed=seed, index=i)
        vol = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
        if i < num_cases:
            path = root / "imagesTr" / f"{name}.nii.gz"
            save_nifti(root / "labelsTr" / f"{name}.nii.gz", _store_las(label), affine)
            train.append(name)
        else:
            path = root / "imagesTs" / f"{name}.nii.gz"
            test.append(name)
        save_nifti(path, _store_las(vol), affine)
    _decathlon_json(
        root,
        name="Pancreas",
        modalities=("CT",),
        labels=PANCREAS_LABELS,
        train=train,
        test=test,
    )
    return root


NIFTI_SHAPES = ((24, 28, 20), (20, 24, 18), (22, 26, 16), (18, 22, 20))


def write_nifti_folder(
    root: str | os.PathLike,
    num_files: int = 4,
    seed: int = 0,
    *,
    channels: int = 1,
    shapes=NIFTI_SHAPES,
) -> list[pathlib.Path]:
    """Unlabelled phantom MRI scans of mixed shapes (cycling through `shapes`) and spacings,
    alternately `.nii.gz` and `.nii`, every other one in a sub-folder `sub/`; 3D when
    `channels == 1`, else 4D [X, Y, Z, channels] (the phantom's first `channels` modalities).

    Returns the written files, sorted.
    """
    root = pathlib.Path(root)
    if not 1 <= channels <= len(MODALITIES):
        raise ValueError(f"channels={channels}: expected 1..{len(MODALITIES)}.")
    files = []
    for i in range(num_files):
        shape = tuple(shapes[i % len(shapes)])
        spacing = (1.0 + 0.1 * i, 1.0, 1.2 + 0.2 * (i % 3))
        image, _ = phantom.make_phantom_case(shape, spacing, seed=seed, index=i)
        vol = image[..., :channels] if channels > 1 else image[..., 0]
        suffix = ".nii.gz" if i % 2 == 0 else ".nii"
        path = root / ("sub" if i % 2 else "") / f"scan_{i:03d}{suffix}"
        save_nifti(path, _store_las(vol.astype(np.float32)), phantom.phantom_affine(shape, spacing))
        files.append(path)
    return sorted(files)


def make_fundus_image(size: int = 32, *, grade: int, seed: int = 0, index: int = 0) -> np.ndarray:
    """uint8 [size, size * 5 // 4, 3]: an orange disc on black with `grade` bright yellow blobs.

    The blobs sit inside the centred square, so a centre crop keeps them all.
    """
    rng = np.random.default_rng([seed, index, 11])
    h, w = size, size * 5 // 4
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    rad = 0.46 * size
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < rad**2
    img = np.zeros((h, w, 3), np.float32)
    shade = rng.uniform(0.85, 1.0)
    img[disc] = np.array([180, 70, 30], np.float32) * shade
    img += rng.normal(0, 4.0, img.shape) * disc[..., None]
    blob_r = max(1.5, size / 16)
    placed: list[tuple[float, float]] = []
    tries = 0
    while len(placed) < grade and tries < 10_000:
        tries += 1
        ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, rad - 2 * blob_r)
        py, px = cy + dist * np.sin(ang), cx + dist * np.cos(ang)
        if all((py - qy) ** 2 + (px - qx) ** 2 > (3.5 * blob_r) ** 2 for qy, qx in placed):
            placed.append((py, px))
    for py, px in placed:
        img[(yy - py) ** 2 + (xx - px) ** 2 < blob_r**2] = (255, 240, 120)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_image_folder(
    root: str | os.PathLike,
    num_images: int = 10,
    seed: int = 0,
    *,
    size: int = 32,
    num_unlabelled: int = 0,
) -> pathlib.Path:
    """Kaggle-DR-like: `<root>/train/img_XXX.png` (RGB, `make_fundus_image`) with grade i % 5,
    `<root>/trainLabels.csv` (columns image,level, names without extension), plus
    `num_unlabelled` images without a CSV row. Returns `root`."""
    root = pathlib.Path(root)
    (root / "train").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    rows = []
    for i in range(num_images + num_unlabelled):
        name = f"img_{i:03d}"
        grade = i % 5
        Image.fromarray(make_fundus_image(size, grade=grade, seed=seed, index=i)).save(
            root / "train" / f"{name}.png"
        )
        if i < num_images:
            rows.append((name, grade))
    with open(root / "trainLabels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "level"])
        w.writerows(rows)
    return root
