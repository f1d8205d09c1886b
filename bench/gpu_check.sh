#!/usr/bin/env bash
# The GPU measurements issue 18 asks for, as one command for a session whose task is lent a
# device (about 8 minutes on an H200; every step has its own time limit and its output lands in
# $OUT whatever happens to the others).
#
# Here, once (the device has torch, lightning, transformers and peft, but not these):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl dp-accounting==0.6.0 dm-tree==0.1.10 opacus==1.6.0
# There:   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
# Rehearse on the CPU first:   DEVICE=cpu QUICK=1 bash bench/gpu_check.sh
set -uo pipefail
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
site=$(mktemp -d)
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
fi
# the project itself, as it installs (passes/ becomes lightning_dp.passes), with nothing fetched
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . || exit 1
export PYTHONPATH="$site"
cd bench || exit 1

if [ -n "${QUICK:-}" ]; then  # rehearsal: the same commands, a fraction of the work
    rounds=3 preset=() models=(gpt) seqs=(64) head=(--p 512)
else
    rounds=100 preset=(--preset gpu-h200) models=(gpt vit) seqs=(256 1024) head=(--p 50257 --d 768)
fi

step() {  # name, seconds, command...: run it, keep its output in $OUT/name.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

python3 -c "import torch, lightning_dp; print('torch', torch.__version__, 'device', '$DEVICE',
  torch.cuda.get_device_name() if '$DEVICE' == 'cuda' else '')" 2>&1 | tee "$OUT/environment.txt"
# Host time per private module (a LoRA model has hundreds of them) and the ops it dispatches.
step fixed_cost 90 python3 fixed_cost.py --device "$DEVICE" --rounds "$rounds"
# Ghost norm against instantiation per layer shape: checks the accelerator constant of the
# cost model (GHOST_WORK_PER_ELEMENT_ACCELERATOR, estimated from an H100's ratios so far).
step norm_methods 120 python3 norm_methods.py --device "$DEVICE"
# One private layer in a step, cold, as a GPT-2 LM head.
step linear_in_engine 90 python3 linear_in_engine.py --device "$DEVICE" "${head[@]}"
# The acceptance table on the reference shapes: time (3 steps), tensor memory and the largest
# batch in the budget, for every case.
step suite 200 python3 suite.py compare --device "$DEVICE" "${preset[@]}" --models "${models[@]}" \
    --seqs "${seqs[@]}" --cases non-private ldp-layer ldp-flat opacus-ghost \
    --search-cases non-private ldp-layer --rounds 1 --warmup 1 --steps 3 --out "$OUT"
