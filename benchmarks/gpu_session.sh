#!/usr/bin/env bash
# The GPU work a session owes, one stage per device call (each ends well inside 10 min),
# logs and result files under $OUT:
#
#   bash benchmarks/gpu_session.sh tests      # the whole test suite, compiled Triton path
#   bash benchmarks/gpu_session.sh targets    # python -m benchmarks.targets
#   bash benchmarks/gpu_session.sh accuracy   # python -m benchmarks.accuracy
#   bash benchmarks/gpu_session.sh compare [benchmarks.compare options]
#
# The peers Liger-Kernel and Cut Cross-Entropy are pure-Python wheels: download them once
# into .whl/ (ignored through .git/info/exclude) and name .whl in the call's carry:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
set -uo pipefail
stage=${1:?"stage: tests, targets, accuracy or compare"}
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
    tests)    python3 -m pytest -q -p no:cacheprovider --timeout 300 -rfEs 2>&1 | tee "$out/tests.log" ;;
    targets)  python3 -m benchmarks.targets --out "$out/results" 2>&1 | tee "$out/targets.log" ;;
    accuracy) python3 -m benchmarks.accuracy --out "$out/results" 2>&1 | tee "$out/accuracy.log" ;;
    compare)  python3 -m benchmarks.compare --out "$out/results" "${@:2}" 2>&1 | tee "$out/compare.log" ;;
    *)        echo "unknown stage $stage" >&2; exit 2 ;;
esac
