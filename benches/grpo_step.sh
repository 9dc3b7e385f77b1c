#!/usr/bin/env bash
# One GRPO step, side by side: the baseline binary (built from BASE_REV in a worktree, default
# ba141f2, the commit the LLM-engine issue measured against) and this checkout's, on the same
# prepared data, model and cores, alternating runs. A run is `curec pretrain` with G = 8 and one
# shared prompt per group (the group's completions packed into one row), LoRA, beta = 0.04.
# Prints each run's per-step seconds from steps.jsonl and a Markdown table: mean seconds per step
# (steps that trained only) by phase, and the ratio of the baseline's mean to this checkout's.
#
#   benches/grpo_step.sh <prepared data dir>               # e.g. runs/main/data (ml-latest-small)
#   BASE_BIN=/path/to/old/curec RUNS=2 STEPS=6 benches/grpo_step.sh runs/main/data
#   EXTRA="--set pretrain.shuffle_per_completion=true" ...  # one candidate order per completion
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: benches/grpo_step.sh <prepared data dir>}
MODEL=${MODEL:-smollm2-135m-instruct}
RUNS=${RUNS:-2}
STEPS=${STEPS:-6}
BASE_REV=${BASE_REV:-ba141f2}
EXTRA=${EXTRA:-}
export RAYON_NUM_THREADS=${THREADS:-2}
cargo build --release --quiet
NEW=$(mktemp -d)/curec
cp ./target/release/curec "$NEW"
if [ -z "${BASE_BIN:-}" ]; then
  wt=$(mktemp -d)
  git worktree add -q --detach "$wt/src" "$BASE_REV"
  (cd "$wt/src" && CARGO_TARGET_DIR="$wt/target" cargo build --release --quiet)
  BASE_BIN="$wt/target/release/curec"
  git worktree remove --force "$wt/src"
fi
out=$(mktemp -d)
run() { # <label> <binary> <run index>
  local dir="$out/$1-$3"
  "$2" pretrain --data "$DATA" --model "$MODEL" --out "$dir" \
    --set pretrain.sample="$STEPS" --set pretrain.prompts_per_step=1 --set grpo.group_size=8 \
    --set pretrain.shuffle_per_completion=false --set pretrain.eval_users=2 \
    --set pretrain.eval_max_new_tokens=8 --set pretrain.epochs=1 $EXTRA >"$dir.log" 2>&1
  python3 - "$dir/steps.jsonl" "$1" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    s = d["seconds"]
    print(json.dumps({"binary": sys.argv[2], "step": d.get("step"), "rows_trained": d["rows_trained"],
                      "completion_tokens": round(d["completion_tokens"], 1),
                      **{k: round(v, 2) for k, v in s.items()}}))
EOF
}
{
  for r in $(seq "$RUNS"); do
    run base "$BASE_BIN" "$r"
    run new "$NEW" "$r"
  done
} | tee "$out/steps.jsonl"
python3 - "$out" "$BASE_REV" <<'EOF'
import json, sys, statistics as st
# Per binary: steps that trained, with the packed row's tokens (prompt + G completions; the
# prompt length from the trained-token count, which counts it once per completion).
rows = {"base": [], "new": []}
for b in rows:
    r = 1
    while True:
        try:
            lines = open(f"{sys.argv[1]}/{b}-{r}/steps.jsonl").read().splitlines()
        except FileNotFoundError:
            break
        for line in lines:
            d = json.loads(line)
            if d["rows_trained"] == 0:
                continue
            s = d["seconds"]
            c = d["completion_tokens"]
            prompt = d["train_tokens_per_s"] * s["train"] / 8 - c
            s["step"] = sum(s[k] for k in ("generate", "reward", "reference", "old", "train"))
            rows[b].append({**s, "completion": c, "packed": prompt + 8 * c})
        r += 1
phases = ["generate", "reference", "train_forward", "train_backward", "train", "step"]
mean = {b: {p: st.mean(x[p] for x in rs) for p in phases + ["completion", "packed"]} for b, rs in rows.items()}
print(f"\n| seconds per trained step (mean) | {sys.argv[2]} | this checkout | ratio |\n|---|---|---|---|")
for p in phases:
    a, b = mean["base"][p], mean["new"][p]
    print(f"| {p} | {a:.2f} | {b:.2f} | {a / b:.2f}× |")
for p, what in (("completion", "completion tokens (mean)"), ("packed", "packed row tokens (mean)")):
    print(f"| {what} | {mean['base'][p]:.1f} | {mean['new'][p]:.1f} | |")
# The two binaries sample different completions (different lengths): the step scaled to the
# baseline's work, generation by completion tokens and the passes by packed-row tokens (one row
# per group: with pretrain.shuffle_per_completion=true nothing is packed and this line is off).
b, n = mean["base"], mean["new"]
same = n["generate"] * b["completion"] / n["completion"] + (n["step"] - n["generate"]) * b["packed"] / n["packed"]
print(f"| step at the baseline's token counts | {b['step']:.2f} | {same:.2f} | {b['step'] / same:.2f}× |")
print(f"| steps measured | {len(rows['base'])} | {len(rows['new'])} | |")
EOF
