"""The pure train step shared by pretraining and finetuning.

`make_train_step` returns `step(state, batch) -> (state, metrics)`: no files, no Python state, no
branching on traced values. `jit_train_step` compiles it with the state replicated and the batch
sharded along the mesh's 'data' axis; XLA inserts the gradient all-reduce, so the same global batch
gives the same update on any number of devices.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import optax
from flax import nnx

from ssl3d_jax.train.state import TrainState

# (model, batch, key) -> (scalar loss, {name: scalar})
LossFn = Callable[[nnx.Module, dict, jax.Array], tuple]


def init_opt_state(tx: optax.GradientTransformation, params: dict) -> dict:
    """One optimizer state per top-level part of `params` (see `TrainState.opt_state`)."""
    return {part: tx.init(p) for part, p in params.items()}


def make_train_step(
    graphdef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    trainable: Sequence[str] | None = None,
):
    """Build the pure train step.

    Args:
      graphdef: the model's `nnx.GraphDef` (from `nnx.split(model, nnx.Param)`).
      loss_fn: `(model, batch, key) -> (loss, metrics)`; `key` is this step's PRNG key.
      tx: optax transformation applied to each trainable part.
      trainable: top-level param parts to train (default: all). The others are held constant
        under `stop_gradient`-like treatment: no gradient is computed for them at all (XLA drops
        their backward pass), and their optimizer state is left untouched.

    Returns:
      `step(state: TrainState, batch: dict) -> (TrainState, metrics)`; metrics are float32
      scalars: the loss function's, plus 'grad_norm'.
    """
    trainable = None if trainable is None else tuple(trainable)

    def step(state: TrainState, batch: dict):
        parts = tuple(state.params) if trainable is None else trainable
        frozen = {k: v for k, v in state.params.items() if k not in parts}
        key = jax.random.fold_in(state.rng, state.step)

        def objective(train_params):
            model = nnx.merge(graphdef, {**frozen, **train_params})
            return loss_fn(model, batch, key)

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (loss, metrics), grads = grad_fn({k: state.params[k] for k in parts})
        params, opt_state = dict(state.params), dict(state.opt_state)
        for k in parts:
            updates, opt_state[k] = tx.update(grads[k], state.opt_state[k], state.params[k])
            params[k] = optax.apply_updates(state.params[k], updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return step


def jit_train_step(step_fn, mesh) -> Callable:
    """jit with the state donated and replicated, metrics replicated, batch sharding inferred."""
    from ssl3d_jax.parallel import replicated

    repl = replicated(mesh)
    return jax.jit(step_fn, donate_argnums=(0,), out_shardings=(repl, repl))


def init_params(build_model: Callable[[nnx.Rngs], nnx.Module], key, mesh=None):
    """Initialise a model's params under jit (eager NNX init compiles every initialiser on its own,
    which costs seconds on CPU).

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
    params = jax.jit(init, out_shardings=out_shardings)(key)
    return graphdef, params


def create_train_state(tx, params: dict, rng, mesh) -> TrainState:
    """A replicated TrainState at step 0."""
    from ssl3d_jax.parallel import replicated

    repl = replicated(mesh)
    opt_state = jax.jit(functools.partial(init_opt_state, tx), out_shardings=repl)(params)
    state = TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=opt_state, rng=rng
    )
    return jax.device_put(state, repl)
