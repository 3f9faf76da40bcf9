#!/bin/bash
# Run on the lent H200 machine (16 CPU cores, Python 3.12, jax 0.11.2, torch 2.11) from the
# repository root with the wheels that machine lacks in .whl/ (py3.12 manylinux wheels of grain,
# array-record, portpicker, ml-collections, nibabel, tensorboardX, onednn-cpu-gomp and
# onednn-devel-cpu-gomp, fetched with `pip download --no-deps --only-binary=:all:
# --python-version 3.12 ...`). Results: benchmarks/results/h200_*.md.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
ls .whl/*.whl | grep -v onednn | xargs python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --prefix /tmp/pfx .whl/onednn*.whl || exit 1
export PYTHONPATH=/tmp/site:/tmp/pfx/lib/python3.12/site-packages:$PWD
python3 -c "import jax, flax, optax, orbax.checkpoint, torch; print('versions', jax.__version__, flax.__version__, optax.__version__, torch.__version__, jax.devices())" 2>&1 | tail -2
nproc; lscpu | grep "Model name"
INC=$(python3 -c "import jax; print(jax.ffi.include_dir())")
g++ -O2 -std=c++17 -shared -fPIC -w -I$INC -I/tmp/pfx/include ssl3d_jax/ops/csrc/onednn_conv.cc -L/tmp/pfx/lib -l:libdnnl.so.3 -o ssl3d_jax/ops/_onednn_conv.so && echo built-ext
echo "== GPU: which conv path, and the model on the GPU"
timeout 120 python3 - <<'PY' 2>&1 | grep -v "^WARNING" | tail -8
import jax, jax.numpy as jnp
from flax import nnx
from ssl3d_jax.ops import conv, onednn
from ssl3d_jax.models.unet import SegmentationModel
print("backend", jax.default_backend(), "auto ->", conv.auto_impl((2, 40, 40, 40, 8)), "onednn available on host:", onednn.available())
m = SegmentationModel(4, 4, filters=(8, 16), bottom_filters=32, conv_impl="auto", rngs=nnx.Rngs(0))
g, p = nnx.split(m, nnx.Param)
f = jax.jit(lambda p, x: nnx.merge(g, p)(x))
x = jnp.ones((2, 40, 40, 40, 4))
hlo = f.lower(p, x).as_text()
print("custom calls in the GPU program:", hlo.count("ssl3d_onednn"), "| output", f(p, x).shape, f(p, x).devices())
PY
echo "== GPU train steps"
timeout 280 python3 benchmarks/train_step.py --sizes=default,paper --no-torch --phases= --steps=10 --out=$OUT/gpu_train_step 2>&1 | grep -v "^WARNING" | grep "^(b)\|Error\|error" | tail -20
echo "== CPU (16 cores): ours (oneDNN) vs PyTorch, fresh processes"
JAX_PLATFORMS=cpu timeout 200 python3 benchmarks/train_step.py --sizes=default --tasks=rpl,finetune --phases= --steps=10 --rounds=2 --out=$OUT/cpu16_train_step 2>&1 | grep -v "^WARNING" | grep "^(b)\|^| pretext\|^| finetune\|Error" | tail -8
ls $OUT
