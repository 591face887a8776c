#!/usr/bin/env bash
# GPU check, under 10 minutes on one GPU: the engine parity matrix and the family routing tests
# with the HF reference on the device (LABKIT_TEST_DEVICE, default cuda).
#
#   bash bench/device_check.sh            # from the repository root, on the GPU machine
#
# The device machine has torch but no TransformerLens, transformers pin or vLLM, and reaches no
# registry: put the wheels in wheels/ first (pip download -d wheels transformer-lens==4.3.0
# "transformers>=5.16.1,<5.20" ... on a machine that can; vLLM's GPU wheel is larger than one
# 64 MiB transfer, so without it the engine tests skip and only the HF-path family tests run).
# Not yet run on a GPU: no device was lent to the session that wrote it.
set -euo pipefail
cd "$(dirname "$0")/.."
export LABKIT_TEST_DEVICE="${LABKIT_TEST_DEVICE:-cuda}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python3}"
if [ -d wheels ]; then
  "$PY" -m pip install --quiet --no-index --find-links wheels -e ".[test]" || echo "device_check: wheel install incomplete"
fi
"$PY" - <<'PY'
import os, torch
device = os.environ["LABKIT_TEST_DEVICE"]
assert device == "cpu" or torch.cuda.is_available(), f"LABKIT_TEST_DEVICE={device} but torch sees no GPU"
print("device:", device, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
status=0
# engine parity matrix (skips without vLLM) and TP=2 where two GPUs exist
timeout 420 "$PY" -m pytest -p no:cacheprovider -q -x tests/test_vllm_families.py || status=$?
# routing math of every family (HF path)
timeout 150 "$PY" -m pytest -p no:cacheprovider -q tests/test_moe_families.py -m "not slow" || status=$?
exit $status
