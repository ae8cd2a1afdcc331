#!/usr/bin/env bash
# The one GPU check for a lent GPU machine (issue: CUDA kernels). From the repo root there:
#   device run: command "bash scripts/gpu-check.sh", carry [".whl"], timeout_s 540
# Here, before the call, once: echo /.whl/ >> .git/info/exclude && scripts/gpu-wheels.sh
# It installs the carried wheels (the rwkv pip package, the anchor), builds our kernels for the card, runs the
# cuda-marked tests and the GPU benchmark (ours beside the package with its CUDA kernels), and prints a short
# table last. Logs go to $OUT when the device tool sets it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RWKV_CONVERT_CACHE=/tmp/rwkv-convert-cache
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

start=$(date +%s)
# built, then every kernel against the torch path on this card: the self-test the runner relies on (docs/cuda.md)
python3 -c "import sys, torch; from rwkv_convert.cuda import build, selftest; ok = build.extension() is not None
print(selftest.format_checks(build.self_test_report() or [], torch.cuda.get_device_name())); sys.exit(0 if ok else 1)" \
    | tee "$OUT/selftest.md" || { echo "KERNEL BUILD OR SELF-TEST FAILED"; exit 1; }
echo "kernels built and self-tested in $(( $(date +%s) - start )) s"
python3 -m rwkv_convert.cli doctor 2>&1 | tee "$OUT/doctor.txt" | grep -E "GPU|nvcc|kernels"

timeout "${GPU_CHECK_TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -15
tests_rc=${PIPESTATUS[0]}

# GPU_CHECK_VERSIONS / GPU_CHECK_BENCH_TIMEOUT shorten a run that must fit a small device budget
for version in ${GPU_CHECK_VERSIONS:-v7 v6}; do
    timeout "${GPU_CHECK_BENCH_TIMEOUT:-240}" python3 benchmarks/bench_gpu.py --version "$version" --file-dtype bf16 \
        --strategies "cuda fp16" "cuda bf16" "cuda fp16i8" 2>&1 | tee "$OUT/bench-$version.txt" | tail -9
done
echo "cuda tests exit code: $tests_rc (see $OUT/tests.log)"
