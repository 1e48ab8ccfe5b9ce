#!/bin/bash
# docs/grid.md, "On two CPU cores Ray gains little": the small CPU profile (cpu-small-smollm2), run
# sequentially on two torch threads, then as Ray tasks on two one-thread workers; each from empty
# results, editors and caches (the converted model shared). Run it on a quiet machine.
#   bash experiments/compare_executors.sh        # wall times appended to /tmp/exec/times
cd "$(dirname "$0")/.."
export LKS_DATA_DIR=${LKS_DATA_DIR:-$(cd .. && pwd)/shared/data}
models=${LKS_CACHE_DIR:-$HOME/.cache/lks}/models
for mode in seq ray; do
  d=/tmp/exec/$mode; rm -rf $d; mkdir -p $d/cache; ln -s "$models" $d/cache/models
  s=$(date +%s)
  if [ $mode = seq ]; then
    LKS_CACHE_DIR=$d/cache OMP_NUM_THREADS=2 .venv/bin/python -m lks reproduce --profile cpu-small-smollm2 --device cpu \
      --results $d/results --editors $d/editors > $d/log 2>&1
  else
    LKS_CACHE_DIR=$d/cache .venv/bin/python -m lks reproduce --profile cpu-small-smollm2 --device cpu --executor ray \
      --workers 2 --results $d/results --editors $d/editors > $d/log 2>&1
  fi
  echo "$mode rc $? $(( $(date +%s) - s )) s $(date -u +%H:%M)" >> /tmp/exec/times
done
