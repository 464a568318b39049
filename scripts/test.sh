#!/usr/bin/env bash
# The CPU test suite, in two stages that both always run:
#   1. everything not marked `interpreter`: model, loading, checkpoint, recipes, docs, robustness (PyTorch path);
#   2. the tests marked `interpreter` (the Triton kernels, and the model on them) in Triton's CPU interpreter.
# Each stage reports on its own; the script fails when either failed. Extra arguments go to both pytest calls.
# On a CUDA machine run the GPU cases instead with: python -m pytest -m "gpu or interpreter" tests
set -uo pipefail
cd "$(dirname "$0")/.."

run_stage() {  # run_stage NAME CMD...: runs CMD, prints its wall and CPU time and exit status, returns the status
    local name=$1 status TIMEFORMAT
    shift
    echo "=== $name: ${*@Q}"
    TIMEFORMAT="=== $name: %0R s wall, %0U s user + %0S s system CPU"
    time "$@"
    status=$?
    echo "=== $name: exit status $status"
    return "$status"
}

run_stage "stage 1 (PyTorch)" python3 -m pytest -q -m "not interpreter" tests "$@"
stage1=$?
run_stage "stage 2 (Triton interpreter)" env TRITON_INTERPRET=1 python3 -m pytest -q -m interpreter tests "$@"
stage2=$?

# pytest's exit status 5 means no test was selected: without extra arguments that is a failure (a stage that tests
# nothing hides a missing marker); with them (say -k NAME) the other stage may rightly select nothing.
if [[ $# -gt 0 ]]; then
    [[ $stage1 -eq 5 ]] && stage1=0
    [[ $stage2 -eq 5 ]] && stage2=0
fi
describe() {  # pytest exit status -> word
    case $1 in 0) echo passed ;; 5) echo "FAILED (no tests selected)" ;; *) echo "FAILED (exit $1)" ;; esac
}
echo "summary: stage 1 (PyTorch) $(describe $stage1); stage 2 (Triton interpreter) $(describe $stage2)"
[[ $stage1 -eq 0 && $stage2 -eq 0 ]]
