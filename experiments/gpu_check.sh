#!/usr/bin/env bash
# The checks and measurements of the CUDA path, in one go, on one GPU: what to run after changing
# tapa_triton.py, or on a new kind of GPU. About 7 minutes on an H100 (with pytest-xdist) before the
# ablate step was added (not run yet; its limit is 4 minutes). In order of importance (with a BUDGET,
# the later steps are the ones left out):
#   tests_cuda tests/test_tapa_triton_cuda.py: the kernel against float64 on this GPU, and the model
#              with it (the other tests run on any CPU)
#   bench      bench.py: RoPE+SDPA, NoPE+SDPA, TAPA naive and TAPA triton, L = 512..16384, bfloat16
#   tiles_64   experiments/triton_tiles.py: the single-pass backward (deterministic=False) against the
#              default, then other tile sizes of each kernel (dK/dV first, the costliest), head dim 64
#   errors     the table of the kernel's errors next to PyTorch's own in the same dtype
#   ablate     experiments/triton_ablate.py: the kernels without the distance-weight table, without
#              the hardware cos/sin, without both (what each costs), head dim 64
#   train_*    a few steps of train.py with torch.compile (GPT-2 small on prepared PG-19 GPT-2 tokens;
#              skipped if data/pg19/gpt2 is not prepared), TAPA then RoPE: tokens/s of the whole model
#   bench_*    bench.py at head dim 128, and the chunked PyTorch path (the fallback without Triton)
#   tiles_128  the same sweep at head dim 128
#   tests      the whole test suite
#
#     bash experiments/gpu_check.sh                    # logs under runs/gpu_check/
#     LOG_DIR=/tmp/gc BUDGET=480 bash experiments/gpu_check.sh   # stop starting steps after 480 s
set -u
cd "$(dirname "$0")/.."
LOG_DIR=${LOG_DIR:-runs/gpu_check}
BUDGET=${BUDGET:-100000}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...: run it with a time limit, log to $LOG_DIR/NAME.log, show the end
    local name=$1 limit=$2
    shift 2
    local used=$(($(date +%s) - T0))
    if ((used + 30 > BUDGET)); then
        echo "== $name: skipped, ${used} s of the ${BUDGET} s budget used"
        return
    fi
    ((limit > BUDGET - used)) && limit=$((BUDGET - used))
    echo "== $name (limit ${limit} s, at ${used} s): $*"
    local t=$(date +%s)
    timeout "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $(($(date +%s) - t)) s"
    tail -n "${TAIL:-30}" "$LOG_DIR/$name.log" | cut -c1-220
}

train() {  # train PE: 40 compiled steps of configs/pg19_gpt2_PE.py, and the tokens/s they logged
    [ -f data/pg19/gpt2/train.bin ] || return 0
    rm -rf "/tmp/gpu_check_$1"  # a fresh run each time, not a resume
    step "train_$1" 180 python3 train.py "configs/pg19_gpt2_$1.py" --compile=True --max_iters=40 \
        --gradient_accumulation_steps=1 --batch_size=8 --warmup_iters=10 --lr_decay_iters=40 \
        --eval_interval=1000 --eval_iters=2 --log_interval=10 --out_dir="/tmp/gpu_check_$1"
    cp "/tmp/gpu_check_$1/log.jsonl" "$LOG_DIR/train_$1.jsonl" 2>/dev/null &&
        grep '"train"' "$LOG_DIR/train_$1.jsonl" | tail -n 3
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
step tests_cuda 180 python3 -m pytest -q $XDIST tests/test_tapa_triton_cuda.py
step bench 240 python3 bench.py --impls rope_sdpa,nope_sdpa,tapa_naive,tapa_triton --repeats 10 \
    --out "$LOG_DIR/bench.json"
step tiles_64 200 python3 experiments/triton_tiles.py --head_dim 64 --n_head 16 --kernels single,dkdv,fwd,dq
step errors 150 python3 tests/test_tapa_triton_cuda.py
step ablate 240 python3 experiments/triton_ablate.py --head_dim 64 --n_head 16
train tapa
step bench_128 120 python3 bench.py --impls rope_sdpa,tapa_triton --head_dim 128 --n_head 8 --lengths 2048,8192,16384 \
    --repeats 10 --out "$LOG_DIR/bench_128.json"
train rope
step bench_chunked 120 python3 bench.py --impls rope_sdpa,tapa_chunked --lengths 1024,4096 --repeats 5 \
    --out "$LOG_DIR/bench_chunked.json"
step tiles_128 150 python3 experiments/triton_tiles.py --head_dim 128 --n_head 8 --kernels single,dkdv,fwd,dq
step tests 300 python3 -m pytest -q $XDIST tests
echo "== done in $(($(date +%s) - T0)) s; logs in $LOG_DIR"
