#!/usr/bin/env bash
# Run benchmarks/gpu_suite.py on a lent GPU machine, from the repo root, inside a hard time limit.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR] [BUDGET_S] [more gpu_suite options]
#                                  # defaults: $OUT (else benchmarks/results), 250 s
#
# The machine has torch, timm, lightning, accelerate, rich, typer, psutil, opencv, scipy and PyYAML but not
# albumentations (which mps_autobatch.train.data imports, synthetic data included): when it is missing, the
# wheels in benchmarks/wheels/ (albumentations, albucore, pydantic, ...; cp312 manylinux) go into a private
# folder on PYTHONPATH, offline. The suite stops starting cases when BUDGET_S runs short; `timeout` kills it
# 30 s after that at the latest, and it has written its results after every case.
#
# The wheels are not in git (8 MB); fetch them on a machine with the package registry, then pass
# benchmarks/wheels in the device tool's `carry`:
#   pip download albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
#     typing-inspection simsimd stringzilla typing_extensions --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d benchmarks/wheels
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results}}
BUDGET_S=${2:-250}
shift $(($# < 2 ? $# : 2))
PY=${PYTHON:-python3}
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GPU_SUITE_COMMAND="bash benchmarks/gpu_suite.sh $OUT_DIR $BUDGET_S${*:+ $*}"

if ! "$PY" -c "import albumentations" 2>/dev/null; then
    shopt -s nullglob
    wheels=(benchmarks/wheels/*.whl)
    if ((${#wheels[@]})); then
        # Keep the machine's typing_extensions when it is new enough for pydantic (>= 4.16).
        if "$PY" -c "import importlib.metadata as m, sys; v = m.version('typing_extensions').split('.'); \
sys.exit(0 if (int(v[0]), int(v[1])) >= (4, 16) else 1)" 2>/dev/null; then
            wheels=("${wheels[@]/*typing_extensions-*/}")
        fi
        site=/tmp/gpu_suite_site
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            ${wheels[@]}; then
            export PYTHONPATH="$PYTHONPATH:$site"
        else
            echo "gpu_suite.sh: installing benchmarks/wheels failed; the trainer case will be skipped" >&2
        fi
    fi
fi

timeout -k 5 $((BUDGET_S + 30)) "$PY" -m benchmarks.gpu_suite --out "$OUT_DIR" --budget-s "$BUDGET_S" "$@"
