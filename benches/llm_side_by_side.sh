#!/usr/bin/env bash
# LLM throughput side by side on the same GGUF files and the same cores: curec's engine against
# llama.cpp (the CPU anchor, built by ../shared/tools/llamacpp-anchor.sh), and against curec's own
# f32 candle path (the baseline the engine replaced). Prints every JSON line and a Markdown table
# with ratios. Both tools run with THREADS threads (default 2).
#
#   benches/llm_side_by_side.sh                 # both pinned models
#   MODELS=smollm2-135m-instruct REPEATS=1 benches/llm_side_by_side.sh
#
# Rows: prefill of one 512-token prompt (llama-bench pp512 / curec bench prefill); decoding of one
# stream (llama-bench tg128 / curec bench generate --batch 1 --new-tokens 128, decode rate); and
# aggregate decoding at batch 8 and 32 (llama-batched-bench -npp 128 -ntg 64 S_TG / curec bench
# generate --batch B --prompt-tokens 128 --new-tokens 64, decode rate). Medians of REPEATS runs.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
REPEATS=${REPEATS:-3}
MODELS=${MODELS:-"smollm2-135m-instruct qwen2.5-0.5b-instruct"}
ANCHOR=$(bash ../shared/tools/llamacpp-anchor.sh | tail -n 1)
cargo build --release --quiet
BIN=./target/release/curec
export RAYON_NUM_THREADS=$THREADS
median() { python3 -c 'import sys,statistics;print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }
field() { python3 -c "import json,sys;print(json.loads(sys.stdin.read())['$1'])"; }
rows=()
for name in $MODELS; do
  gguf=$($BIN model fetch "$name" 2>/dev/null | tail -n 1)
  # llama.cpp: pp512 and tg128 from llama-bench (its own repeats), S_TG from llama-batched-bench.
  lb=$("$ANCHOR/llama-bench" -m "$gguf" -t "$THREADS" -p 512 -n 128 -r "$REPEATS" -o json 2>/dev/null)
  echo "$lb" | python3 -c 'import json,sys;[print(json.dumps({k:r[k] for k in ("n_prompt","n_gen","avg_ts","stddev_ts")})) for r in json.load(sys.stdin)]'
  l_pp=$(echo "$lb" | python3 -c 'import json,sys;print([r["avg_ts"] for r in json.load(sys.stdin) if r["n_prompt"]>0][0])')
  l_tg=$(echo "$lb" | python3 -c 'import json,sys;print([r["avg_ts"] for r in json.load(sys.stdin) if r["n_gen"]>0][0])')
  bb=$("$ANCHOR/llama-batched-bench" -m "$gguf" -t "$THREADS" -c 8192 -npp 128 -ntg 64 -npl 1,8,32 2>/dev/null)
  echo "$bb" | grep '^|' || true
  l_b8=$(echo "$bb" | awk -F'|' '$2+0==128 && $4+0==8 {gsub(/ /,"",$9); print $9}')
  l_b32=$(echo "$bb" | awk -F'|' '$2+0==128 && $4+0==32 {gsub(/ /,"",$9); print $9}')
  # curec, medians of REPEATS processes.
  pp=(); tg=(); b8=(); b32=(); rss=(); c_tg=()
  for _ in $(seq "$REPEATS"); do
    j=$($BIN bench prefill --model "$name" --tokens 512 --repeats 1); echo "$j"; pp+=("$(echo "$j" | field tokens_per_s)")
    j=$($BIN bench generate --model "$name" --batch 1 --new-tokens 128); echo "$j"; tg+=("$(echo "$j" | field decode_tokens_per_s)")
    j=$($BIN bench generate --model "$name" --batch 8 --prompt-tokens 128 --new-tokens 64); echo "$j"
    b8+=("$(echo "$j" | field decode_tokens_per_s)"); rss+=("$(echo "$j" | field peak_rss_mib)")
    j=$($BIN bench generate --model "$name" --batch 32 --prompt-tokens 128 --new-tokens 64); echo "$j"; b32+=("$(echo "$j" | field decode_tokens_per_s)")
  done
  j=$($BIN bench generate --model "$name" --engine candle --batch 1 --new-tokens 64); echo "$j"; c_tg=$(echo "$j" | field tokens_per_s)
  # On a CPU with AVX-512 VNNI the default kernel is avx512vnni: the AVX2 kernel's rates beside it
  # (same script, same cores) show what the newer instructions add.
  if [ "$($BIN bench prefill --model "$name" --tokens 8 --repeats 1 | field kernel)" = avx512vnni ]; then
    a_pp=(); a_tg=(); a_b32=()
    for _ in $(seq "$REPEATS"); do
      j=$(CUREC_KERNEL=avx2 $BIN bench prefill --model "$name" --tokens 512 --repeats 1); echo "$j"; a_pp+=("$(echo "$j" | field tokens_per_s)")
      j=$(CUREC_KERNEL=avx2 $BIN bench generate --model "$name" --batch 1 --new-tokens 128); echo "$j"; a_tg+=("$(echo "$j" | field decode_tokens_per_s)")
      j=$(CUREC_KERNEL=avx2 $BIN bench generate --model "$name" --batch 32 --prompt-tokens 128 --new-tokens 64); echo "$j"; a_b32+=("$(echo "$j" | field decode_tokens_per_s)")
    done
    rows+=("$name|prefill 512, curec with the AVX2 kernel|$l_pp|$(median "${a_pp[@]}")")
    rows+=("$name|decode, 1 stream, curec with the AVX2 kernel|$l_tg|$(median "${a_tg[@]}")")
    rows+=("$name|decode, batch 32, curec with the AVX2 kernel|$l_b32|$(median "${a_b32[@]}")")
  fi
  rows+=("$name|prefill 512 (pp512)|$l_pp|$(median "${pp[@]}")")
  rows+=("$name|decode, 1 stream (tg128)|$l_tg|$(median "${tg[@]}")")
  rows+=("$name|decode, batch 8 (S_TG)|$l_b8|$(median "${b8[@]}")")
  rows+=("$name|decode, batch 32 (S_TG)|$l_b32|$(median "${b32[@]}")")
  rows+=("$name|peak RSS MiB, batch 8 (curec)|-|$(median "${rss[@]}")")
  rows+=("$name|candle f32 path, 1 stream incl. prefill (baseline)|-|$c_tg")
done
echo
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $THREADS threads, kernel $($BIN bench prefill --model smollm2-135m-instruct --tokens 8 --repeats 1 | field kernel)"
echo
echo "| model | tok/s | llama.cpp | curec | ratio |"
echo "|---|---|---|---|---|"
for r in "${rows[@]}"; do
  IFS='|' read -r m what a b <<<"$r"
  ratio=$(python3 -c "a='$a';b=float('$b');print(f'{b/float(a):.2f}x' if a not in ('-','') else '')")
  printf '| %s | %s | %s | %.1f | %s |\n' "$m" "$what" "$a" "$b" "$ratio"
done
