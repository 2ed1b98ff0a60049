#!/usr/bin/env bash
# Issue 6's GPU figures, prepared for a lent GPU machine (see docs/benchmarks.md, "Speed at
# scale"). Each part fits in one 10-minute command; results and logs go to $OUT.
#
#   OUT=results bash benchmarks/gpu_check.sh scale   # SD 1.5 eager + compiled, every method
#   OUT=results bash benchmarks/gpu_check.sh more    # SD 2.1 eager, batched throughput
#   OUT=results bash benchmarks/gpu_check.sh sdxl    # SDXL at 1024 px (issue 12's targets)
#
# The machine has torch with CUDA but may lack diffusers and has no network: wheels in .whl/
# (pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#  --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 importlib_metadata) are
# installed from disk when needed. The package itself is not built: its three folders are
# copied into the layout pyproject.toml installs (plugins/ and inversion/ as subpackages).
set -u
part=${1:-scale}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
site=$(mktemp -d)
if ! python3 -c "import diffusers" 2>/dev/null; then
    pip install -q --no-deps --target "$site" .whl/*.whl || exit 1
fi
cp -r p2p_framework "$site"/
cp -r plugins "$site"/p2p_framework/plugins
cp -r inversion "$site"/p2p_framework/inversion
export PYTHONPATH="$site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-$part.txt"

step() {  # step SECONDS NAME ARGS...: run a benchmark with a time limit, keep its output
    local limit=$1 name=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" python3 "$@" >"$OUT/$name.txt" 2>"$OUT/$name.err"
    echo "   exit $? after $SECONDS s in all"
    tail -30 "$OUT/$name.txt"
    # Rows are logged to stderr as they finish, so a timeout still leaves them here.
    grep -v Warning "$OUT/$name.err" | tail -15
}

case $part in
scale)
    # No warm-up runs (the first of the 3 generation repeats is one; compiled rows keep
    # theirs): the float32 null-text row alone takes about a minute.
    step 540 scale-sd15 benchmarks/scale.py --device cuda --arch sd15 --compile --no-warmup \
        --repeats 3 --inversion-repeats 1 --json "$OUT/scale-sd15.json"
    ;;
more)
    step 240 scale-sd21 benchmarks/scale.py --device cuda --arch sd21 --no-warmup --repeats 3 \
        --rows plain edit edit-exact edit-all null-text null-text-both --json "$OUT/scale-sd21.json"
    step 300 batching-sd15 benchmarks/batching.py --device cuda --preset sd15 --steps 50 \
        --jobs 8 --repeats 2 --batch-rows 16
    ;;
sdxl)
    # Issue 12's targets: the edit at most 1.10x plain generation; null-text at 1024 px with
    # the half-precision UNet path within 24 GiB (the null-text row's peak memory).
    step 540 scale-sdxl benchmarks/scale.py --device cuda --arch sdxl --no-warmup --repeats 3 \
        --rows plain edit edit-exact edit-all null-text null-text-both --json "$OUT/scale-sdxl.json"
    ;;
*)
    echo "usage: OUT=DIR bash benchmarks/gpu_check.sh scale|more|sdxl" >&2
    exit 2
    ;;
esac
