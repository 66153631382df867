#!/usr/bin/env bash
# One prepared GPU run (issue 8, item 6): ResNet-18 (width 64, CIFAR stem) on full Fashion-MNIST
# (55,000 train / 5,000 holdout / 10,000 test, 1x28x28), mixed forget set, --device cuda.
#
#     bash bench/gpu.sh                       # defaults below, about 9 minutes on one H200
#     EPOCHS=10 METHODS=finetune bash bench/gpu.sh
#
# Environment (all optional):
#   PY       python with torch + CUDA (default: .venv/bin/python if present, else python3)
#   DATA     dataset file (default data/fashion_mnist.npz; written with `python -m bench.datasets
#            --which fashion_mnist` when absent, which needs the Debian package
#            dataset-fashion-mnist: on a machine without it, bring the file along)
#   EPOCHS   original and retrain epochs (default 15)       BATCH   batch size (default 128)
#   SEEDS    seeds 0..K-1 (default 1)                        SCENARIO  mixed|random|mislabeled|poisoned
#   METHODS  comma-separated unlearners run alone and as RUM^F besides rum_default
#            (default finetune,neggrad_plus,salun,scrub,del)
#   BUDGET   seconds after which no new unlearning run starts (default 420; the run in flight
#            finishes, the rest are listed as skipped)
#   RESULTS  output folder (default bench/results); if $OUT is set, the files are copied there too
#
# Without CUDA it stops at once with exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DATA=${DATA:-data/fashion_mnist.npz}
EPOCHS=${EPOCHS:-15}
BATCH=${BATCH:-128}
SEEDS=${SEEDS:-1}
SCENARIO=${SCENARIO:-mixed}
METHODS=${METHODS:-finetune,neggrad_plus,salun,scrub,del}
BUDGET=${BUDGET:-420}
RESULTS=${RESULTS:-bench/results}
NAME=unlearning_gpu_fashion_${SCENARIO}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)' 2>/dev/null; then
    echo "bench/gpu.sh: CUDA is not available to $PY (torch.cuda.is_available() is False); this benchmark needs a GPU" >&2
    exit 2
fi

start=$(date +%s)
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"# gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")'
if [ ! -f "$DATA" ]; then
    echo "# $DATA missing: writing it"
    "$PY" -m bench.datasets --out "$(dirname "$DATA")" --which fashion_mnist
fi
mkdir -p "$RESULTS"
set +e
PYTHONUNBUFFERED=1 "$PY" -m bench.unlearning --data "$DATA" --mean 0.2860 --std 0.3530 --device cuda \
    --arch resnet18 --arch-kwargs '{"width": 64}' --scenario "$SCENARIO" --epochs "$EPOCHS" \
    --batch-size "$BATCH" --seeds "$SEEDS" --methods "$METHODS" --time-budget "$BUDGET" \
    --json "$RESULTS/$NAME.json" --table "$RESULTS/$NAME.txt" 2>&1 | tee "$RESULTS/$NAME.log"
status=${PIPESTATUS[0]}
set -e
echo "# bench/gpu.sh: exit $status, wall $(( $(date +%s) - start ))s"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp -f "$RESULTS/$NAME".{json,txt,log} "$OUT"/ 2>/dev/null || true
fi
exit "$status"
