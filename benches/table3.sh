#!/usr/bin/env bash
# The paper's Table 3 (issue 19, item 3) with IDs: ID-only SASRec and the CUREC reward model's
# s_ui variants (attention = CUREC w/o Corr., text, ap, mlp, sa), each warm-started from the
# SASRec run of the same seed (tower and item embeddings frozen, as in benches/controls.sh (b)),
# `SEEDS` seeds each, then each row against SASRec user by user (`curec compare`: overall and by
# thirds of the test users' held-out item popularity).
#
#   DATA=runs/main/data CONTROLS=runs/controls2-mls OUT=runs/coverage-mls NAME=smollm2 \
#     SEEDS=2024,1,2 bash benches/table3.sh
#
# FEATURES (default $OUT/features-$NAME) must be a finished `curec features` folder, e.g. from
# benches/coverage.sh. Finished seeds are reused, so the script can be rerun to add seeds or rows.
set -euo pipefail
DATA=${DATA:-runs/quickstart/data}
CONTROLS=${CONTROLS:-runs/controls2-mls}
OUT=${OUT:-runs/coverage-mls}
NAME=${NAME:-smollm2}
FEATURES=${FEATURES:-$OUT/features-$NAME}
SEEDS=${SEEDS:-2024,1,2}
VARIANTS=${VARIANTS:-attention text ap mlp sa}
EPOCHS=${EPOCHS:-30}
CUREC=${CUREC:-./target/release/curec}
SASREC_CONFIG=${SASREC_CONFIG:-dataflows/sasrec-reference.toml}
common=(--set curec.positions_per_user=32 --set curec.max_epochs="$EPOCHS")

$CUREC train sasrec --data "$DATA" --out "$CONTROLS/sasrec" --seeds "$SEEDS" --config "$SASREC_CONFIG"
rows=()
for v in $VARIANTS; do
  case $v in
    attention) run="$OUT/b-$NAME" ;;          # the coverage run's with-IDs row
    *) run="$OUT/b-$NAME-$v" ;;               # text: item descriptions with the LLM's patterns
  esac
  $CUREC train curec --data "$DATA" --features "$FEATURES" --variant "$v" \
    --out "$run" --seeds "$SEEDS" --config "$SASREC_CONFIG" "${common[@]}" \
    --set curec.init_tower="\"$CONTROLS/sasrec/seed-{seed}/model.safetensors\""
  rows+=("$run")
done
for r in "${rows[@]}"; do
  echo "== $r vs $CONTROLS/sasrec"
  $CUREC compare "$r" "$CONTROLS/sasrec"
done
