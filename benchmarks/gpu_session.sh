#!/usr/bin/env bash
# The GPU work a session owes, one stage per device call, fitted to a 30-minute budget in
# calls of at most 10 minutes (expected times in benchmarks/GPU_NOTES.md).  Logs and
# result files go under $OUT; JSON results are rewritten as each case finishes, so a
# stage stopped by its time limit still returns what it measured.
#
#   bash benchmarks/gpu_session.sh smoke               # GPU tests -x --durations + launched kernels' resources (< 3 min)
#   bash benchmarks/gpu_session.sh sweep [--budget-s S] # configs x backward strategies, both heads (< 9 min)
#   bash benchmarks/gpu_session.sh targets [--iters N]  # every target's ratio and verdict (< 8 min at --iters 10)
#   bash benchmarks/gpu_session.sh tests                # the whole suite on the compiled kernels
#   bash benchmarks/gpu_session.sh accuracy             # python -m benchmarks.accuracy
#   bash benchmarks/gpu_session.sh compare [benchmarks.compare options]
#
# The peers Liger-Kernel and Cut Cross-Entropy are pure-Python wheels: download them once
# into .whl/ (ignored through .git/info/exclude) and name .whl in the call's carry:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
set -uo pipefail
stage=${1:?"stage: smoke, sweep, targets, tests, accuracy or compare"}
out=${OUT:-/tmp/hardfocus-out}
mkdir -p "$out/results"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
    || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv \
    > "$out/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt"

case $stage in
    smoke)
        python3 -m pytest -q -p no:cacheprovider -x --durations=15 -rfEs tests/test_gpu.py 2>&1 | tee "$out/smoke.log"
        python3 -m benchmarks.kernel_resources --launched --out "$out/results" 2>&1 | tee -a "$out/smoke.log" ;;
    sweep)    python3 -m benchmarks.sweep --out "$out/results" "${@:2}" 2>&1 | tee "$out/sweep.log" ;;
    targets)  python3 -m benchmarks.targets --out "$out/results" "${@:2}" 2>&1 | tee "$out/targets.log" ;;
    tests)    python3 -m pytest -q -p no:cacheprovider -rfEs 2>&1 | tee "$out/tests.log" ;;
    accuracy) python3 -m benchmarks.accuracy --out "$out/results" 2>&1 | tee "$out/accuracy.log" ;;
    compare)  python3 -m benchmarks.compare --out "$out/results" "${@:2}" 2>&1 | tee "$out/compare.log" ;;
    *)        echo "unknown stage $stage" >&2; exit 2 ;;
esac
