#!/usr/bin/env bash
# The GPU machine's checks of the training fast path, as one batch: the CUDA-only test cases, then the
# training-speed benchmark (all variants and the baseline, side by side). From the repo root, on a CUDA machine
# whose python3 has torch, with wheels of what it lacks (pydantic, boto3, bitsandbytes, liger-kernel, the locked
# transformers and peft) in .whl/ and the tiny Llama built by the tests in .gpu/tiny-llama:
#
#     OUT=/tmp/gpu bash bench/gpu_check.sh   # writes machine.log, tests.log, bench.log and the benchmark's JSON to $OUT
#
# On the 2026-12-04 H200 the tests took 30 s and the 11 variants (15 timed steps each) about 430 s in all: with
# 15 minutes of device time (start-up included) that leaves no room for a rerun of everything: ONLY="name ..."
# reruns some variants.
#     bash bench/gpu_check.sh prepare             # here, first: fills .whl/ and .gpu/ (both git-ignored, ~56 MB)
set -u
if [ "${1:-}" = prepare ]; then  # wheels for the GPU image's Python 3.12, at the versions of locks/dev.txt
  pins=$(grep -E '^(pydantic|pydantic-core|annotated-types|typing-inspection|boto3|botocore|s3transfer|jmespath|dill|bitsandbytes|transformers|peft)==' locks/dev.txt | cut -d' ' -f1)
  mkdir -p .whl .gpu/tiny-llama
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl $pins liger-kernel || exit 1
  # bitsandbytes ships one library per CUDA release: keep CUDA 13's (the machine's) to fit the 64 MiB transfer
  zip -q -d .whl/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*' 'bitsandbytes/libbitsandbytes_rocm*' || true
  .venv/bin/python -c "from pathlib import Path; from steps.base_model.shipped import build_shipped
build_shipped('tiny-random-llama', 0, Path('.gpu/tiny-llama'), None)"
  exit
fi
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD TUNELINE_TINY_MODEL_DIR=$PWD/.gpu/tiny-llama PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi -L; python3 -c "import torch, transformers, peft, bitsandbytes, liger_kernel; print('torch',
torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes',
bitsandbytes.__version__)"; } 2>&1 | tee "$OUT/machine.log"
timeout "${TEST_SECONDS:-90}" python3 -m pytest -p no:cacheprovider -n 0 -q -o addopts="-ra" \
  tests/steps/train/test_fastpath.py tests/steps/train/methods/test_qlora.py -k cuda 2>&1 | tee "$OUT/tests.log"
timeout "${BENCH_SECONDS:-450}" python3 bench/train_speed.py --steps "${STEPS:-15}" --warmup "${WARMUP:-4}" \
  --out "$OUT" ${ONLY:+--only $ONLY} 2>&1 | grep -v Warning | tee "$OUT/bench.log"
