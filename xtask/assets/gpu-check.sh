#!/usr/bin/env bash
# Runs on a GPU machine that has no Rust and no network: the GPU tests, the kernel and
# training-step benchmarks, an end-to-end `simclr train` and the PyTorch comparison on the same
# GPU. Made by `cargo xtask gpu-check`; run as
#   bash gpu-check/run.sh            (results under $OUT, or gpu-check/out)
# Everything goes to at most 7 files under $OUT (log.txt, tests.txt and five JSON results), and
# every section is cut short at its share of BUDGET rather than lose the rest, so that a run
# under a wall-clock limit still reports each section it reached.
#
# SECTIONS picks what runs, always in this order, cheap and most telling first (default: all;
# torch-compile, last, gets what is left of BUDGET):
#   kernel-tests kernels nn-tests step torch-step cli torch-kernels torch-compile
# ("tests" means kernel-tests and nn-tests.)
#   kernel-tests  every CUDA kernel against its CPU twin (simclr-kernels' gpu tests)
#   kernels       the kernel benchmarks (gpu_kernels.json)
#   nn-tests      the CUDA backend, NCCL's failures, the PyTorch parity fixtures on the GPU
#   step          the training-step benchmark (step.json)
#   torch-step    PyTorch's eager training step on the same GPU (torch_step.json)
#   cli           `simclr train` end to end: quick-start preset, bf16, GPU augmentation
#   torch-kernels PyTorch's kernels on the same GPU (torch.json)
#   torch-compile PyTorch's step with torch.compile (torch_compile.json)
# e.g. SECTIONS="step torch-compile" for a second run that sets our step beside PyTorch's
# torch.compile step. QUICK=1 shrinks the benchmarks; BUDGET=... (seconds, default 500) is the
# time the sections share.
set -u -o pipefail
START=$(date +%s)
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$HERE/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
LOG="$OUT/log.txt"
TESTS="$OUT/tests.txt"
BUDGET="${BUDGET:-500}"
status=0

SECTIONS="${SECTIONS:-kernel-tests kernels nn-tests step torch-step cli torch-kernels torch-compile}"
want() {
  case " $SECTIONS " in
    *" $1 "*) return 0 ;;
    *" tests "*) [ "$1" = kernel-tests ] || [ "$1" = nn-tests ] ;;
    *) return 1 ;;
  esac
}
say() { echo "$*" | tee -a "$LOG"; }
header() { say "== $1  (t=$(( $(date +%s) - START )) s)"; }

# A private folder for the names the programs look for that the machine lacks (see below).
LIBDIR="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-lib.XXXXXX")"
trap 'rm -rf "$LIBDIR"' EXIT

# A copy may have lost its execute bits; where they cannot be set again, run copies.
BIN="$HERE/bin"
chmod +x "$BIN"/* 2>/dev/null
for f in "$BIN"/*; do
  if [ ! -x "$f" ]; then
    mkdir -p "$LIBDIR/bin" && cp "$BIN"/* "$LIBDIR/bin/" && chmod +x "$LIBDIR/bin"/* && BIN="$LIBDIR/bin"
    break
  fi
done

# CUDA's libraries come as Python packages there: put every site-packages/nvidia/*/lib on the
# path (nvidia/cu13/lib holds NVRTC and cuBLAS, nvidia/cudnn/lib and nvidia/nccl/lib the rest).
WHEEL_LIBS=""
while IFS= read -r sp; do
  for lib in "$sp"/nvidia/*/lib; do
    [ -d "$lib" ] && WHEEL_LIBS="$WHEEL_LIBS:$lib"
  done
done < <(timeout -k 5 30 "$PY" -c 'import site, sys
print("\n".join(dict.fromkeys(site.getsitepackages() + [site.getusersitepackages()] + sys.path[1:])))' 2>/dev/null)
# (No empty entry: that would put the current folder on the search path.)
LD_LIBRARY_PATH="$LIBDIR$WHEEL_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH

# Every test and benchmark fails where it would print that it skipped for want of a GPU.
export SIMCLR_REQUIRE_GPU=1
export RUST_BACKTRACE=1
# One machine, no network: NCCL on the loopback interface with its own socket transport, no
# InfiniBand (P2P and shared memory stay on); its warnings go to the log.
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}"
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-1}"
export NCCL_NET="${NCCL_NET:-Socket}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# NCCL connects every algorithm at init (under our timeout), not lazily inside a collective.
export NCCL_RUNTIME_CONNECT="${NCCL_RUNTIME_CONNECT:-0}"
# The parity test reads the PyTorch fixtures from the repository this folder sits in.
SIMCLR_REPO_ROOT="$(cd "$HERE/.." && pwd)"
export SIMCLR_REPO_ROOT

# ---------------------------------------------------------------------------------------------
# Preflight: which file each library the programs load would come from, and its version.
# The programs (cudarc 0.19, built for CUDA 13.0) dlopen the first of these names that loads.
LIBS="cuda nvrtc cublas cublasLt cudnn nccl"
candidates() {
  local n=$1
  echo "lib$n.so lib${n}64.so lib${n}64_13.so lib${n}64_130.so lib${n}64_130_0.so" \
    "lib${n}64_10.so lib${n}64_11.so lib${n}64_12.so lib${n}64_9.so" \
    "lib$n.so.13 lib$n.so.12 lib$n.so.11 lib$n.so.10 lib$n.so.9 lib$n.so.1"
}
LDCONFIG="$(command -v ldconfig || echo /sbin/ldconfig)"
LDCACHE="$("$LDCONFIG" -p 2>/dev/null | grep -F "$([ "$(uname -m)" = x86_64 ] && echo x86-64 || echo "(")")"
find_lib() {  # find_lib FILE: the path a dlopen of FILE would take (search path, cache, defaults)
  local d p dirs
  IFS=: read -r -a dirs <<< "$LD_LIBRARY_PATH"
  for d in "${dirs[@]}"; do
    [ -n "$d" ] && [ -e "$d/$1" ] && { echo "$d/$1"; return 0; }
  done
  p="$(awk -v n="$1" '$1 == n { print $NF; exit }' <<< "$LDCACHE")"
  [ -n "$p" ] && { echo "$p"; return 0; }
  for d in /lib64 /usr/lib64 /lib /usr/lib; do
    [ -e "$d/$1" ] && { echo "$d/$1"; return 0; }
  done
  return 1
}
# Where no name the programs try exists but a versioned file does (NCCL's wheel ships
# libnccl.so.2), link the plain name to it in the private folder.
for n in $LIBS; do
  found=""
  for c in $(candidates "$n"); do
    found="$(find_lib "$c")" && break
  done
  [ -n "$found" ] && continue
  best=""
  IFS=: read -r -a dirs <<< "$LD_LIBRARY_PATH"
  for d in "${dirs[@]}"; do
    for f in "$d/lib$n.so".*; do
      [ -e "$f" ] && best="$(printf '%s\n%s\n' "$best" "$f" | sed '/^$/d' | sort -V | tail -1)"
    done
  done
  [ -z "$best" ] && best="$(awk -v n="lib$n.so." 'index($1, n) == 1 { print $NF; exit }' <<< "$LDCACHE")"
  if [ -n "$best" ]; then
    ln -sf "$best" "$LIBDIR/lib$n.so"
    say "linked lib$n.so -> $best (no name cudarc tries was on the path)"
  fi
done

header "machine"
{
  echo "host $(uname -n), kernel $(uname -r), $(nproc) CPUs, SECTIONS=$SECTIONS, BUDGET=$BUDGET s"
  if command -v nvidia-smi > /dev/null; then
    timeout -k 5 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,compute_cap,mig.mode.current \
      --format=csv 2>&1 | head -5
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      echo "PREFLIGHT: nvidia-smi did not answer within 20 s"
    else
      timeout -k 5 20 nvidia-smi 2>&1 | grep -m1 "CUDA Version" | tr -s ' '
    fi
  else
    echo "PREFLIGHT: no nvidia-smi on PATH"
  fi
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
} 2>&1 | tee -a "$LOG"

header "libraries (the file each name cudarc tries resolves to, and its version)"
# dlopen in Python reports exactly what the loader picks and asks each library its version;
# without Python, the same search by hand (no versions).
cat > "$LIBDIR/preflight.py" <<'EOF'
import ctypes, os, sys
libs = sys.argv[1].split()
def candidates(n):
    v = [f"lib{n}.so", f"lib{n}64.so", f"lib{n}64_13.so", f"lib{n}64_130.so", f"lib{n}64_130_0.so",
         f"lib{n}64_10.so", f"lib{n}64_11.so", f"lib{n}64_12.so", f"lib{n}64_9.so"]
    return v + [f"lib{n}.so.{s}" for s in (13, 12, 11, 10, 9, 1)]
class LinkMap(ctypes.Structure):
    _fields_ = [("l_addr", ctypes.c_void_p), ("l_name", ctypes.c_char_p)]
dl = ctypes.CDLL(None)
if not hasattr(dl, "dlinfo"):
    dl = ctypes.CDLL("libdl.so.2")
dl.dlinfo.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
def path_of(h):
    lm = ctypes.POINTER(LinkMap)()
    if dl.dlinfo(h._handle, 2, ctypes.byref(lm)) == 0 and lm and lm.contents.l_name:
        p = lm.contents.l_name.decode()
        r = os.path.realpath(p)
        return p if r == p else f"{p} -> {r}"
    return "?"
I = ctypes.c_int
def ver(n, h):
    if n == "cuda":
        x = I(); r = h.cuDriverGetVersion(ctypes.byref(x))
        return f"CUDA driver API {x.value // 1000}.{x.value % 1000 // 10}" if r == 0 else f"cuDriverGetVersion: error {r}"
    if n == "nvrtc":
        a, b = I(), I(); h.nvrtcVersion(ctypes.byref(a), ctypes.byref(b)); return f"NVRTC {a.value}.{b.value}"
    if n == "cublas":
        p = []
        for t in (0, 1, 2):
            x = I(); h.cublasGetProperty(t, ctypes.byref(x)); p.append(str(x.value))
        return "cuBLAS " + ".".join(p)
    if n == "cublasLt":
        h.cublasLtGetVersion.restype = ctypes.c_size_t; v = h.cublasLtGetVersion()
        return f"cuBLASLt {v // 10000}.{v % 10000 // 100}.{v % 100}"
    if n == "cudnn":
        h.cudnnGetVersion.restype = ctypes.c_size_t; v = h.cudnnGetVersion()
        return f"cuDNN {v // 10000}.{v % 10000 // 100}.{v % 100}"
    if n == "nccl":
        x = I(); h.ncclGetVersion(ctypes.byref(x)); v = x.value
        return f"NCCL {v // 10000}.{v % 10000 // 100}.{v % 100}"
missing = []
handles = {}
for n in libs:
    for c in candidates(n):
        try:
            h = ctypes.CDLL(c)
        except OSError:
            continue
        handles[n] = h
        try:
            v = ver(n, h)
        except Exception as e:
            v = f"version unknown ({e})"
        print(f"{n:9} {c:18} {path_of(h)}  [{v}]")
        break
    else:
        missing.append(n)
        c = candidates(n)
        print(f"{n:9} MISSING: none of the {len(c)} names loads ({c[0]} ... {c[-1]})")
if "nvrtc" in handles:
    # NVRTC loads libnvrtc-builtins when it compiles: compile one kernel to see that it can.
    h = handles["nvrtc"]
    prog = ctypes.c_void_p()
    src = b"extern \"C\" __global__ void k(float *x) { x[threadIdx.x] = 1.0f; }"
    r = h.nvrtcCreateProgram(ctypes.byref(prog), src, b"k.cu", 0, None, None)
    if r == 0:
        r = h.nvrtcCompileProgram(prog, 0, None)
    b = sorted({l.split()[-1] for l in open("/proc/self/maps") if "nvrtc-builtins" in l})
    how = "ok" if r == 0 else f"error {r}"
    print(f"nvrtc     compiling a kernel: {how}" + (f", builtins {b[0]}" if b else ""))
    if r != 0:
        missing.append("nvrtc (compile)")
try:
    import importlib.metadata as md
    print("python", sys.version.split()[0] + ", torch", md.version("torch"))
except Exception as e:
    print("python", sys.version.split()[0] + ", torch not found:", e)
sys.exit(2 if missing else 0)
EOF
timeout -k 5 60 "$PY" "$LIBDIR/preflight.py" "$LIBS" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ]; then
  say "(the Python probe failed with status $rc; the same search by hand, without versions)"
  rc=0
  for n in $LIBS; do
    line="MISSING"
    for c in $(candidates "$n"); do
      p="$(find_lib "$c")" && { line="$c $p -> $(readlink -f "$p")"; break; }
    done
    [ "$line" = MISSING ] && rc=2
    say "$(printf '%-9s %s' "$n" "$line")"
  done
fi
if [ "$rc" -ne 0 ]; then
  say "PREFLIGHT: a library is missing or broken; the GPU sections below will fail"
  status=1
fi

# ---------------------------------------------------------------------------------------------
cap() {  # cap WANT: seconds for the next step, 0 when BUDGET is spent
  local left=$(( START + BUDGET - $(date +%s) ))
  if [ "$left" -lt 15 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
section() {  # section LOG SECONDS CMD...: runs CMD under that limit, appending to LOG
  local log=$1 t=$2 rc; shift 2
  if [ "$t" -eq 0 ]; then
    echo "skipped: the time budget of $BUDGET s is spent" | tee -a "$log"
    return 1
  fi
  # Straight into the file, not a pipe: a process the command left behind (the PyTorch
  # scripts run their work in a child with a process group of its own, which timeout misses)
  # would hold a pipe open and stall the script; -k kills what ignores the first signal.
  timeout -k 5 "$t" "$@" >> "$log" 2>&1
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "TIMED OUT after $t s: $(basename "$1")" | tee -a "$log"
  fi
  return "$rc"
}
# A GPU program that says it skipped for want of a GPU has not tested anything.
said_skipped() { tail -n +"$2" "$1" | grep -q "skipped (no CUDA driver\|skipped (no GPU"; }
inner() {  # inner T: a script's own limit inside our T (it starts its clock after importing torch)
  if [ "$1" -gt 60 ]; then echo $(( $1 - 40 )); else echo $(( $1 * 2 / 3 )); fi
}

run_tests() {  # run_tests NAME SECONDS: one test binary; after a hang, once more without it
  local name=$1 limit=$2 exe="$BIN/$1" from rc t0 started hung skips=() pass
  echo "== $name" >> "$TESTS"
  if [ ! -x "$exe" ]; then
    say "FAILED: $name (not in gpu-check/bin)"; status=1; return
  fi
  for pass in 1 2; do
    from=$(( $(wc -l < "$TESTS") + 1 ))
    t0=$(date +%s)
    section "$TESTS" "$(cap "$limit")" "$exe" --test-threads 1 --nocapture \
      ${skips[@]+"${skips[@]}"} > /dev/null
    rc=$?
    grep -E "^test result:|\.\.\. FAILED|panicked|^TIMED OUT|^skipped: the time|skipped \(no " \
      <(tail -n +"$from" "$TESTS") \
      | sed "s/^/  /" >> "$LOG"
    if [ "$rc" -eq 0 ] && said_skipped "$TESTS" "$from"; then
      rc=3
      echo "a test said it skipped for want of a GPU" >> "$TESTS"
    fi
    say "$name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (status $rc)") in $(( $(date +%s) - t0 )) s"
    [ "$rc" -eq 0 ] || status=1
    # After a hang: the tests that started (libtest prints `test NAME ... ` first) and the one
    # that hung are skipped in a second run of the rest.
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] || return
    [ "$pass" -eq 1 ] || return
    started="$(tail -n +"$from" "$TESTS" | sed -n 's/^test \([^ ]*\) \.\.\. .*$/\1/p')"
    [ -n "$started" ] || return
    hung="$(tail -1 <<< "$started")"
    say "$name: $hung hung; the tests not yet run, once more without it"
    echo "HUNG: $hung" >> "$TESTS"
    skips=(--exact)
    while read -r s; do skips+=(--skip "$s"); done <<< "$started"
  done
}

bench() {  # bench NAME SECONDS ARGS...: a benchmark binary, output in the log
  local name=$1 limit=$2 from t0 rc; shift 2
  if [ ! -x "$BIN/$name" ]; then
    say "FAILED: $name (not in gpu-check/bin)"; status=1; return
  fi
  from=$(( $(wc -l < "$LOG") + 1 ))
  t0=$(date +%s)
  section "$LOG" "$(cap "$limit")" "$BIN/$name" "$@"
  rc=$?
  if [ "$rc" -eq 0 ] && said_skipped "$LOG" "$from"; then
    rc=3
    say "$name said it skipped for want of a GPU"
  fi
  say "$name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (status $rc)") in $(( $(date +%s) - t0 )) s"
  [ "$rc" -eq 0 ] || status=1
}

# Every buffer an operation takes starts as NaN (host and device) in the tests, so an output
# value a kernel leaves unwritten shows rather than passing on stale, plausible values. Not for
# the benchmarks.
if want kernel-tests; then
  header "kernel tests (every CUDA kernel against its CPU twin)"
  SIMCLR_POISON_BUFFERS=1 run_tests test-kernels-gpu 120
fi

if want kernels; then
  header "kernel benchmarks"
  bench bench-gpu_kernels 120 --json "$OUT/gpu_kernels.json" ${QUICK:+--quick}
fi

if want nn-tests; then
  header "CUDA backend tests, NCCL failures, PyTorch parity on the GPU"
  SIMCLR_POISON_BUFFERS=1 run_tests test-nn-cuda 180
  SIMCLR_POISON_BUFFERS=1 run_tests test-nn-nccl_faults 60
  SIMCLR_POISON_BUFFERS=1 run_tests test-parity 120
fi

if want step; then
  header "training step on the CUDA backend"
  bench bench-gpu_train_step 180 --json "$OUT/step.json" ${QUICK:+--quick}
fi

if want torch-step; then
  if [ -f "$HERE/torch_gpu_baseline.py" ]; then
    header "PyTorch training step on the same GPU (eager)"
    # QUICK keeps the sizes (a ratio needs the same batch on both sides), with fewer repeats.
    # Its own time limit well inside ours: it then stops its child and writes what it measured.
    t=$(cap 150)
    section "$LOG" "$t" "$PY" "$HERE/torch_gpu_baseline.py" --only step --no-compile \
      --section-timeout "$(inner "$t")" ${QUICK:+--repeats 3 --warmup 1} \
      --json "$OUT/torch_step.json" || status=1
  else
    say "torch-step: no torch_gpu_baseline.py in this folder"
  fi
fi

if [ -f "$OUT/step.json" ] && [ -f "$OUT/torch_step.json" ]; then
  header "training step: ours / PyTorch eager"
  timeout -k 5 15 "$PY" "$HERE/step_ratio.py" "$OUT/step.json" "$OUT/torch_step.json" 2>&1 | tee -a "$LOG"
fi

if want cli; then
  header "simclr train on the GPU: quick-start preset, bf16, GPU augmentation (CPU: 97.2% top-1)"
  RUN_DIR="$(mktemp -d)"
  t0=$(date +%s)
  if section "$LOG" "$(cap 150)" "$BIN/simclr" train --preset quickstart \
    --set train.device=cuda --set train.cuda_math=bf16 --set data.gpu_augment=true \
    --set "output.dir=$RUN_DIR/quickstart"; then
    say "simclr train: ok in $(( $(date +%s) - t0 )) s"
  else
    say "simclr train: FAILED in $(( $(date +%s) - t0 )) s"
    status=1
  fi
  [ -f "$RUN_DIR/quickstart/metrics.jsonl" ] && tail -3 "$RUN_DIR/quickstart/metrics.jsonl" | tee -a "$LOG"
  rm -rf "$RUN_DIR"
fi

if want torch-kernels; then
  header "PyTorch kernels on the same GPU"
  section "$LOG" "$(cap 120)" "$PY" "$HERE/torch_gpu_compare.py" ${QUICK:+--quick} \
    --json "$OUT/torch.json" --ours "$OUT/gpu_kernels.json" || status=1
fi

if want torch-compile && [ -f "$HERE/torch_gpu_baseline.py" ]; then
  header "PyTorch training step on the same GPU (eager and torch.compile)"
  t=$(cap 400)
  section "$LOG" "$t" "$PY" "$HERE/torch_gpu_baseline.py" --only step \
    --section-timeout "$(inner "$t")" ${QUICK:+--repeats 3 --warmup 1} \
    --json "$OUT/torch_compile.json" \
    || say "torch.compile: incomplete (it gets what is left of the budget)"
fi

if [ -f "$OUT/step.json" ] && [ -f "$OUT/torch_compile.json" ]; then
  header "training step: ours / PyTorch, torch.compile included"
  theirs=()
  for f in "$OUT/torch_step.json" "$OUT/torch_compile.json"; do [ -f "$f" ] && theirs+=("$f"); done
  timeout -k 5 15 "$PY" "$HERE/step_ratio.py" "$OUT/step.json" "${theirs[@]}" 2>&1 | tee -a "$LOG"
fi

# Half-written files of a run that was cut short: not results, and the count of files is limited.
rm -f "$OUT"/*.tmp
header "done in $(( $(date +%s) - START )) s, status $status"
exit $status
