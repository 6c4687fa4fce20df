#!/usr/bin/env bash
# Every GPU row of benchmarks/RESULTS.md in one command, with nanoGPT's rows from the same call:
# training throughput for small/32, medium/32, medium/64 and large/32 (tokens/s, ms/step, peak memory, MFU against
# the card's own peak, nanoGPT's tokens/s on the same shape and the speed-up), KV-cached generation speed, and the
# time from launch to validation loss 1.47 on tinyshakespeare (ours with benchmarks/recipes/shakespeare-gpu.yaml,
# nanoGPT with its own shakespeare_char recipe, stopped once it gets there).
#
#   benchmarks/gpu.sh [--peer DIR] [--corpus FILE] [-o DIR] [--cpu-smoke]
#
#   --peer DIR     a nanoGPT checkout (default: $FUNDAMENTALLM_PEER). It is copied into a temporary directory and
#                  the corpus is prepared there; nothing is downloaded. Without one, only our rows run.
#   --corpus FILE  the corpus (default: $FUNDAMENTALLM_CORPUS), e.g. tinyshakespeare.txt.
#   -o DIR         where bench.json (the numbers) and gpu.log go (default: bench-gpu).
#   --cpu-smoke    the same commands end to end on the CPU with tiny shapes and a few steps, on any small corpus:
#                  the test suite runs this, so that a run on a GPU cannot fail on a typo.
#
# This checkout's code runs (src/ goes first on PYTHONPATH), with $PYTHON (default python3).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
peer="${FUNDAMENTALLM_PEER:-}"
corpus="${FUNDAMENTALLM_CORPUS:-}"
out="bench-gpu"
smoke=0
while [ $# -gt 0 ]; do
    case "$1" in
        --peer) peer="${2:?--peer needs a directory}"; shift 2 ;;
        --corpus) corpus="${2:?--corpus needs a file}"; shift 2 ;;
        -o|--output) out="${2:?-o needs a directory}"; shift 2 ;;
        --cpu-smoke) smoke=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$peer" ]; then
    echo "gpu.sh: no nanoGPT given: measuring our rows only (give --peer DIR)" >&2
elif [ ! -d "$peer" ]; then
    echo "gpu.sh: --peer $peer is not a directory" >&2; exit 2
fi
[ -n "$corpus" ] && [ -f "$corpus" ] || { echo "gpu.sh: no corpus at '$corpus' (give --corpus FILE)" >&2; exit 2; }

python="${PYTHON:-python3}"
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
recipe="$repo/benchmarks/recipes/shakespeare-gpu.yaml"
if [ "$smoke" = 1 ]; then
    # Tiny shapes for every training run (ours through --set, nanoGPT's from our run record and --peer-set), two
    # timed steps, eight generated characters, and a target that the first evaluation reaches.
    device=cpu rows=small:4 target=10
    args=(--steps 2 --generation-tokens 8
          --set model.d_model=32 --set model.num_heads=2 --set model.num_layers=1 --set model.d_ff=128
          --set training.sequence_length=32 --set training.max_steps=4 --set training.eval_interval=2
          --set training.eval_batches=1)
    peer_sets=(--peer-set n_layer=1 --peer-set n_head=2 --peer-set n_embd=32 --peer-set block_size=32
               --peer-set batch_size=4 --peer-set max_iters=4 --peer-set eval_interval=2 --peer-set eval_iters=2)
else
    device=cuda rows=small:32,medium:32,medium:64,large:32 target=1.47 args=() peer_sets=()
    "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
        || { echo "gpu.sh: no CUDA device here; --cpu-smoke runs the same steps on the CPU" >&2; exit 2; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
peer_args=()
[ -n "$peer" ] && peer_args=(--peer "$peer" "${peer_sets[@]}")

mkdir -p "$out"
start=$SECONDS
"$python" "$repo/benchmarks/side_by_side.py" "$corpus" --device "$device" --rows "$rows" --recipe "$recipe" \
    --target "$target" -o "$out/bench.json" "${args[@]}" "${peer_args[@]}" 2>&1 | tee "$out/gpu.log"
echo "gpu.sh: done in $((SECONDS - start)) s; numbers in $out/bench.json, log in $out/gpu.log"
