"""oneDNN convolutions on CPU, called from jitted JAX code through `jax.ffi` (issue 13).

Why: XLA:CPU runs the 3D convolutions of our U-Nets at 1-10 GFLOP/s, 4-18x slower than PyTorch
on the same cores, and none of its flags changes that (benchmarks/results/layers.md). PyTorch's
speed comes from oneDNN; the same oneDNN primitives, compiled into a small C++ extension
(`csrc/onednn_conv.cc`, built by `pip install`) and called as XLA FFI custom calls, run at
PyTorch's speed.

`conv(x, w, strides=..., padding=...)` is `lax.conv_general_dilated(x, w, strides, padding,
dimension_numbers=('N[D]HWC', '[D]HWIO', 'N[D]HWC'))` (no dilation, no groups) with:

  * a `jax.custom_vjp`: the input gradient is oneDNN's backward-data primitive, the kernel
    gradient its backward-weights primitive;
  * a `jax.custom_batching.custom_vmap` rule on each of the three primitives: a vmapped axis of
    the activations is folded into the batch axis (one call, not one per vmapped element); where
    the kernel itself is vmapped, or for the kernel gradient of vmapped activations (one gradient
    per element), one call per element (`lax.map`);
  * `custom_partitioning` rules: in a jit whose batch is sharded over devices, every device runs
    the primitive on its own shard (forward and input gradient: the batch stays sharded; kernel
    gradient: the per-shard gradients are summed with `psum`), instead of XLA gathering the
    whole batch to every device around an opaque custom call.

Off CPU, when the extension is missing, or for dtypes other than float32 / bfloat16, the
callers in `ops/conv.py` and `models/layers.py` use XLA's convolution (`impl='auto'`).

Threading: oneDNN runs each primitive on an OpenMP team as wide as the cores (GNU OpenMP; the
team's size follows OMP_NUM_THREADS, default: the cores this process may use). XLA calls custom
calls from its own thread pool and may run two independent ones (a layer's input and kernel
gradients) at the same time; the extension serialises executions with one process-wide mutex so
that only one OpenMP team is busy at any time (benchmarks/results/layers.md measures both ways).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import importlib.metadata
import logging
import os
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "available",
    "unavailable_reason",
    "version",
    "supports",
    "hidden",
    "warn_fallback_once",
    "conv",
    "conv_transpose2",
    "same_padding",
    "DISABLE_ENV",
]

log = logging.getLogger(__name__)

# Set to 0 to hide the extension (the XLA path is then used everywhere, as on a machine where it
# could not be built); the tests use it to check the fallback.
DISABLE_ENV = "SSL3D_JAX_ONEDNN"
_EXT_GLOB = "_onednn_conv*.so"
_TARGETS = ("fwd", "bwd_data", "bwd_weights")
_DNNL_SONAME = "libdnnl.so.3"
_DNNL_DIST = "onednn-cpu-gomp"

_lock = threading.Lock()
_state: dict | None = None  # {'ok': bool, 'reason': str | None, 'version': str, 'bf16': bool}


def _find_dnnl() -> list[str]:
    """Candidate paths of oneDNN's runtime library, best first: the pip package
    `onednn-cpu-gomp` (installs into `<prefix>/lib`), this interpreter's prefix, then the
    loader's own search (a system oneDNN)."""
    out = []
    try:
        for f in importlib.metadata.distribution(_DNNL_DIST).files or ():
            if f.name == _DNNL_SONAME:
                out.append(str(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        out.append(os.path.join(prefix, "lib", _DNNL_SONAME))
    out.append(_DNNL_SONAME)
    return list(dict.fromkeys(out))


def _load() -> dict:
    """Load the extension and register its FFI targets once; never raises."""
    if os.environ.get(DISABLE_ENV, "1").strip() == "0":
        return {"ok": False, "reason": f"disabled by {DISABLE_ENV}=0"}
    if not sys.platform.startswith("linux"):
        return {
            "ok": False,
            "reason": f"the oneDNN extension is built on Linux only ({sys.platform})",
        }
    here = Path(__file__).resolve().parent
    ext = sorted(glob.glob(str(here / _EXT_GLOB)))
    if not ext:
        return {
            "ok": False,
            "reason": (
                f"the extension {_EXT_GLOB} is not in {here} (it is built by `pip install -e .`; "
                "a missing C++ compiler or oneDNN package skips it: see the install log)"
            ),
        }
    errors = []
    for path in _find_dnnl():
        try:
            # RTLD_GLOBAL: the extension's dependency on libdnnl.so.3 then resolves to this copy,
            # wherever pip put it (an editable install's extension has no rpath to the venv).
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            break
        except OSError as e:
            errors.append(f"{path}: {e}")
    else:
        return {
            "ok": False,
            "reason": f"oneDNN's runtime library could not be loaded ({'; '.join(errors)}); "
            f"`pip install {_DNNL_DIST}` provides it",
        }
    try:
        lib = ctypes.CDLL(ext[0])
        for t in _TARGETS:
            name = f"ssl3d_onednn_conv_{t}"
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
        v = [ctypes.c_int(), ctypes.c_int(), ctypes.c_int()]
        lib.ssl3d_onednn_version(*[ctypes.byref(i) for i in v])
        bf16 = bool(lib.ssl3d_onednn_bf16_supported())
    except Exception as e:  # a broken build must leave the XLA path working
        return {"ok": False, "reason": f"loading {ext[0]} failed: {e}"}
    return {
        "ok": True,
        "reason": None,
        "version": ".".join(str(i.value) for i in v),
        "bf16": bf16,
        "path": ext[0],
    }


_hidden: list[str] = []  # reasons of the active `hidden()` blocks, innermost last


@contextlib.contextmanager
def hidden(reason: str = "hidden by ssl3d_jax.ops.onednn.hidden()"):
    """Within the block, `available()` is False and `'auto'` resolves to the pure-XLA path, as on
    a machine without the extension: benchmarks time that path, tests check it. Functions traced
    inside keep the path they were traced with."""
    _hidden.append(reason)
    try:
        yield
    finally:
        _hidden.pop()


def _status() -> dict:
    global _state
    if _hidden:
        return {"ok": False, "reason": _hidden[-1]}
    with _lock:
        if _state is None:
            _state = _load()
            if _state["ok"]:
                log.info("oneDNN %s convolutions on CPU (%s)", _state["version"], _state["path"])
        return _state


def available() -> bool:
    """Whether the oneDNN extension is loaded (and its FFI targets registered)."""
    return _status()["ok"]


def unavailable_reason() -> str | None:
    """Why the extension is not available (None when it is)."""
    return _status()["reason"]


def version() -> str | None:
    """oneDNN's version ('3.2.0'), None when unavailable."""
    return _status().get("version")


def supports(dtype) -> bool:
    """Whether `conv` can run activations and kernels of `dtype` (float32 always; bfloat16 where
    oneDNN supports it on this CPU)."""
    st = _status()
    if not st["ok"]:
        return False
    dtype = jnp.dtype(dtype)
    return dtype == jnp.float32 or (dtype == jnp.bfloat16 and st["bf16"])


_warned: set[str] = set()


def warn_fallback_once(context: str, reason: str | None = None) -> None:
    """Log once per process and reason that `context` runs a pure-XLA convolution, naming why
    (`reason`, default: why the extension is unavailable)."""
    reason = reason or unavailable_reason()
    if reason and reason not in _warned:
        _warned.add(reason)
        log.warning("%s: oneDNN convolutions not used (%s); using the XLA path.", context, reason)


def same_padding(spatial, strides, kernel) -> tuple[tuple[int, int], ...]:
    """XLA's 'SAME' padding (low, high) per axis, as `lax.padtype_to_pads` computes it."""
    return tuple(
        tuple(p) for p in lax.padtype_to_pads(tuple(spatial), tuple(kernel), tuple(strides), "SAME")
    )


# ---------------------------------------------------------------- the three primitives


def _ffi(kind: str, a, b, out: jax.ShapeDtypeStruct, geom):
    strides, lo, hi = geom
    return jax.ffi.ffi_call(f"ssl3d_onednn_conv_{kind}", out)(
        a,
        b,
        strides=np.asarray(strides, np.int64),
        pad_lo=np.asarray(lo, np.int64),
        pad_hi=np.asarray(hi, np.int64),
    )


def _batch_axes(sharding) -> object:
    """The mesh axes that shard an operand's leading (batch) axis, or None."""
    if isinstance(sharding, NamedSharding) and len(sharding.spec) > 0:
        return sharding.spec[0]
    return None


def _axes_tuple(axes) -> tuple:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def _rule(kind: str, rank: int) -> tuple[str, dict]:
    """Shardy sharding rule: the batch factor `n` passes through (or is reduced, for the kernel
    gradient); every other axis must be replicated."""
    sp = rank - 2
    xs = " ".join(f"x{i}" for i in range(sp))
    ys = " ".join(f"y{i}" for i in range(sp))
    ks = " ".join(f"k{i}" for i in range(sp))
    rule = {
        "fwd": f"n {xs} ci, {ks} ci co -> n {ys} co",
        "bwd_data": f"n {ys} co, {ks} ci co -> n {xs} ci",
        "bwd_weights": f"n {xs} ci, n {ys} co -> {ks} ci co",
    }[kind]
    # Shardy wants the special factors in the order of their first appearance in the rule.
    others = tuple(dict.fromkeys(f for f in rule.replace(",", " ").split() if f not in ("n", "->")))
    factors = dict(need_replication_factors=others)
    if kind == "bwd_weights":
        factors["reduction_factors"] = ("n",)
    return rule, factors


@functools.lru_cache(maxsize=None)
def _partitioned(kind: str, geom, out_tail: tuple, out_dtype, rank: int):
    """The FFI call of `kind` for one geometry, partitioned over a sharded batch axis.

    `out_tail`: the result's shape without its batch axis (fwd, bwd_data; the batch comes from the
    operand, so that a shard computes its own), or the whole kernel shape (bwd_weights)."""

    def out_struct(a):
        shape = out_tail if kind == "bwd_weights" else (a.shape[0],) + out_tail
        return jax.ShapeDtypeStruct(shape, out_dtype)

    @custom_partitioning
    def op(a, b):
        return _ffi(kind, a, b, out_struct(a), geom)

    def shardings(mesh, arg_shapes):
        axes = _batch_axes(arg_shapes[0].sharding)
        batch = NamedSharding(mesh, P(axes, *([None] * (rank - 1))))
        repl = NamedSharding(mesh, P())
        if kind == "bwd_weights":
            return axes, (batch, batch), repl
        return axes, (batch, repl), batch

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes)[2]

    def partition(mesh, arg_shapes, result_shape):
        axes, arg_sh, out_sh = shardings(mesh, arg_shapes)
        names = _axes_tuple(axes)

        def lower(a, b):
            y = _ffi(kind, a, b, out_struct(a), geom)
            if kind == "bwd_weights" and names:
                y = lax.psum(y, names)
            return y

        return mesh, lower, out_sh, arg_sh

    rule, factors = _rule(kind, rank)
    op.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        propagate_user_sharding=None,
        sharding_rule=rule,
        **factors,
    )
    return op


def _fold(v):
    """[V, B, ...] -> [B * V, ...], B major: a batch sharded over devices stays in blocks."""
    v = jnp.moveaxis(v, 0, 1)
    return v.reshape((v.shape[0] * v.shape[1],) + v.shape[2:])


def _unfold(v, size):
    v = v.reshape((v.shape[0] // size, size) + v.shape[1:])
    return jnp.moveaxis(v, 1, 0)


@functools.lru_cache(maxsize=None)
def _primitive(kind: str, geom, out_tail: tuple, out_dtype, rank: int):
    """`kind`'s partitioned FFI call with a vmap rule (module docstring)."""
    base = _partitioned(kind, geom, out_tail, jnp.dtype(out_dtype), rank)

    @jax.custom_batching.custom_vmap
    def op(a, b):
        return base(a, b)

    @op.def_vmap
    def rule(axis_size, in_batched, a, b):
        a_b, b_b = in_batched
        if kind != "bwd_weights" and a_b and not b_b:
            # Activations vmapped, kernel shared: one call on the folded batch.
            return _unfold(op(_fold(a), b), axis_size), True
        a = a if a_b else jnp.broadcast_to(a, (axis_size,) + a.shape)
        b = b if b_b else jnp.broadcast_to(b, (axis_size,) + b.shape)
        return lax.map(lambda ab: op(*ab), (a, b)), True

    return op


# ---------------------------------------------------------------- the differentiable conv


def _geometry(x_shape, w_shape, strides, padding):
    sp = len(x_shape) - 2
    strides = tuple(int(s) for s in strides)
    if isinstance(padding, str):
        padding = (
            same_padding(x_shape[1:-1], strides, w_shape[:sp])
            if padding == "SAME"
            else (((0, 0),) * sp)
        )
    lo = tuple(int(p[0]) for p in padding)
    hi = tuple(int(p[1]) for p in padding)
    return strides, lo, hi


def _out_spatial(x_spatial, k, geom):
    strides, lo, hi = geom
    return tuple(
        (s + a + b - kk) // st + 1 for s, kk, st, a, b in zip(x_spatial, k, strides, lo, hi)
    )


# The three primitives as differentiable functions of each other: the input gradient of a
# convolution is linear in (dy, w) and the kernel gradient in (x, dy), so each one's gradients are
# the other two (`<fwd(x, w), dy> = <x, bwd_data(dy, w)> = <w, bwd_weights(x, dy)>`). This makes
# transposed convolutions (`conv_transpose`) and second derivatives work too.


def _fwd_op(x, w, geom):
    sp = x.ndim - 2
    tail = _out_spatial(x.shape[1:-1], w.shape[:sp], geom) + (w.shape[-1],)
    return _primitive("fwd", geom, tail, x.dtype, x.ndim)(x, w)


def _bwd_data_op(dy, w, geom, x_tail):
    return _primitive("bwd_data", geom, x_tail, dy.dtype, dy.ndim)(dy, w)


def _bwd_weights_op(x, dy, geom, w_shape):
    return _primitive("bwd_weights", geom, w_shape, x.dtype, x.ndim)(x, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, geom):
    return _fwd_op(x, w, geom)


def _conv_fwd(x, w, geom):
    return _conv(x, w, geom), (x, w)


def _conv_bwd(geom, res, dy):
    x, w = res
    dy = dy.astype(x.dtype)
    return _bwd_data(dy, w, geom, x.shape[1:]), _bwd_weights(x, dy, geom, w.shape)


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bwd_data(dy, w, geom, x_tail):
    return _bwd_data_op(dy, w, geom, x_tail)


def _bwd_data_fwd(dy, w, geom, x_tail):
    return _bwd_data(dy, w, geom, x_tail), (dy, w)


def _bwd_data_bwd(geom, x_tail, res, c):
    dy, w = res
    c = c.astype(dy.dtype)
    return _conv(c, w, geom), _bwd_weights(c, dy, geom, w.shape)


_bwd_data.defvjp(_bwd_data_fwd, _bwd_data_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bwd_weights(x, dy, geom, w_shape):
    return _bwd_weights_op(x, dy, geom, w_shape)


def _bwd_weights_fwd(x, dy, geom, w_shape):
    return _bwd_weights(x, dy, geom, w_shape), (x, dy)


def _bwd_weights_bwd(geom, w_shape, res, c):
    x, dy = res
    c = c.astype(x.dtype)
    return _bwd_data(dy, c, geom, x.shape[1:]), _conv(x, c, geom)


_bwd_weights.defvjp(_bwd_weights_fwd, _bwd_weights_bwd)


def _check(x, w, name):
    if not available():
        raise RuntimeError(f"oneDNN convolutions are unavailable: {unavailable_reason()}.")
    sp = x.ndim - 2
    if sp not in (2, 3) or w.ndim != x.ndim:
        raise ValueError(
            f"{name} expects activations [B, *spatial, C] (2 or 3 spatial axes) and a kernel of "
            f"the same rank; got {x.shape} and {w.shape}."
        )
    if x.dtype != w.dtype:
        raise ValueError(
            f"{name}: activations and kernel must share a dtype, got {x.dtype} and {w.dtype}."
        )
    return sp


def conv(x: jax.Array, w: jax.Array, *, strides=None, padding="SAME") -> jax.Array:
    """oneDNN convolution = `lax.conv_general_dilated(x, w, strides, padding,
    dimension_numbers=('N[D]HWC', '[D]HWIO', 'N[D]HWC'))` (module docstring).

    Args:
      x: `[B, *spatial, Cin]`, 2 or 3 spatial axes, float32 or bfloat16 (`supports`).
      w: `kernel + (Cin, Cout)`, dtype of `x`.
      strides: one per spatial axis (default 1).
      padding: 'SAME', 'VALID' or `((low, high),) * n`.

    Returns:
      `[B, *out_spatial, Cout]`, dtype of `x`. Call only where `available()`; differentiable
      (reverse mode, any order), vmappable, and partitioned over a sharded batch axis.
    """
    sp = _check(x, w, "onednn.conv")
    if w.shape[-2] != x.shape[-1]:
        raise ValueError(
            f"onednn.conv: kernel {w.shape} does not take {x.shape[-1]} input channels."
        )
    geom = _geometry(x.shape, w.shape, strides or (1,) * sp, padding)
    return _conv(x, w, geom)


def conv_transpose2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """2x..x2 stride-2 transposed convolution, exactly `nnx.ConvTranspose(kernel_size=(2,) * n,
    strides=2)` without bias (= `layers.UpConv2`'s einsum): oneDNN's input gradient of the
    2x..x2 stride-2 convolution that maps the output grid onto the input grid.

    Args:
      x: `[B, *spatial, Cin]`, 2 or 3 spatial axes, float32 or bfloat16.
      kernel: `(2,) * n + (Cin, Cout)` in ConvTranspose's layout, dtype of `x`.

    Returns:
      `[B, *(2 * spatial), Cout]`, dtype of `x`.
    """
    sp = _check(x, kernel, "onednn.conv_transpose2")
    if kernel.shape != (2,) * sp + (x.shape[-1], kernel.shape[-1]):
        raise ValueError(
            f"onednn.conv_transpose2: kernel {kernel.shape} is not (2,)*{sp} + ({x.shape[-1]}, O)."
        )
    # ConvTranspose correlates the zero-dilated input with the kernel: tap (1 - a) lands on output
    # sub-position a, hence the flip; the convolution it transposes maps Cout -> Cin.
    wc = jnp.swapaxes(kernel[(slice(None, None, -1),) * sp], -1, -2)
    geom = ((2,) * sp, (0,) * sp, (0,) * sp)
    tail = tuple(2 * s for s in x.shape[1:-1]) + (kernel.shape[-1],)
    return _bwd_data(x, wc, geom, tail)
