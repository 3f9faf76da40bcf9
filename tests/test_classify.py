"""Classification finetuning (diabetic-retinopathy grading): model, arms, restore, metrics."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import rotation as rotation_config
from ssl3d_jax import metrics, parallel
from ssl3d_jax.checkpoint import Checkpointer
from ssl3d_jax.errors import CheckpointError, ConfigError
from ssl3d_jax.models.classifier import ClassificationModel
from ssl3d_jax.models.unet import EncoderConfig
from ssl3d_jax.train import classify, downstream, pretrain
from ssl3d_jax.train import step as step_lib

SIZE = 16
NUM_CASES = 14
STEPS, WARMUP = 4, 2


def _config():
    config = rotation_config.get_config("smoke,2d")
    config.data.size = SIZE
    config.data.num_threads = 1
    config.finetune.batch_size = 4
    config.finetune.num_steps = STEPS
    config.finetune.warmup_frozen_steps = WARMUP
    config.finetune.checkpoint_every = 2
    config.finetune.log_every = 2
    config.finetune.learning_rate = 1e-2
    config.classify = ml_collections.ConfigDict(
        {"head_hidden": 8, "head_dropout": 0.0, "flip": True}
    )
    return config


def _encoder_leaves(tree) -> dict:
    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(jax.devices()[:2])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from ssl3d_jax.data import datasets, synthetic

    root = synthetic.write_image_folder(
        tmp_path_factory.mktemp("retina"), num_images=NUM_CASES, seed=0, size=32
    )
    ds = datasets.open_dataset(root)
    assert ds.layout == "images" and ds.kind == "classification" and ds.spatial_dims == 2
    return ds


@pytest.fixture(scope="module")
def splits(dataset):
    names = [c.name for c in dataset.cases]
    return {"labeled": names[:8], "val": names[8:10], "test": names[10:]}


@pytest.fixture(scope="module")
def pretext(tmp_path_factory, dataset, mesh):
    """A 2-step rotation pretraining on the image folder: (checkpoint folder, encoder params)."""
    config = _config()
    config.pretrain.batch_size = 4
    config.pretrain.num_steps = 2
    config.pretrain.checkpoint_every = 2
    ckpt_dir = pretrain.run(
        config, str(tmp_path_factory.mktemp("pretext")), dataset, list(dataset.cases), mesh=mesh
    )
    with Checkpointer(ckpt_dir, create=False) as ckpt:
        step = ckpt.latest_step()
        meta = ckpt.read_meta(step)
        shapes = ckpt.param_shapes(step)
        encoder = ckpt.restore_params(step, {"encoder": shapes["encoder"]})["encoder"]
    assert step == 2 and meta["input"]["in_channels"] == 3 and meta["input"]["spatial_dims"] == 2
    return ckpt_dir, encoder


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, dataset, splits, pretext, mesh):
    workdir = tmp_path_factory.mktemp("work")
    config = _config()
    result = downstream.run(
        config, str(workdir), "pretrained", splits, dataset, init_from=pretext[0], mesh=mesh
    )
    return workdir, result


def _checkpoint_params(workdir, arm: str, step: int) -> dict:
    with Checkpointer(workdir / "finetune" / arm / "checkpoints", create=False) as ckpt:
        assert step in ckpt.all_steps()
        shapes = ckpt.param_shapes(step)
        return ckpt.restore_params(step, shapes)


def _init_params(config, arm):
    build = classify.build_model(config, in_channels=3, num_classes=5, spatial_dims=2, arm=arm)
    key = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))[0]
    return jax.device_get(step_lib.init_params(build, key)[1])


# --- model ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [None, 8])
def test_logits_shape_and_parts(hidden):
    model = ClassificationModel(
        3,
        5,
        hidden=hidden,
        encoder=EncoderConfig(filters=(4, 8), bottom_filters=8, num_groups=1),
        rngs=nnx.Rngs(0),
    )
    x = jnp.ones((2, 18, 16, 3))  # non-square, odd-after-pooling sizes
    logits = model(x)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    _, params = nnx.split(model, nnx.Param)
    assert set(nnx.to_pure_dict(params)) == {"encoder", "head"}
    if hidden is not None:  # zero-initialised output layer: uniform prediction at step 0
        np.testing.assert_allclose(logits, 0.0)


@pytest.mark.slow
def test_all_arms_share_the_initial_encoder():
    config = _config()
    probe = _init_params(config, "probe")
    scratch = _init_params(config, "scratch")
    a, b = _encoder_leaves(probe["encoder"]), _encoder_leaves(scratch["encoder"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert "dense0" not in probe["head"] and "dense0" in scratch["head"]  # linear vs MLP head


def test_random_flips_permute_pixels():
    x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    y = classify.random_flips(x, jax.random.key(0))
    for i in range(2):
        options = [x[i], x[i, :, ::-1], x[i, ::-1], x[i, ::-1, ::-1]]
        assert any(bool(jnp.all(y[i] == o)) for o in options)


@pytest.mark.slow
def test_loss_falls_when_overfitting_visible_grades():
    # 10 dark images with a bright central square whose side grows with the grade. (Not the
    # brightness itself: GroupNorm removes a global intensity scale.)
    rng = np.random.default_rng(0)
    target = np.arange(10, dtype=np.int32) % 5
    image = rng.uniform(0, 0.2, (10, SIZE, SIZE, 3)).astype(np.float32)
    for i, g in enumerate(target):
        side = 2 * g + 2
        lo = (SIZE - side) // 2
        image[i, lo : lo + side, lo : lo + side] += 0.7
    config = _config()
    mesh = parallel.make_mesh(jax.devices()[:1])
    build = classify.build_model(
        config, in_channels=3, num_classes=5, spatial_dims=2, arm="scratch"
    )
    graphdef, params = step_lib.init_params(build, jax.random.key(0), mesh)
    tx = optax.adam(3e-3)
    state = step_lib.create_train_state(tx, params, jax.random.key(1), mesh)
    loss_fn = functools.partial(classify.classification_loss, flip=True)
    step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, loss_fn, tx), mesh)
    batch = parallel.put_batch({"image": image, "target": target}, parallel.data_sharded(mesh))
    losses = []
    for _ in range(100):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(np.log(5), abs=1e-4)  # zero-init output layer
    assert losses[-1] < 0.5 * losses[0], losses[::10]


# --- metrics ------------------------------------------------------------------------------------


def test_confusion_matrix_rows_are_truth():
    cm = classify.confusion_matrix([0, 0, 2], [0, 1, 2], num_classes=3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 0, 0], [0, 0, 1]])


# --- arms ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrained_restores_encoder_and_warms_up_frozen(pretrained_run, pretext):
    workdir, result = pretrained_run
    enc0 = _encoder_leaves(pretext[1])
    assert result["restored_tensors"] == len(enc0)
    assert result["warmup_frozen_steps"] == WARMUP and result["steps"] == STEPS
    # After the frozen warm-up the encoder is exactly the pretext one, the head has moved.
    at_warmup = _checkpoint_params(workdir, "pretrained", WARMUP)
    for k, v in _encoder_leaves(at_warmup["encoder"]).items():
        np.testing.assert_array_equal(v, enc0[k])
    head0 = _init_params(_config(), "pretrained")["head"]
    assert not np.array_equal(at_warmup["head"]["out"]["kernel"], head0["out"]["kernel"])
    # Then everything trains: the encoder has changed by the last step.
    final = _checkpoint_params(workdir, "pretrained", STEPS)
    assert any(not np.array_equal(v, enc0[k]) for k, v in _encoder_leaves(final["encoder"]).items())


@pytest.mark.slow
def test_probe_trains_only_a_linear_head(tmp_path, dataset, splits, pretext, mesh):
    config = _config()
    result = downstream.run(
        config, str(tmp_path), "probe", splits, dataset, init_from=pretext[0], mesh=mesh
    )
    assert result["trainable"] == "head" and result["warmup_frozen_steps"] == STEPS
    final = _checkpoint_params(tmp_path, "probe", STEPS)
    enc0 = _encoder_leaves(pretext[1])
    for k, v in _encoder_leaves(final["encoder"]).items():
        np.testing.assert_array_equal(v, enc0[k])  # byte-identical after all steps
    head0 = _init_params(config, "probe")["head"]
    assert set(final["head"]) == {"kernel", "bias"}  # one linear layer
    assert not np.array_equal(final["head"]["kernel"], head0["kernel"])


@pytest.mark.slow
def test_scratch_trains_everything_from_the_shared_init(tmp_path, dataset, splits, mesh):
    config = _config()
    config.finetune.num_steps = 2
    result = downstream.run(
        config, str(tmp_path), "scratch", splits, dataset, init_from=None, mesh=mesh
    )
    assert result["restored_tensors"] == 0 and result["warmup_frozen_steps"] == 0
    assert not (tmp_path / "finetune" / "scratch" / "restored_params.json").exists()
    init = _encoder_leaves(_init_params(config, "scratch")["encoder"])
    final = _encoder_leaves(_checkpoint_params(tmp_path, "scratch", 2)["encoder"])
    assert any(not np.array_equal(v, init[k]) for k, v in final.items())


@pytest.mark.slow
def test_random_controls_are_their_arms_on_the_random_encoder(tmp_path, dataset, splits, mesh):
    config = _config()
    for control, arm in (("random_warmup", "pretrained"), ("random_probe", "probe")):
        # The same model and init as the arm it controls (no restore).
        ours, theirs = _init_params(config, control), _init_params(config, arm)
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, ours, theirs)))
    init = _init_params(config, "random_warmup")
    result = downstream.run(
        config, str(tmp_path), "random_warmup", splits, dataset, init_from=None, mesh=mesh
    )
    assert result["restored_tensors"] == 0 and result["warmup_frozen_steps"] == WARMUP
    assert result["trainable"] == "all"
    assert not (tmp_path / "finetune" / "random_warmup" / "restored_params.json").exists()
    # The frozen warm-up keeps the random encoder, then everything trains.
    at_warmup = _encoder_leaves(_checkpoint_params(tmp_path, "random_warmup", WARMUP)["encoder"])
    for k, v in _encoder_leaves(init["encoder"]).items():
        np.testing.assert_array_equal(at_warmup[k], v)
    final = _encoder_leaves(_checkpoint_params(tmp_path, "random_warmup", STEPS)["encoder"])
    assert any(not np.array_equal(v, at_warmup[k]) for k, v in final.items())
    result = downstream.run(
        config, str(tmp_path), "random_probe", splits, dataset, init_from=None, mesh=mesh
    )
    assert result["trainable"] == "head" and result["restored_tensors"] == 0
    final = _checkpoint_params(tmp_path, "random_probe", STEPS)
    init = _init_params(config, "random_probe")
    assert set(final["head"]) == {"kernel", "bias"}  # the probe's linear layer
    for k, v in _encoder_leaves(final["encoder"]).items():
        np.testing.assert_array_equal(v, _encoder_leaves(init["encoder"])[k])


@pytest.mark.slow
def test_results_are_consistent_and_json_able(pretrained_run, splits):
    _, result = pretrained_run
    json.dumps(result)
    per_case = result["per_case"]
    assert sorted(per_case) == sorted(splits["test"]) and result["num_test"] == len(per_case)
    assert result["num_labeled"] == len(splits["labeled"])
    # Validation cases are scored apart from the test cases, the same way.
    val = result["val_per_case"]
    assert sorted(val) == sorted(splits["val"]) and result["num_val"] == len(val)
    assert not set(val) & set(per_case)
    val_true = [p["target"] for p in val.values()]
    val_pred = [p["pred"] for p in val.values()]
    assert result["val_metrics"]["accuracy"] == pytest.approx(
        np.mean(np.asarray(val_true) == np.asarray(val_pred))
    )
    y_true = [p["target"] for p in per_case.values()]
    y_pred = [p["pred"] for p in per_case.values()]
    for p in per_case.values():
        assert p["pred"] == int(np.argmax(p["probs"])) and sum(p["probs"]) == pytest.approx(1.0)
    acc = np.mean(np.asarray(y_true) == np.asarray(y_pred))
    assert result["metrics"]["accuracy"] == pytest.approx(acc)
    assert result["metrics"]["qwk"] == pytest.approx(
        metrics.quadratic_weighted_kappa(y_true, y_pred, num_classes=5)
    )
    cm = np.asarray(result["confusion"])
    assert cm.shape == (5, 5) and cm.sum() == len(per_case)
    assert np.trace(cm) == sum(t == p for t, p in zip(y_true, y_pred))
    np.testing.assert_array_equal(cm.sum(1), np.bincount(y_true, minlength=5))


@pytest.mark.slow
def test_rerun_resumes_from_the_final_checkpoint(pretrained_run, dataset, splits, pretext, mesh):
    workdir, first = pretrained_run
    again = downstream.run(
        _config(), str(workdir), "pretrained", splits, dataset, init_from=pretext[0], mesh=mesh
    )
    assert again["per_case"] == first["per_case"]


# --- errors -------------------------------------------------------------------------------------


def _copy_with_meta(src: str, dst, **input_spec) -> str:
    """The checkpoint `src` saved again under `dst` with `input_spec` in its meta's input."""
    with Checkpointer(src, create=False) as ckpt:
        step = ckpt.latest_step()
        meta = ckpt.read_meta(step)
        params = ckpt.restore_params(step, ckpt.param_shapes(step))
    meta["input"].update(input_spec)
    with Checkpointer(dst) as ckpt:
        ckpt.save(step, {"params": params}, meta)
    return str(dst)


def test_encoder_of_other_channels_or_dims_is_refused(tmp_path, dataset, splits, pretext, mesh):
    # The compatibility check reads the checkpoint's meta before any weight (or compilation).
    config = _config()
    one_channel = _copy_with_meta(pretext[0], tmp_path / "c1", in_channels=1)
    with pytest.raises(CheckpointError, match="1 input channels.*has 3"):
        downstream.run(
            config, str(tmp_path / "w"), "probe", splits, dataset, init_from=one_channel, mesh=mesh
        )
    three_d = _copy_with_meta(pretext[0], tmp_path / "d3", spatial_dims=3)
    with pytest.raises(CheckpointError, match="pretrained in 3D.*spatial_dims is 2"):
        downstream.run(
            config, str(tmp_path / "w"), "pretrained", splits, dataset, init_from=three_d, mesh=mesh
        )
    with pytest.raises(CheckpointError, match="init_from"):
        downstream.run(
            config, str(tmp_path / "w"), "probe", splits, dataset, init_from=None, mesh=mesh
        )
    with pytest.raises(ConfigError, match="unknown arm"):
        downstream.run(
            config, str(tmp_path / "w"), "frozen", splits, dataset, init_from=None, mesh=mesh
        )
