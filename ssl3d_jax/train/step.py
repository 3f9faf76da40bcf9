"""The pure train step shared by pretraining and finetuning.

`make_train_step` returns `step(state, batch) -> (state, metrics)`: no files, no Python state, no
branching on traced values. `jit_train_step` compiles it with the state replicated and the batch
sharded along the mesh's 'data' axis; XLA inserts the gradient all-reduce, so the same global batch
gives the same update on any number of devices.

Gradient accumulation (`accum_steps = k > 1`, `config.{pretrain,finetune}.grad_accum_steps`): the
global batch of B is split into k micro-batches of B / k, their gradients (and metrics) are
computed one after the other in a `lax.scan` and averaged, and the optimizer updates once, so the
peak activation memory is that of a B / k batch. Micro-batch i holds the rows `i, i + k, i + 2k,
...` (`split_micro_batches`): with the batch sharded in contiguous blocks over the devices, every
micro-batch is then spread over ALL devices (each device's block holds B / (k · n) rows of each),
so no data moves between devices and every device works on every micro-batch. Micro-batch i draws
its randomness from `fold_in(step_key, i)`.

What accumulation preserves depends on the loss:
  * a mean over independent samples (RPL, rotation, jigsaw, segmentation Dice + CE with the
    per-example Dice of `losses.soft_dice_loss`, classification CE): the averaged gradient IS
    the gradient of the whole batch (for the same per-sample randomness; the task's sampling
    keys are drawn per micro-batch, so the random draws differ from an unaccumulated step's);
  * contrastive losses whose negatives come from the batch (CPC's InfoNCE, Exemplar's triplets):
    each micro-batch only sees its own B / k volumes as negatives, so accumulation CHANGES THE
    TASK (fewer, easier negatives), it does not just save memory. Those tasks log a warning.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssl3d_jax import parallel
from ssl3d_jax.errors import ConfigError
from ssl3d_jax.train.state import TrainState

# (model, batch, key) -> (scalar loss, {name: scalar})
LossFn = Callable[[nnx.Module, dict, jax.Array], tuple]


def init_opt_state(tx: optax.GradientTransformation, params: dict) -> dict:
    """One optimizer state per top-level part of `params` (see `TrainState.opt_state`)."""
    return {part: tx.init(p) for part, p in params.items()}


def check_accum_steps(accum_steps, batch_size: int, num_devices: int, *, key: str) -> int:
    """Validates a gradient-accumulation setting; returns it as an int.

    Raises:
      ConfigError naming `key` unless `accum_steps` is an int >= 1 that divides `batch_size` into
      micro-batches that are themselves multiples of `num_devices`.
    """
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ConfigError(f"{key}={accum_steps!r}: expected an integer >= 1.")
    if batch_size % accum_steps:
        raise ConfigError(
            f"{key}={accum_steps} must divide the batch size ({batch_size}) into equal "
            "micro-batches"
        )
    micro = batch_size // accum_steps
    if micro % num_devices:
        raise ConfigError(
            f"{key}={accum_steps}: micro-batches of {batch_size} / {accum_steps} = {micro} must be "
            f"a multiple of the number of devices ({num_devices}), so that every micro-batch is "
            "spread over all of them"
        )
    return accum_steps


def grad_accum_steps(section, mesh, *, name: str) -> int:
    """`section.grad_accum_steps` of the config section `name` (e.g. `config.pretrain`), checked
    against `section.batch_size` and the devices of `mesh` (`check_accum_steps`), after checking
    that `section.batch_size` splits evenly over those devices (`parallel.check_batch_size`)."""
    parallel.check_batch_size(section.batch_size, mesh, f"{name}.batch_size")
    return check_accum_steps(
        section.grad_accum_steps,
        int(section.batch_size),
        mesh.devices.size,
        key=f"{name}.grad_accum_steps",
    )


def split_micro_batches(batch, accum_steps: int):
    """`[B, ...]` leaves -> `[k, B / k, ...]`, micro-batch i = rows `i, i + k, i + 2k, ...`.

    Strided rather than contiguous: with B sharded in contiguous blocks over n devices (and
    B / k a multiple of n), reshaping to `[B / k, k, ...]` keeps every device's rows on it, and
    the transpose to `[k, B / k, ...]` is local too; a contiguous split would put micro-batch i
    on n / k of the devices and make XLA move the data.

    Args:
      batch: pytree of arrays with a common leading batch axis B, a multiple of `accum_steps`.
      accum_steps: k >= 1, static.

    Returns:
      the same pytree with leaves `[k, B / k, ...]`.
    """

    def split(x):
        b = x.shape[0]
        if b % accum_steps:
            raise ConfigError(
                f"grad_accum_steps={accum_steps} must divide the batch size ({b}) evenly"
            )
        x = x.reshape(b // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def accumulate(grad_fn, params, batch, key, accum_steps: int):
    """Mean of `grad_fn(params, micro_batch_i, fold_in(key, i))` over the k micro-batches.

    Args:
      grad_fn: `(params, batch, key) -> ((loss, metrics), grads)`, e.g. a `jax.value_and_grad`
        with `has_aux=True`.
      params: the differentiated params (their dtype is the accumulators', float32).
      batch: the global batch (pytree, leading axis B).
      key: the step's PRNG key.
      accum_steps: k >= 1, static; 1 calls `grad_fn(params, batch, key)` unchanged.

    Returns:
      `((loss, metrics), grads)` averaged over the micro-batches (metrics included: a mean of
      micro-batch means, which for per-sample means is the whole batch's mean).
    """
    if accum_steps == 1:
        return grad_fn(params, batch, key)
    micro = split_micro_batches(batch, accum_steps)

    def body(total, xs):
        i, micro_batch = xs
        out = grad_fn(params, micro_batch, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, total, out), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, params, first, key)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
    return jax.tree.map(lambda t: t / accum_steps, total)


def make_train_step(
    graphdef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    trainable: Sequence[str] | None = None,
    accum_steps: int = 1,
):
    """Build the pure train step.

    Args:
      graphdef: the model's `nnx.GraphDef` (from `nnx.split(model, nnx.Param)`).
      loss_fn: `(model, batch, key) -> (loss, metrics)`; `key` is this step's PRNG key.
      tx: optax transformation applied to each trainable part.
      trainable: top-level param parts to train (default: all). The others are held constant
        under `stop_gradient`-like treatment: no gradient is computed for them at all (XLA drops
        their backward pass), and their optimizer state is left untouched.
      accum_steps: gradient accumulation over this many micro-batches per step (see the module
        docstring); 1 (default) is the plain step, with the step key passed unchanged.

    Returns:
      `step(state: TrainState, batch: dict) -> (TrainState, metrics)`; metrics are float32
      scalars: the loss function's, plus 'grad_norm'.
    """
    trainable = None if trainable is None else tuple(trainable)
    accum_steps = int(accum_steps)
    if accum_steps < 1:
        raise ConfigError(f"grad_accum_steps={accum_steps}: expected >= 1")

    def step(state: TrainState, batch: dict):
        parts = tuple(state.params) if trainable is None else trainable
        frozen = {k: v for k, v in state.params.items() if k not in parts}
        key = jax.random.fold_in(state.rng, state.step)

        def objective(train_params, batch, key):
            model = nnx.merge(graphdef, {**frozen, **train_params})
            return loss_fn(model, batch, key)

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        train_params = {k: state.params[k] for k in parts}
        (loss, metrics), grads = accumulate(grad_fn, train_params, batch, key, accum_steps)
        params, opt_state = dict(state.params), dict(state.opt_state)
        for k in parts:
            updates, opt_state[k] = tx.update(grads[k], state.opt_state[k], state.params[k])
            params[k] = optax.apply_updates(state.params[k], updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return step


# XLA:CPU's `cse_barrier_expander` pass drops the optimization barriers of `jax.checkpoint`
# before CSE, which then merges the backward pass's recomputation with the forward pass: remat
# (config.model.remat) silently stores every activation again. Measured on a 2 x 32³ U-Net step:
# 42 MiB of temp buffers with or without remat; 24 MiB with remat when the pass is skipped (GPU and
# TPU keep the barriers). Without barriers in the program skipping it changes nothing.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def compiler_options(mesh) -> dict | None:
    """XLA options for a step compiled for `mesh`'s devices: `CPU_COMPILER_OPTIONS` on CPU."""
    return dict(CPU_COMPILER_OPTIONS) if mesh.devices.flat[0].platform == "cpu" else None


def jit_train_step(step_fn, mesh) -> Callable:
    """jit with the state donated and replicated, metrics replicated, batch sharding inferred;
    on CPU with `CPU_COMPILER_OPTIONS`, so that rematerialisation takes effect there too."""
    from ssl3d_jax.parallel import replicated

    repl = replicated(mesh)
    return jax.jit(
        step_fn,
        donate_argnums=(0,),
        out_shardings=(repl, repl),
        compiler_options=compiler_options(mesh),
    )


# Initialisation runs once, so its compile time is all that matters. XLA:CPU's LLVM pipeline spends
# seconds optimising the unrolled threefry rounds and erf_inv of every initialiser (measured on
# the default RPL model, 2-core CPU: 7.3 s of compile for a program that then runs in 14 ms); at
# optimisation level 0 it compiles ~10x faster and runs in 0.2 s (benchmarks/RESULTS.md, time to
# the first step: init 9.6 s -> 1.9 s cold, compile and everything else before the step). The
# values agree to 1 ulp (relative 2e-7: float rounding of erf_inv, not different random bits).
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_compiler_options(mesh=None) -> dict | None:
    """XLA options for the one-off jitted initialisations: `CPU_INIT_COMPILER_OPTIONS` on CPU."""
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return dict(CPU_INIT_COMPILER_OPTIONS) if platform == "cpu" else None


def init_params(build_model: Callable[[nnx.Rngs], nnx.Module], key, mesh=None):
    """Initialise a model's params under jit (eager NNX init compiles every initialiser on its own,
    which costs seconds on CPU), compiled with `init_compiler_options` (fast compile on CPU).

    Returns:
      (graphdef, params): params a pure nested dict, replicated over `mesh` when given.
    """
    abstract = nnx.eval_shape(lambda: build_model(nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract, nnx.Param)

    def init(k):
        _, params = nnx.split(build_model(nnx.Rngs(k)), nnx.Param)
        return nnx.to_pure_dict(params)

    out_shardings = None
    if mesh is not None:
        from ssl3d_jax.parallel import replicated

        out_shardings = replicated(mesh)
    params = jax.jit(
        init, out_shardings=out_shardings, compiler_options=init_compiler_options(mesh)
    )(key)
    return graphdef, params


def create_train_state(tx, params: dict, rng, mesh) -> TrainState:
    """A replicated TrainState at step 0."""
    from ssl3d_jax.parallel import replicated

    repl = replicated(mesh)
    opt_state = jax.jit(
        functools.partial(init_opt_state, tx),
        out_shardings=repl,
        compiler_options=init_compiler_options(mesh),
    )(params)
    state = TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=opt_state, rng=rng
    )
    from ssl3d_jax.parallel import replicate

    return replicate(state, mesh)
