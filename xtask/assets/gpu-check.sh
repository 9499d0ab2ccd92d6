#!/usr/bin/env bash
# Runs on the GPU machine (no Rust, no network): every GPU test, the kernel benchmarks and the
# PyTorch comparison on the same GPU. Made by `cargo xtask gpu-check`; run as
#   bash gpu-check/run.sh            (results under $OUT, or gpu-check/out)
# SECTIONS picks what runs, in this order (default: all; torch-compile, last, gets what is left
# of the budget):
#   tests step torch-step cli kernels torch-kernels torch-compile
# (cli: `simclr train` end to end on the GPU, bf16 with GPU augmentation, quick-start preset)
# e.g. SECTIONS="step torch-compile" for a second call that sets our step beside PyTorch's
# torch.compile step.
# QUICK=1 shrinks the benchmarks. The device tool brings back at most 8 files from $OUT, so
# everything goes to 7: log.txt, tests.txt and the five JSON results.
set -u -o pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$HERE/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
START=$(date +%s)

# CUDA's libraries come as Python packages there: put every site-packages/nvidia/*/lib on the path.
for sp in $("$PY" -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null); do
  for lib in "$sp"/nvidia/*/lib; do
    [ -d "$lib" ] && LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
  done
done
# cudarc looks for libnccl.so, the wheel ships libnccl.so.2: link it in a private folder.
mkdir -p "$HERE/lib"
IFS_SAVED=$IFS; IFS=:
for d in ${LD_LIBRARY_PATH:-}; do
  if [ -e "$d/libnccl.so.2" ] && [ ! -e "$HERE/lib/libnccl.so" ]; then
    ln -sf "$d/libnccl.so.2" "$HERE/lib/libnccl.so"
  fi
done
IFS=$IFS_SAVED
LD_LIBRARY_PATH="$HERE/lib:${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH
export RUST_BACKTRACE=1
# NCCL connects every algorithm at init (under our timeout), not lazily inside a collective.
export NCCL_RUNTIME_CONNECT="${NCCL_RUNTIME_CONNECT:-0}"
# The parity test reads the PyTorch fixtures from the repository this folder sits in.
SIMCLR_REPO_ROOT="$(cd "$HERE/.." && pwd)"
export SIMCLR_REPO_ROOT

SECTIONS="${SECTIONS:-tests step torch-step cli kernels torch-kernels torch-compile}"
want() { case " $SECTIONS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
LOG="$OUT/log.txt"

{
  echo "== machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "SECTIONS=$SECTIONS"
} | tee -a "$LOG"

status=0
# One device call may run 600 s, and a session has 15 minutes of device time, machine start
# included: every section gets what is left of BUDGET seconds (500 by default, the most
# important first), so the results so far always come back, with time left over for a short
# second call. BUDGET=... changes it.
BUDGET="${BUDGET:-500}"
cap() {  # cap WANT: seconds for the next section, 0 when the budget is spent
  local left=$(( START + BUDGET - $(date +%s) ))
  if [ "$left" -lt 15 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
section() {  # section LOG SECONDS CMD...: runs CMD under that timeout, appending to LOG
  local log=$1 t=$2; shift 2
  if [ "$t" -eq 0 ]; then
    echo "skipped: the time budget of $BUDGET s is spent" | tee -a "$log"
    return 1
  fi
  # Not a pipe into tee: a process the command left behind (the PyTorch scripts run their
  # work in a child of its own session, which timeout's signal misses) would hold the pipe
  # open and stall the script; -k kills what ignores the first signal.
  timeout -k 10 "$t" "$@" > >(tee -a "$log") 2>&1
}
header() { echo "== $1" | tee -a "$LOG"; }
inner() {  # inner T: a script's own limit inside our T (it starts its clock after importing torch)
  if [ "$1" -gt 60 ]; then echo $(( $1 - 40 )); else echo $(( $1 * 2 / 3 )); fi
}

if want tests; then
  # Every buffer an operation takes starts as NaN (host and device), so an output value a
  # kernel leaves unwritten shows rather than passing on stale, plausible values. Not for the
  # benchmarks.
  export SIMCLR_POISON_BUFFERS=1
  for t in "$HERE"/bin/test-*; do
    name=$(basename "$t")
    echo "== $name" | tee -a "$OUT/tests.txt"
    if ! section "$OUT/tests.txt" "$(cap 240)" "$t" --test-threads 1 --nocapture; then
      echo "FAILED: $name" | tee -a "$OUT/tests.txt"
      status=1
    fi
  done
  # The verdicts in the log too: tests.txt is long.
  grep -E "^== test-|^test result:|^FAILED|panicked|^skipped" "$OUT/tests.txt" >> "$LOG"
  unset SIMCLR_POISON_BUFFERS
fi

if want step; then
  header "training step on the CUDA backend"
  section "$LOG" "$(cap 240)" "$HERE/bin/bench-gpu_train_step" --json "$OUT/step.json" ${QUICK:+--quick} || status=1
fi

if want torch-step && [ -f "$HERE/torch_gpu_baseline.py" ]; then
  header "PyTorch training step on the same GPU (eager)"
  # QUICK keeps the sizes (a ratio needs the same batch on both sides), with fewer repeats.
  # Its own time limit well inside ours: it then stops its child and writes what it measured.
  t=$(cap 240)
  section "$LOG" "$t" "$PY" "$HERE/torch_gpu_baseline.py" --only step --no-compile \
    --section-timeout "$(inner "$t")" ${QUICK:+--repeats 3 --warmup 1} --json "$OUT/torch_step.json" || status=1
fi

if [ -f "$OUT/step.json" ] && [ -f "$OUT/torch_step.json" ]; then
  header "training step: ours / PyTorch eager"
  "$PY" "$HERE/step_ratio.py" "$OUT/step.json" "$OUT/torch_step.json" 2>&1 | tee -a "$LOG"
fi

if want cli && [ -x "$HERE/bin/simclr" ]; then
  header "simclr train on the GPU: quick-start preset, bf16, GPU augmentation (CPU: 97.2% top-1)"
  RUN_DIR="$(mktemp -d)"
  section "$LOG" "$(cap 150)" "$HERE/bin/simclr" train --preset quickstart --set train.device=cuda \
    --set train.cuda_math=bf16 --set data.gpu_augment=true --set "output.dir=$RUN_DIR/quickstart" \
    || status=1
  [ -f "$RUN_DIR/quickstart/metrics.jsonl" ] && tail -3 "$RUN_DIR/quickstart/metrics.jsonl" | tee -a "$LOG"
fi

if want kernels; then
  header "kernel benchmarks"
  section "$LOG" "$(cap 180)" "$HERE/bin/bench-gpu_kernels" --json "$OUT/gpu_kernels.json" ${QUICK:+--quick} || status=1
fi

if want torch-kernels; then
  header "PyTorch kernels on the same GPU"
  section "$LOG" "$(cap 180)" "$PY" "$HERE/torch_gpu_compare.py" ${QUICK:+--quick} --json "$OUT/torch.json" --ours "$OUT/gpu_kernels.json" || status=1
fi

if want torch-compile && [ -f "$HERE/torch_gpu_baseline.py" ]; then
  header "PyTorch training step on the same GPU (eager and torch.compile)"
  t=$(cap 400)
  section "$LOG" "$t" "$PY" "$HERE/torch_gpu_baseline.py" --only step \
    --section-timeout "$(inner "$t")" ${QUICK:+--repeats 3 --warmup 1} --json "$OUT/torch_compile.json" \
    || echo "torch.compile: incomplete (it gets what is left of the budget)" | tee -a "$LOG"
fi

if [ -f "$OUT/step.json" ] && [ -f "$OUT/torch_compile.json" ]; then
  header "training step: ours / PyTorch, torch.compile included"
  theirs=()
  for f in "$OUT/torch_step.json" "$OUT/torch_compile.json"; do [ -f "$f" ] && theirs+=("$f"); done
  "$PY" "$HERE/step_ratio.py" "$OUT/step.json" "${theirs[@]}" 2>&1 | tee -a "$LOG"
fi

header "done in $(( $(date +%s) - START )) s, status $status"
exit $status
