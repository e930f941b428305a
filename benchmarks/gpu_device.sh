#!/usr/bin/env bash
# What the lent GPU machine runs (benchmarks/GPU.md gives the device `run` calls):
#
#   bash benchmarks/gpu_device.sh tests      # pytest -m gpu, every test file
#   bash benchmarks/gpu_device.sh bench      # benchmarks/gpu_speed.py, full size
#   bash benchmarks/gpu_device.sh smoke      # gpu_speed.py --quick (a minute): try it first
#
# Logs and results go to $OUT (the folder the device tool brings back; at most 8 files):
# device.txt (nvidia-smi, versions; the kernels' resources need no device: python -m
# latkv._gpu.nvrtc --resources here), tests.log, tests.xml, bench.log,
# gpu.json and gpu.md. The machine's python3 (3.12) already has CuPy, numba-cuda and the
# rest; .whl/ (scripts/device_wheels.sh) adds gguf.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/latkv-gpu-out}
mkdir -p "$OUT"
what=${1:-smoke}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH="$PWD:/tmp/site"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem \
        --format=csv 2>&1
    python3 -c "import cupy, numba, numpy; print('cupy', cupy.__version__, 'numba',
numba.__version__, 'numpy', numpy.__version__, 'cuda runtime',
cupy.cuda.runtime.runtimeGetVersion())" 2>&1
} > "$OUT/device.txt"
case "$what" in
    tests)
        timeout 560 python3 -m pytest -m gpu tests -p no:cacheprovider -q \
            --junitxml="$OUT/tests.xml" --durations=15 2>&1 | tee "$OUT/tests.log" | tail -n 40
        status=${PIPESTATUS[0]} ;;
    bench|smoke)
        flags=()
        [ "$what" = smoke ] && flags=(--quick)
        timeout 560 python3 benchmarks/gpu_speed.py "${flags[@]}" --out "$OUT/gpu.json" \
            --markdown "$OUT/gpu.md" 2>&1 | tee "$OUT/bench.log" | tail -n 80
        status=${PIPESTATUS[0]} ;;
    *)
        echo "usage: bash benchmarks/gpu_device.sh tests|bench|smoke" >&2
        status=2 ;;
esac
exit "$status"
