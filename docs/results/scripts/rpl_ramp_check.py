"""Can the RPL model learn relative position when it is written in the voxels?

A diagnostic behind docs/results/pretext_lr_search.md ("RPL and Jigsaw with one sample per
volume"; it trains with the original's one query per volume unless `--queries` says more). The
RPL model of `configs/rpl.py:default` (random grid origin, 5³ patches at 40³) is trained with
Adam on batches of 8 volumes, either the phantom (`phantom`) or `ramp` volumes whose channels are
the voxel coordinates (x, y, z, 0) scaled to [-1, 1]: there the query's class is a function of the
difference of the two patches' channel means, which any model that compares its two inputs can
read. Prints the window-mean train loss / accuracy and the loss / accuracy on the held-out test
cases (10 fixed draws) six times per run.

    python docs/results/scripts/rpl_ramp_check.py ramp --num_groups 8 --steps 600 --lr 3e-4
    python docs/results/scripts/rpl_ramp_check.py ramp --num_groups 8 --steps 600 --lr 3e-4 \
        --set data.size=80
    python docs/results/scripts/rpl_ramp_check.py ramp --norm none --num_groups 1 --lr 3e-4

`--norm none` replaces every encoder GroupNorm by a learned per-channel
scale and shift (no statistics), to tell normalisation apart from the rest.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", choices=("ramp", "phantom"))
    parser.add_argument("--num_groups", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--norm", choices=("group", "none"), default="group")
    parser.add_argument("--queries", type=int, default=1, help="rpl.queries_per_volume")
    parser.add_argument("--set", action="append", default=[], help="section.key=value")
    args = parser.parse_args()

    if args.norm == "none":
        import ssl3d_jax.models.layers as layers

        class Affine(nnx.Module):
            def __init__(self, channels, *, rngs=None, **kw):
                self.scale = nnx.Param(jnp.ones((channels,)))
                self.bias = nnx.Param(jnp.zeros((channels,)))

            def __call__(self, x):
                return x * self.scale + self.bias

        class NoNorm:
            def __getattr__(self, name):
                return Affine if name == "GroupNorm" else getattr(nnx, name)

        layers.nnx = NoNorm()

    from ssl3d_jax import audit
    from ssl3d_jax.tasks import rpl

    config = audit.task_config("rpl", "default")
    config.model.num_groups = args.num_groups
    config.rpl.queries_per_volume = args.queries
    for kv in args.set:
        key, value = kv.split("=")
        section, name = key.split(".")
        config[section][name] = type(config[section][name])(eval(value))
    train, test, _ = audit.load_inputs(config)
    if args.data == "ramp":
        n = train.shape[1]
        axes = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
        ramp = np.stack([*axes, np.zeros_like(axes[0])], -1).astype(np.float32)
        train = np.broadcast_to(ramp, train.shape).copy()
        test = np.broadcast_to(ramp, test.shape).copy()
    task = rpl.make_task(config, in_channels=train.shape[-1])
    model = task.build_model(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, volumes, key):
        grad_fn = nnx.value_and_grad(lambda m: task.loss(m, volumes, key), has_aux=True)
        (_, metrics), grads = grad_fn(model)
        opt.update(model, grads)
        return metrics

    @nnx.jit
    def evaluate(model, volumes, key):
        return task.loss(model, volumes, key)[1]

    rng, key, history, t0 = np.random.default_rng(0), jax.random.key(0), [], time.time()
    window = max(1, args.steps // 6)
    for s in range(args.steps):
        key, k = jax.random.split(key)
        m = step(model, opt, jnp.asarray(train[rng.integers(0, len(train), 8)]), k)
        history.append((float(m["loss"]), float(m["accuracy"])))
        if (s + 1) % window == 0:
            loss, acc = np.mean(history[-window:], axis=0)
            held = [evaluate(model, jnp.asarray(test), jax.random.key(1000 + i)) for i in range(10)]
            print(
                f"{args.data} num_groups={args.num_groups} norm={args.norm} lr={args.lr:g} "
                f"step {s + 1}: train loss {loss:.3f} acc {acc:.3f}; test loss "
                f"{np.mean([float(h['loss']) for h in held]):.3f} acc "
                f"{np.mean([float(h['accuracy']) for h in held]):.3f} ({time.time() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
