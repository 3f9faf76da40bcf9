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
INC=$(python3 -c "import jax; print(jax.ffi.include_dir())")
g++ -O2 -std=c++17 -shared -fPIC -w -I$INC -I/tmp/pfx/include ssl3d_jax/ops/csrc/onednn_conv.cc -L/tmp/pfx/lib -l:libdnnl.so.3 -o ssl3d_jax/ops/_onednn_conv.so && echo built-ext
export JAX_PLATFORMS=cpu
for r in 1 2; do
for cfg in "default:X=1" "serialize0:SSL3D_ONEDNN_SERIALIZE=0" "passive:OMP_WAIT_POLICY=PASSIVE" "omp8:OMP_NUM_THREADS=8" "xla_conv:SSL3D_JAX_ONEDNN=0"; do
  name=${cfg%%:*}; envs=${cfg#*:}
  echo "$name $(env $envs timeout 60 python3 benchmarks/device/step_times.py pretext/rpl,finetune/full 15 2>/dev/null | tail -1)"
done; done
