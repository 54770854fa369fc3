#!/usr/bin/env bash
# The GPU check (bench/gpu/gpu_check.py) on one H100/H200 without network, under a hard time limit.
# Arguments go to gpu_check.py (e.g. --shapes 1b, --deadline-s 300). See bench/gpu/README.md.
#   GPU_CHECK_TIMEOUT_S  hard limit of the check itself (default 450; the script's own --deadline-s
#                        is 420, the rest is slack for a model load in flight and the table)
#   PYTHON               the interpreter with torch, transformers, peft and accelerate (python3)
#   OUT                  where the JSON lines, stdout and stderr are written (/tmp/kubetune-gpu-check-out)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
LIMIT_S="${GPU_CHECK_TIMEOUT_S:-450}"
WHEELS="bench/gpu/wheels"
OUT_DIR="${OUT:-/tmp/kubetune-gpu-check-out}"

# The wheels are brought for one run and must never be committed.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1 && [ -n "$(git ls-files -- "$WHEELS")" ]; then
  echo "run.sh: git tracks $WHEELS; wheels must not be committed (git rm -r --cached $WHEELS)" >&2
  exit 2
fi
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  pkgs=()
  for name in trl bitsandbytes datasets pydantic liger_kernel flash_attn; do
    if compgen -G "$WHEELS/${name}-*.whl" >/dev/null; then pkgs+=("${name//_/-}"); fi
  done
  if [ "${#pkgs[@]}" -gt 0 ]; then
    echo "run.sh: installing ${pkgs[*]} from $WHEELS (no index)" >&2
    timeout 90 "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index \
      --find-links "$WHEELS" "${pkgs[@]}"
  fi
fi

export PYTHONPATH="$ROOT/api:$ROOT/trainer_image:$ROOT/hack${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" -c "import torch; print('run.sh:', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))" >&2
mkdir -p "$OUT_DIR"
timeout -k 15 "$LIMIT_S" "$PYTHON" bench/gpu/gpu_check.py --jsonl "$OUT_DIR/gpu_check.jsonl" "$@" \
  2> >(tee "$OUT_DIR/gpu_check.stderr" >&2) | tee "$OUT_DIR/gpu_check.out"
