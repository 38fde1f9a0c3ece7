#!/usr/bin/env bash
# The GPU work a session owes (issue #14), fitted to the lease a task gets at present:
# 15 minutes of device time in all, the machine's start (1-2 min) included, calls of at
# most 10 minutes.  One call does it all:
#
#   device run, carry [".whl"], timeout_s 540:   bash benchmarks/gpu_session.sh all
#
# `all` runs, each stage under its own time limit so that the next one always starts:
#   smoke    tests/kernels/test_gpu.py on the compiled kernels (-x)                    <= 120 s
#   sweep    configs x backward strategies, Llama-3-8B head then Gemma-2-2B    <= 100 s
#   targets  every target's cases (peers included), measured with the sweep's
#            fastest configs (benchmarks.tuned), Llama-3-8B head first          <= 200 s
#   profile  Nsight Compute on our forward and backward kernels, Llama-3-8B    <=  45 s
# At most 7.8 minutes (465 s), about 9.5 with the machine's start.
#
# What comes back (at most 8 files may): $OUT/session.log (everything, live), $OUT/gpu.txt
# (device, clocks, versions, each stage's exit status) and $OUT/results.tar.gz, rewritten
# after every stage, so a call stopped at its limit still returns what was measured.
#
# The stages one at a time, for a rerun or a longer lease:
#   bash benchmarks/gpu_session.sh smoke | sweep | targets | profile | launched | tests | accuracy | compare [options]
# Extra options reach a stage's program through SWEEP_ARGS, TARGETS_ARGS (appended).
#
# The peers Liger-Kernel and Cut Cross-Entropy are pure-Python wheels that the device's
# image lacks: download them once into .whl/ (ignored through .git/info/exclude) and name
# .whl in the call's carry:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
set -uo pipefail
stage=${1:?"stage: all, smoke, sweep, targets, profile, launched, tests, accuracy or compare"}
out=${OUT:-/tmp/hardfocus-out}
work=${HARDFOCUS_SESSION_WORK:-/tmp/hardfocus-session}
results=$work/results
mkdir -p "$out" "$results"
export PYTHONUNBUFFERED=1
inner=0   # a stage run by `all` (its set-up done, its output already logged)
if [[ ${2:-} == --inner ]]; then
    inner=1
    set -- "$1" "${@:3}"
fi

pack() {   # everything measured so far, in one file
    tar -czf "$out/results.tar.gz.part" -C "$work" results && mv "$out/results.tar.gz.part" "$out/results.tar.gz"
}

latest_sweep() { ls -t "$results"/sweep-*.json 2> /dev/null | head -n 1; }

run_stage() {   # run_stage NAME LIMIT_S: stage NAME under a time limit, its status noted, results packed
    local name=$1 limit=$2 start=$SECONDS status
    echo "=== $name (limit ${limit} s) $(date -u +%H:%M:%S)"
    timeout --kill-after=10 "$limit" bash "$0" "$name" --inner
    status=$?
    echo "stage $name: exit $status after $((SECONDS - start)) s" | tee -a "$out/gpu.txt"
    pack
}

if (( ! inner )); then
    exec > >(tee -a "$out/session.log") 2>&1
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if ! python3 -c "import hardfocus_fused.kernels" 2> /dev/null; then
        python3 -m pip install -q --no-deps --no-build-isolation -e . > "$work/install.log" 2>&1 \
            || { cat "$work/install.log"; exit 1; }
    fi
    {
        date -u +"date %Y-%m-%dT%H:%M:%SZ"
        nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1
        python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    } >> "$out/gpu.txt"
fi

case $stage in
    all)
        run_stage smoke 120
        run_stage sweep 100
        run_stage targets 200
        run_stage profile 45 ;;
    smoke)
        python3 -m pytest -q -p no:cacheprovider -x --durations=15 -rfEs tests/kernels/test_gpu.py ;;
    sweep)
        python3 -m benchmarks.sweep --out "$results" --budget-s 75 ${SWEEP_ARGS:-} "${@:2}" ;;
    targets)
        sweep=$(latest_sweep)
        python3 -m benchmarks.targets --out "$results" --iters 5 --budget-s 160 \
            ${sweep:+--configs-from "$sweep"} ${TARGETS_ARGS:-} "${@:2}" ;;
    profile)
        ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2> /dev/null | head -n 1)
        [[ -n $ncu ]] || { echo "ncu not found"; exit 127; }
        "$ncu" --clock-control none -k 'regex:_lse_forward_kernel|_lce_backward_kernel' -c 3 \
            --section SpeedOfLight --section Occupancy --section LaunchStats --csv \
            --log-file "$results/ncu-llama3-8b.csv" python3 -m benchmarks.ncu_profile "${@:2}" ;;
    launched)
        python3 -m benchmarks.kernel_resources --launched --out "$results" ;;
    tests)
        python3 -m pytest -q -p no:cacheprovider -rfEs ;;
    accuracy)
        python3 -m benchmarks.accuracy --out "$results" "${@:2}" ;;
    compare)
        python3 -m benchmarks.compare --out "$results" "${@:2}" ;;
    *)
        echo "unknown stage $stage" >&2; exit 2 ;;
esac
status=$?
(( inner )) || pack
exit $status
