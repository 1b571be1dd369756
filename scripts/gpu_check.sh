#!/usr/bin/env bash
# The one command a session with a GPU runs (device tool, from the repository root):
#
#     bash scripts/gpu_check.sh            # carry [".whl"]; results land in $OUT (or ./gpu-out)
#
# It prints the device, installs the wheels carried in .whl/ (the GPU image has torch, CuPy,
# transformers, pytest and hypothesis, but not tiercache's zarr, numcodecs, donfig and
# google-crc32c, which `import tiercache` needs; nothing can be fetched there), runs the GPU
# tests, then the GPU benchmarks, and keeps everything it prints in $OUT/gpu.txt beside the
# benchmarks' gpu.json, gpu.png, decode.json and decode.png (commit them to docs/results/).
#
# Make the wheels here, once (Python 3.12, x86-64; .whl/ is git-ignored):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl \
#       zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.txt") 2>&1
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || true
"$PY" -c 'import torch, cupy; print("torch", torch.__version__, "cuda", torch.version.cuda,
"device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
"cupy", cupy.__version__)'

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "== wheels from .whl/"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c 'import tiercache.kernels.cuda as c; print("kernels.cuda.available():", c.available())' \
  || exit 1

status=0
echo "== GPU tests"
"$PY" -m pytest -m gpu tests/kernels/test_cuda_gpu.py tests/tiers/test_device_gpu.py \
  tests/test_ipc_gpu.py -q -rs -p no:cacheprovider || status=1
echo "== CPU tests of the kernels' reference (the oracle the GPU tests trust)"
"$PY" -m pytest tests/kernels/test_reference.py tests/kernels/test_reference_quant.py \
  tests/test_ipc.py tests/kernels/test_cuda.py -q -p no:cacheprovider || status=1

echo "== GPU benchmark"
"$PY" -m tiercache.bench.gpu --out "$OUT" || status=1
echo "== decode while prefetching, and an attached engine's loads"
"$PY" -m tiercache.bench.decode --out "$OUT" || status=1
echo "== exit $status"
exit $status
