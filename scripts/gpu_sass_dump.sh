#!/usr/bin/env bash
# The SASS of one cuda_int4 kernel, for the tree as it is and with each given patch applied, in one device call.
# cuobjdump ships with the GPU image's CUDA toolkit, not on the CPU machine; ptxas -v on the CPU gives register
# counts but no instructions. Session 8 found v2's per-chunk integer division this way (results/h100/LOG.md).
#
#   OUT=out PATTERN=gemm1_swiglu_v2ILi16ELb1ELb0ELi1E bash scripts/gpu_sass_dump.sh [PATCH ...]
#
# PATTERN: a piece of the kernel's mangled name (the default: v2's GEMM1, symmetric, one row per pass, the T = 1
# kernel). Builds for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0); each patched tree is its own extension build
# (~40 s each, the name carries a hash of csrc/). Writes $OUT/sass_<label>.txt (label: baseline or the patch's
# file name). Patches apply to the committed csrc/, so with patches given csrc/ must have no uncommitted edits
# (the baseline is the tree as it is either way); csrc/ is left as it was found.
set -u
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONPATH=$PWD
OUT=${OUT:-out}
PATTERN=${PATTERN:-gemm1_swiglu_v2ILi16ELb1ELb0ELi1E}
mkdir -p "$OUT"
CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -1)
if [ -z "$CUOBJ" ]; then
  echo "no cuobjdump on this machine" >&2
  exit 1
fi
dump() {  # $1 label
  local so
  so=$(python3 -c "from moe_tut.backends import cuda_int4 as c; print(c.load_extension().__file__)" 2>/dev/null | tail -1)
  "$CUOBJ" -sass "$so" | awk -v pat="$PATTERN" '/Function : /{p = index($0, pat) > 0} p' > "$OUT/sass_$1.txt"
  echo "$1: $(grep -c 'Function : ' "$OUT/sass_$1.txt") function(s), $(wc -l < "$OUT/sass_$1.txt") lines"
}
if [ $# -gt 0 ] && ! git diff --quiet -- csrc; then
  echo "csrc/ has uncommitted edits: commit or stash them before dumping patched builds" >&2
  exit 1
fi
dump baseline
for p in "$@"; do
  git checkout -q csrc && git apply "$p" && dump "$(basename "$p" .patch)"
done
[ $# -gt 0 ] && git checkout -q csrc
true
