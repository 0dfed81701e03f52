#!/usr/bin/env bash
# One command that proves the GPU path on a CUDA machine (make gpu-check), without network access:
#   1. build the op library in place against the installed torch (setup.py build_ext --inplace:
#      nothing is installed, torch is not touched);
#   2. the GPU-marked tests and the Triton sep_conv tests, run on the GPU;
#   3. the all-configs Triton compile check for this GPU's architecture;
#   4. lowrank bench --device cuda --quick (sep_conv against dense cuDNN and the unfused cuDNN pair)
#      for each of float16, bfloat16, float32 that the benchmark offers, then the svd and
#      householder suites.
# Everything goes to one folder (default gpu-check-out/): a log per step, the benchmark JSON/PNG
# files, and summary.md (each step's status and time, then the benchmark tables). Each step runs
# even if an earlier one failed; the exit status is 0 only if all passed. Without a CUDA device it
# stops at once with exit status 2.
#
# Usage: tools/gpu_check.sh [OUT_DIR]     (PYTHON=/path/to/python to pick the interpreter)
set -u

PY="${PYTHON:-python3}"
OUT="${1:-gpu-check-out}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

# Preflight: a CUDA device and the modules the steps import, before anything is built.
if ! "$PY" - <<'EOF'
import importlib.util, sys
try:
    import torch
except ImportError:
    sys.exit("gpu-check: torch is not installed for this Python (set PYTHON=/path/to/python)")
if not torch.cuda.is_available():
    sys.exit(
        f"gpu-check: no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}) "
        "sees no GPU. Run it on a machine with an NVIDIA GPU and a CUDA build of torch."
    )
missing = [m for m in ("triton", "pytest", "hypothesis", "numpy", "matplotlib", "tqdm", "setuptools")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu-check: missing Python packages: {' '.join(missing)} (pip install them first)")
print(f"gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
then
  exit 2
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.md"
FAILED=0
{
  echo "# gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, sm_{p.major}{p.minor}, torch {torch.__version__}, CUDA {torch.version.cuda}')"
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

# step NAME TIMEOUT_SECONDS COMMAND...: run it with its output in OUT/NAME.log, add a summary row.
step() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  echo "gpu-check: $name ..."
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status="pass"
  if [ $rc -eq 124 ]; then
    status="FAIL (timed out after ${limit} s)"
  elif [ $rc -ne 0 ]; then
    status="FAIL (exit $rc)"
  fi
  [ "$status" = "pass" ] || FAILED=1
  echo "| $name | $status | $((SECONDS - start)) | $name.log |" >> "$SUMMARY"
  echo "gpu-check: $name: $status"
}

# The tests and benchmarks import lowrank_kernels from this tree (pytest's pythonpath=["."]).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

step build 300 "$PY" setup.py build_ext --inplace
# -o addopts=-ra: the project's addopts name a pytest-benchmark option, not needed for tests/.
step tests-gpu 240 "$PY" -m pytest -o addopts=-ra -q -m gpu tests
step tests-triton 240 "$PY" -m pytest -o addopts=-ra -q tests/test_triton_sep_conv.py
ARCH="$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}{p.minor}')")"
step triton-compile-all-configs 300 "$PY" tests/triton_compile_check.py --all-configs --arch "$ARCH" --dtype fp16 bf16 fp32

# sep_conv for each floating dtype the benchmark offers, then the other suites (on the GPU where
# they take --device).
SEP_HELP="$("$PY" -m lowrank_kernels bench sep_conv --help 2>/dev/null)"
for dtype in float16 bfloat16 float32; do
  if grep -qw -- "$dtype" <<< "$SEP_HELP"; then
    step "bench-sep_conv-$dtype" 240 "$PY" -m lowrank_kernels bench sep_conv --device cuda --quick \
      --dtype "$dtype" --out-dir "$OUT" --json "$OUT/sep_conv-$dtype.json" --plot "$OUT/sep_conv-$dtype.png"
  else
    echo "| bench-sep_conv-$dtype | skipped (not offered by lowrank bench) | 0 | |" >> "$SUMMARY"
  fi
done
for suite in svd householder; do
  device=()
  if "$PY" -m lowrank_kernels bench "$suite" --help 2>/dev/null | grep -q -- "--device"; then
    device=(--device cuda)
  fi
  quick=()
  if "$PY" -m lowrank_kernels bench "$suite" --help 2>/dev/null | grep -q -- "--quick"; then
    quick=(--quick)
  elif [ "$suite" = householder ]; then
    quick=(--rounds 3 --slow-rounds 1)  # its few rounds, as --quick does elsewhere
  fi
  step "bench-$suite" 180 "$PY" -m lowrank_kernels bench "$suite" "${device[@]}" "${quick[@]}" \
    --out-dir "$OUT" --json "$OUT/$suite.json" --plot "$OUT/$suite.png"
done

{
  echo
  echo "Overall: $([ $FAILED -eq 0 ] && echo PASS || echo FAIL)"
  for log in "$OUT"/bench-*.log; do
    [ -f "$log" ] || continue
    echo
    echo "## $(basename "$log" .log)"
    echo
    echo '```'
    cat "$log"
    echo '```'
  done
} >> "$SUMMARY"
echo "gpu-check: $([ $FAILED -eq 0 ] && echo PASS || echo FAIL); summary in $SUMMARY"
exit $FAILED
