#!/usr/bin/env bash
# The whole GPU check in one command, for a lent GPU machine (issue 3; bench/README.md):
#
#   bash scripts/gpu-wheels          # here, once: the wheels that machine lacks, into .whl/
#   bash bench/gpu_session.sh [DIR]  # there: carry .whl; logs into DIR (default $OUT)
#
# That machine reaches no package registry, so the wheels carried in .whl/ are installed into
# /tmp/site and put on PYTHONPATH (its own torch stays). Then bench/gpu_check.py (SFT LoRA bf16,
# SFT full fp16, DPO on the LoRA checkpoint through a real server, load + generate) and
# bench/train_throughput.py on the GPU (BENCH_ARGS adds options, e.g. "--skip compiled": compiling on a
# machine with a cold inductor cache takes minutes). Exits non-zero if either fails.
set -u
out=${1:-${OUT:-/tmp/gpu-session}}
mkdir -p "$out"
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PYTHONPATH PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"
started=$SECONDS
timeout "${CHECK_SECONDS:-240}" "$python" bench/gpu_check.py 2>&1 | grep --line-buffered -v 'it/s]' | tee "$out/gpu_check.log"
check=${PIPESTATUS[0]}
echo "gpu_check: exit $check after $((SECONDS - started)) s"
started=$SECONDS
# shellcheck disable=SC2086 # BENCH_ARGS is a list of options, e.g. "--skip compiled"
timeout "${BENCH_SECONDS:-330}" "$python" bench/train_throughput.py --device cuda --steps "${STEPS:-20}" --warmup 5 \
  --rounds 1 ${BENCH_ARGS:-} 2>&1 | grep --line-buffered -v 'it/s]' | tee "$out/throughput.log"
bench=${PIPESTATUS[0]}
echo "train_throughput: exit $bench after $((SECONDS - started)) s"
exit $((check || bench))
