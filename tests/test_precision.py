"""bf16 compute, gradient accumulation and rematerialisation (config.model.compute_dtype,
config.{pretrain,finetune}.grad_accum_steps, config.model.remat).

What is proved here:
  * bf16: every convolution of every model (five pretext tasks, segmentation, probe, classifier)
    runs on bfloat16 operands, while params, gradients and losses stay float32 and the parameter
    tree is the float32 model's; a float32 config has no bfloat16 anywhere; a bf16 segmentation
    loss and gradient are close to the float32 ones; a bf16-pretrained encoder restores into a
    float32 (and a bf16) finetuning model unchanged.
  * accumulation: exact for a per-sample loss (segmentation Dice + CE: accum 4 == accum 1);
    for every task the accumulated step's gradient and metrics are the mean over the micro-batches
    (rows i::k, keys fold_in(step_key, i)); 8 devices == 1 device with accumulation, without
    gathering the batch.
  * remat: same gradients (dropout included), less temp memory in the compiled step.
  * config errors name the key; CPC / Exemplar warn that accumulation changes their task.

Gradients are read exactly through an "optimizer" whose state becomes the gradient (`_capture`).
Compile time is what this file costs: params are drawn from the abstract model (no init
compilation), and each test compiles one program (comparisons inside one jit where possible).
"""

from __future__ import annotations

import functools
import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from params_util import assert_tree_close, random_params

from ssl3d_jax import parallel, tasks
from ssl3d_jax.checkpoint import Checkpointer, restore_encoder
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.models.classifier import ClassificationModel
from ssl3d_jax.models.probes import VoxelLinearProbe
from ssl3d_jax.models.unet import EncoderConfig, SegmentationModel
from ssl3d_jax.train import finetune
from ssl3d_jax.train import step as step_lib
from ssl3d_jax.train.state import TrainState

TASKS = tasks.names()
SEG = dict(filters=(4, 8), bottom_filters=8, num_groups=2)  # segmentation test model
SEG_CLASSES = 3


def _config(name: str, *, dtype: str = "float32", remat: bool = False, size: int = 16):
    """A smoke config shrunk for compile time: 16³ inputs, a 2-level encoder of width 4."""
    config = tasks.task_config(name, "smoke")
    config.data.size = size
    config.model.filters = (4, 4)
    config.model.bottom_filters = 4
    config.model.compute_dtype = dtype
    config.model.remat = remat
    return config


def _task(config) -> tasks.Task:
    """`config.task`'s Task, from its module directly (`tasks.get_task` also traces the loss at
    several sizes to check `config.data.size`, which these tests do not need)."""
    return tasks.lookup(config.task).make(config, in_channels=2)


def _capture() -> optax.GradientTransformation:
    """An 'optimizer' whose new state IS the gradient and whose update is zero."""
    return optax.GradientTransformation(
        init=lambda p: jax.tree.map(jnp.zeros_like, p),
        update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g),
    )


def _state(tx, params, *, rng_seed=1, step=0, impl=None) -> TrainState:
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        opt_state=step_lib.init_opt_state(tx, params),
        rng=jax.random.key(rng_seed, impl=impl),
    )


def _eqns(jaxpr):
    """Every equation of a jaxpr, nested ones (remat, scan, pjit, custom_jvp) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _dtypes_of(eqn) -> set:
    return {str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype")}


# ------------------------------------------------------------------------------------------------
# Config validation (no compilation)
# ------------------------------------------------------------------------------------------------


def test_config_errors_name_the_key():
    config = _config("rpl")
    config.model.compute_dtype = "float16"
    with pytest.raises(ConfigError, match=r"config\.model\.compute_dtype='float16'"):
        EncoderConfig.from_config(config.model)
    model = _config("rpl").model.to_dict()
    model["remat"] = "yes"  # a ConfigDict already refuses a str here; a plain mapping does not
    with pytest.raises(ConfigError, match=r"config\.model\.remat='yes'"):
        EncoderConfig.from_config(ml_collections.ConfigDict(model))
    key = "config.pretrain.grad_accum_steps"
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}=3 must divide the batch size \(8\)"):
        step_lib.check_accum_steps(3, 8, 1, key=key)
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}=2: micro-batches .* = 4 .* \(8\)"):
        step_lib.check_accum_steps(2, 8, 8, key=key)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match=re.escape(key)):
            step_lib.check_accum_steps(bad, 8, 1, key=key)
    assert step_lib.check_accum_steps(2, 16, 8, key=key) == 2
    config = _config("rpl")
    config.finetune.batch_size = 16
    config.finetune.grad_accum_steps = 4
    with pytest.raises(ConfigError, match=r"config\.finetune\.grad_accum_steps=4"):
        step_lib.grad_accum_steps(
            config.finetune, parallel.make_mesh(), name="config.finetune"
        )  # 16 / 4 on 8 devices
    assert (
        step_lib.grad_accum_steps(
            config.finetune, parallel.make_mesh(jax.devices()[:1]), name="config.finetune"
        )
        == 4
    )
    # Exemplar needs two volumes per micro-batch (a volume's negative is another one).
    config = _config("exemplar")
    config.pretrain.grad_accum_steps = config.pretrain.batch_size
    with pytest.raises(ConfigError, match=r"config\.pretrain\.grad_accum_steps=8.* = 1"):
        tasks.get_task(config, in_channels=2)


@pytest.mark.parametrize("name", TASKS)
def test_accumulation_warns_only_for_contrastive_tasks(name, caplog):
    config = _config(name, size=24)  # get_task checks the size: the grid tasks need 18³
    config.pretrain.grad_accum_steps = 2
    tasks._warn_coupled.cache_clear()  # warned once per setting and process
    with caplog.at_level(logging.WARNING):
        task = tasks.get_task(config, in_channels=2)
        tasks.get_task(config, in_channels=2)  # a run builds its task twice: one warning
    warned = [r for r in caplog.records if "changes the task" in r.getMessage()]
    assert task.couples_batch == (name in ("cpc", "exemplar"))
    assert len(warned) == (1 if task.couples_batch else 0)


# ------------------------------------------------------------------------------------------------
# bf16 compute, f32 params (tracing only, no compilation)
# ------------------------------------------------------------------------------------------------


def _check_traced(build, loss, inputs, *, dtype: str):
    """Trace loss + grad of the model from `build`; check dtypes of params, convs, loss, grads."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))), nnx.Param)
    assert {str(p.dtype) for p in jax.tree.leaves(params)} == {"float32"}

    def objective(p, *args):
        return loss(nnx.merge(graphdef, p), *args)

    fn = jax.value_and_grad(objective, has_aux=True)
    closed = jax.make_jaxpr(fn)(params, *inputs)
    (loss_value, _), grads = jax.eval_shape(fn, params, *inputs)
    assert loss_value.dtype == jnp.float32
    assert jax.tree.map(lambda g: g.dtype, grads) == jax.tree.map(lambda p: p.dtype, params)
    eqns = list(_eqns(closed.jaxpr))
    convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    assert convs
    if dtype == "bfloat16":
        # Forward and backward convolutions alike (the backward ones are convs too).
        assert all(_dtypes_of(e) == {"bfloat16"} for e in convs), [_dtypes_of(e) for e in convs]
    else:
        assert not any("bfloat16" in _dtypes_of(e) for e in eqns)
    return params


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", TASKS)
def test_pretext_models_compute_in_bf16_with_f32_params(name, dtype):
    config = _config(name, dtype=dtype, remat=dtype == "bfloat16")
    # _check_traced inspects conv_general_dilated equations; the matmul formulations' bf16 is
    # tested in test_fast_layers.py.
    config.model.conv_impl = "xla"
    task = _task(config)
    volumes = jax.ShapeDtypeStruct((4, 16, 16, 16, 2), jnp.float32)
    params = _check_traced(task.build_model, task.loss, (volumes, jax.random.key(0)), dtype=dtype)
    # The parameter tree (names, shapes, dtypes) does not depend on the precision settings.
    plain = _task(_config(name))
    _, params32 = nnx.split(nnx.eval_shape(lambda: plain.build_model(nnx.Rngs(0))), nnx.Param)
    assert jax.tree.structure(params) == jax.tree.structure(params32)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, params, params32))


@pytest.mark.parametrize("model", ["segmentation", "probe", "classifier"])
def test_finetuning_models_compute_in_bf16_with_f32_params(model):
    config = _config("rpl", dtype="bfloat16", remat=True)
    config.model.conv_impl = "xla"  # as in test_pretext_models_compute_in_bf16_with_f32_params
    enc = EncoderConfig.from_config(config.model)
    if model == "classifier":

        def build(rngs):
            return ClassificationModel(3, 5, spatial_dims=2, hidden=8, encoder=enc, rngs=rngs)

        batch = {
            "image": jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.float32),
            "target": jax.ShapeDtypeStruct((4,), jnp.int32),
        }
        from ssl3d_jax.train.classify import classification_loss

        loss = functools.partial(classification_loss, flip=True)
    else:
        cls = VoxelLinearProbe if model == "probe" else SegmentationModel

        def build(rngs):
            return cls(2, SEG_CLASSES, encoder=enc, rngs=rngs)

        batch = {
            "image": jax.ShapeDtypeStruct((2, 16, 16, 16, 2), jnp.float32),
            "label": jax.ShapeDtypeStruct((2, 16, 16, 16), jnp.int32),
        }
        loss = functools.partial(
            finetune.segmentation_loss, num_classes=SEG_CLASSES, dice_weight=1.0, ce_weight=1.0
        )
    _check_traced(build, loss, (batch, jax.random.key(0)), dtype="bfloat16")


def test_finetune_build_model_reads_the_precision_settings():
    config = _config("rpl", dtype="bfloat16", remat=True)
    build = finetune.build_model(config, in_channels=2, num_classes=SEG_CLASSES)
    model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    assert model.encoder.remat and model.decoder.remat
    assert model.encoder.down0.conv1.dtype == jnp.bfloat16
    assert model.decoder.up0.dtype == jnp.bfloat16


def test_bf16_pretrained_encoder_restores_into_f32_and_bf16_finetuning(tmp_path):
    config = _config("rpl", dtype="bfloat16")
    task = _task(config)
    _, params = random_params(task.build_model, seed=3)
    state = _state(optax.sgd(0.1), params)
    meta = {"task": "rpl", "input": {"spatial_dims": 3, "in_channels": 2}}
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        ckpt.save(1, state, meta)
        ckpt.wait()
        on_disk = ckpt.param_shapes(1)
    assert {str(s.dtype) for s in jax.tree.leaves(on_disk)} == {"float32"}
    saved = jax.device_get(params["encoder"])
    for dtype in ("float32", "bfloat16"):
        build = finetune.build_model(
            _config("rpl", dtype=dtype), in_channels=2, num_classes=SEG_CLASSES
        )
        _, target = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))), nnx.Param)
        target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nnx.to_pure_dict(target))
        merged, report = restore_encoder(tmp_path / "checkpoints", target["encoder"])
        assert not report["missing"] and not report["unused"]
        jax.tree.map(np.testing.assert_array_equal, merged, saved)
        assert {str(np.asarray(x).dtype) for x in jax.tree.leaves(merged)} == {"float32"}


# ------------------------------------------------------------------------------------------------
# Segmentation step: accumulation exactness, 8 devices, bf16 vs f32 numbers, remat
# ------------------------------------------------------------------------------------------------

SEG_BATCH = 32  # 8 devices x micro-batches of 8 with accumulation 4


def _seg_loss():
    # Per-example soft Dice and voxel CE, both means over the examples: a per-sample mean loss.
    return functools.partial(
        finetune.segmentation_loss, num_classes=SEG_CLASSES, dice_weight=1.0, ce_weight=1.0
    )


def _seg_build(**kwargs):
    return lambda rngs: SegmentationModel(
        2, SEG_CLASSES, encoder=EncoderConfig(**SEG, **kwargs), rngs=rngs
    )


def _seg_batch(batch_size: int, size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.normal(size=(batch_size, *(size,) * 3, 2)).astype(np.float32),
        "label": rng.integers(0, SEG_CLASSES, size=(batch_size, *(size,) * 3)).astype(np.int32),
    }


@pytest.fixture(scope="module")
def seg_step():
    """`(accum, num_devices) -> (grads, metrics, compiled HLO text)` of one capture step on the
    same batch of 32 8³ volumes through `jit_train_step`, each compiled once for the module."""
    graphdef, params = random_params(_seg_build())
    batch = _seg_batch(SEG_BATCH, 8)
    cache = {}

    def run(accum: int, num_devices: int):
        if (accum, num_devices) not in cache:
            mesh = parallel.make_mesh(jax.devices()[:num_devices])
            tx = _capture()
            state = jax.device_put(_state(tx, params), parallel.replicated(mesh))
            step = step_lib.make_train_step(graphdef, _seg_loss(), tx, accum_steps=accum)
            sharded = parallel.put_batch(batch, parallel.data_sharded(mesh))
            compiled = step_lib.jit_train_step(step, mesh).lower(state, sharded).compile()
            new_state, metrics = compiled(state, sharded)
            cache[accum, num_devices] = (
                jax.device_get(new_state.opt_state),
                jax.device_get(metrics),
                compiled.as_text(),
            )
        return cache[accum, num_devices]

    return run


@pytest.mark.slow
def test_accumulation_is_exact_for_a_per_sample_loss(seg_step):
    grads1, metrics1, _ = seg_step(1, 1)
    grads4, metrics4, _ = seg_step(4, 1)
    for k in metrics1:
        np.testing.assert_allclose(metrics4[k], metrics1[k], rtol=1e-5, err_msg=k)
    # Only the float summation order differs (4 partial means of 8 examples vs one of 32).
    assert_tree_close(grads4, grads1, rtol=1e-4, atol_scale=1e-5, what="accum 4 vs 1")
    assert all(np.any(g) for g in jax.tree.leaves(grads1))


@pytest.mark.slow
def test_accumulation_on_eight_devices_equals_one_device_without_gathering(seg_step):
    grads1, metrics1, _ = seg_step(4, 1)
    grads8, metrics8, hlo = seg_step(4, 8)  # micro-batches of 8: one example per device
    for k in metrics1:
        np.testing.assert_allclose(metrics8[k], metrics1[k], rtol=1e-5, err_msg=k)
    assert_tree_close(grads8, grads1, rtol=1e-4, atol_scale=1e-5, what="8 vs 1 devices")
    # Each micro-batch stays where its rows are: the only collective is the gradient all-reduce.
    collectives = set(
        re.findall(r"\s(all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", hlo)
    )
    assert not collectives, collectives
    assert re.search(r"\sall-reduce(?:-start)?\(", hlo)


@pytest.mark.slow
def test_bf16_segmentation_loss_and_gradients_are_close_to_f32():
    graphdef32, params = random_params(_seg_build())
    build16 = _seg_build(dtype=jnp.bfloat16)
    graphdef16, _ = nnx.split(nnx.eval_shape(lambda: build16(nnx.Rngs(0))), nnx.Param)
    batch = _seg_batch(2, 16, seed=3)
    loss = _seg_loss()

    @jax.jit
    def both(p):
        out = []
        for graphdef in (graphdef32, graphdef16):

            def objective(p, g=graphdef):
                return loss(nnx.merge(g, p), batch, jax.random.key(0))

            (value, _), grads = jax.value_and_grad(objective, has_aux=True)(p)
            out.append((value, grads))
        return out

    (l32, g32), (l16, g16) = jax.device_get(both(params))
    assert l16.dtype == np.float32
    assert abs(float(l16) - float(l32)) < 2e-2 * abs(float(l32)), (l16, l32)
    v32 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(g32)])
    v16 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(g16)])
    assert v16.dtype == np.float32
    cosine = float(v16 @ v32 / np.linalg.norm(v16) / np.linalg.norm(v32))
    assert cosine > 0.99, cosine
    assert not np.array_equal(v16, v32)  # it did compute in another precision


@pytest.mark.slow
def test_remat_same_gradients_less_temp_memory():
    """Dropout on: the recomputed forward must draw the same masks as the stored one. Through
    `jit_train_step`, whose CPU compiler options keep XLA:CPU from undoing the remat."""
    _, params = random_params(_seg_build(dropout_rate=0.2))
    batch = _seg_batch(2, 16, seed=1)
    tx = _capture()
    mesh = parallel.make_mesh(jax.devices()[:1])
    out = {}
    for remat in (False, True):
        build = _seg_build(dropout_rate=0.2, remat=remat)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))), nnx.Param)
        # 'rbg' keys: dropout masks from XLA's RngBitGenerator, which compiles in a third of
        # the time of threefry's for these 3D masks; just as deterministic under recomputation.
        state = _state(tx, params, impl="rbg")
        state = jax.device_put(state, parallel.replicated(mesh))
        step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, _seg_loss(), tx), mesh)
        compiled = step.lower(state, batch).compile()
        new_state, metrics = compiled(state, batch)
        out[remat] = (
            jax.device_get(new_state.opt_state),
            float(metrics["loss"]),
            compiled.memory_analysis().temp_size_in_bytes,
        )
    (g0, l0, t0), (g1, l1, t1) = out[False], out[True]
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    assert_tree_close(g1, g0, rtol=1e-5, atol_scale=1e-6, what="remat vs not")
    assert t1 < 0.8 * t0, (t1, t0)


# ------------------------------------------------------------------------------------------------
# Every task: the accumulated step is the mean over micro-batches
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_accumulated_step_is_the_mean_of_micro_batch_gradients(name):
    accum, batch_size, step_index = 2, 4, 3
    config = _config(name)
    config.model.filters = (4,)  # one pooled level and the bottom: compile time
    task = _task(config)
    graphdef, params = random_params(task.build_model)
    volumes = np.random.default_rng(2).normal(size=(batch_size, 16, 16, 16, 2))
    volumes = volumes.astype(np.float32)
    # Micro-batch i = rows i, i + k, ... and key fold_in(step_key, i), built here independently.
    micro = np.stack([volumes[i::accum] for i in range(accum)])
    tx = _capture()
    state = _state(tx, params, rng_seed=5, step=step_index)

    def loss_fn(model, batch, key):
        return task.loss(model, batch["image"], key)

    step = step_lib.make_train_step(graphdef, loss_fn, tx, accum_steps=accum)

    # One program for both sides: one compilation.
    @jax.jit
    def both(state, volumes, micro):
        new_state, metrics = step(state, {"image": volumes})
        step_key = jax.random.fold_in(jax.random.key(5), step_index)

        def direct(xs):
            v, i = xs

            def objective(p):
                return task.loss(nnx.merge(graphdef, p), v, jax.random.fold_in(step_key, i))

            return jax.value_and_grad(objective, has_aux=True)(state.params)

        return new_state, metrics, jax.lax.map(direct, (micro, jnp.arange(accum)))

    new_state, metrics, ((losses, aux), grads) = jax.device_get(both(state, volumes, micro))
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-5)
    for k, v in aux.items():
        np.testing.assert_allclose(metrics[k], np.mean(v), rtol=1e-5, atol=1e-6, err_msg=k)
    mean = jax.tree.map(lambda g: np.mean(g, axis=0), grads)
    assert_tree_close(new_state.opt_state, mean, rtol=1e-4, atol_scale=1e-5, what=name)
    # The micro-batches differ (else "mean" would be vacuous), and the step counted one step.
    assert losses[0] != losses[1]
    assert int(new_state.step) == step_index + 1
