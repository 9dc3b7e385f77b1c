#!/usr/bin/env bash
# LLM throughput side by side: curec vs Hugging Face transformers (PyTorch CPU) on the same GGUF
# files (both dequantize to f32), in one run on the same machine. Prints JSON lines and a ratio table.
#
#   python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers gguf accelerate numpy
#   PY=/tmp/hf/bin/python benches/llm_side_by_side.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
cargo build --release --quiet
BIN=./target/release/curec
$BIN model fetch smollm2-135m-instruct qwen2.5-0.5b-instruct >/dev/null
NEW=${NEW:-64}
rows=()
for name in smollm2-135m-instruct qwen2.5-0.5b-instruct; do
  gguf=$($BIN model fetch "$name" 2>/dev/null)
  for b in 1 8; do
    ours=$($BIN bench generate --model "$name" --batch "$b" --new-tokens "$NEW" 2>/dev/null)
    hf=$($PY benches/hf_reference.py generate "$gguf" --batch "$b" --new-tokens "$NEW" 2>/dev/null)
    echo "$ours"; echo "$hf"
    rows+=("$name generate batch $b|$(echo "$ours" | $PY -c 'import json,sys;print(round(json.load(sys.stdin)["tokens_per_s"],1))')|$(echo "$hf" | $PY -c 'import json,sys;print(round(json.load(sys.stdin)["tokens_per_s"],1))')")
  done
  ours=$($BIN bench logprobs --model "$name" --batch 8 --seq-len 256 2>/dev/null)
  hf=$($PY benches/hf_reference.py logprobs "$gguf" --batch 8 --seq-len 256 2>/dev/null)
  echo "$ours"; echo "$hf"
  rows+=("$name log-probs 8x256|$(echo "$ours" | $PY -c 'import json,sys;print(round(json.load(sys.stdin)["tokens_per_s"],1))')|$(echo "$hf" | $PY -c 'import json,sys;print(round(json.load(sys.stdin)["tokens_per_s"],1))')")
done
echo
echo "| bench | curec tok/s | transformers tok/s | ratio |"
echo "|---|---|---|---|"
for r in "${rows[@]}"; do
  IFS='|' read -r what a b <<<"$r"
  echo "| $what | $a | $b | $($PY -c "print(f'{$a/$b:.2f}x')") |"
done
