#!/usr/bin/env bash
# Every check that needs a GPU, in one call of under ~8 minutes on one H100 or H200:
# the CUDA tests, then the overhead benchmark, then the throughput benchmark.
#
#   bash benchmarks/gpu_check.sh          # from the repository root
#
# No install needed: the library is taken from src/ (PYTHONPATH; throughput.py also gets
# examples/celeba, the example whose modules it times). The output goes to the
# terminal and to $OUT/gpu_check.log ($OUT when set, else ./gpu_check.log). A failing or
# timed-out step does not stop the next ones; the exit status is 1 if any failed.
# PYTHON picks the interpreter [python, else python3].
set -u -o pipefail

mkdir -p "${OUT:-.}"
log="$(cd "${OUT:-.}" && pwd)/gpu_check.log"  # before the cd below: $OUT may be relative
cd "$(dirname "$0")/.."
python="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
# Unbuffered, so that a step killed by its time limit still leaves what it printed.
export PYTHONUNBUFFERED=1

# Each step's limit keeps one hung step from eating the others' time; together they stay
# under 8 minutes, and each sits well above what the step needs on an H100.
run_step() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s, $(date -u +%T)): $*"
    local started=$SECONDS status=0
    timeout --kill-after=10 "$limit" "$@" || status=$?
    echo "=== $name: $([ "$status" -eq 0 ] && echo ok || echo "FAILED, exit $status") in $((SECONDS - started)) s"
    [ "$status" -eq 0 ] || failed+=("$name")
}

{
    failed=()
    echo "gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$python" -c 'import torch, torchvision; print("python", __import__("sys").version.split()[0], "| torch", torch.__version__, "| torchvision", torchvision.__version__, "| CUDA", torch.version.cuda, "| available:", torch.cuda.is_available())' || true

    run_step tests 100 "$python" -m pytest tests/test_gpu.py -q -rA -p no:cacheprovider
    run_step overhead 150 "$python" benchmarks/overhead.py --device cuda
    run_step throughput 210 env PYTHONPATH="$PYTHONPATH:examples/celeba" \
        "$python" benchmarks/throughput.py --device cuda --images 20000

    echo
    if [ "${#failed[@]}" -eq 0 ]; then
        echo "gpu_check: all steps ok"
    else
        echo "gpu_check: FAILED: ${failed[*]}"
        exit 1
    fi
} 2>&1 | tee "$log"
