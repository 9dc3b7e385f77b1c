#!/usr/bin/env bash
# Coverage (issue 19, item 3): an LLM's reasons for each user's `PER_USER` most recent train
# interactions, then the reward model on them in the two settings of benches/controls.sh:
# (a) text only (`curec.ids=false`) and (b) with IDs on the tuned SASRec, `SEEDS` seeds each,
# compared user by user with the controls run's Pop, shuffled-text and SASRec rows.
#
#   CONTROLS=runs/controls2-mls OUT=runs/coverage-mls MODEL=smollm2-135m-instruct \
#     SEEDS=2024,1,2 bash benches/coverage.sh
#
# CONTROLS must be a finished benches/controls.sh run on the same prepared data (its pop,
# a-shuffled, a-oracle and sasrec rows are reused, not retrained).
set -euo pipefail
DATA=${DATA:-runs/quickstart/data}
CONTROLS=${CONTROLS:-runs/controls2-mls}
OUT=${OUT:-runs/coverage-mls}
MODEL=${MODEL:-smollm2-135m-instruct}
NAME=${NAME:-${MODEL%%-*}}
PER_USER=${PER_USER:-20}
ALIGNED=${ALIGNED:-false}
SEEDS=${SEEDS:-2024,1,2}
EPOCHS=${EPOCHS:-30}
CUREC=${CUREC:-./target/release/curec}
SASREC_CONFIG=${SASREC_CONFIG:-dataflows/sasrec-reference.toml}
FEATURES="$OUT/features-$NAME"
mkdir -p "$OUT"
common=(--set curec.positions_per_user=32 --set curec.max_epochs="$EPOCHS")

# Resumable: a finished features folder is reused, an interrupted one is completed.
$CUREC features --data "$DATA" --model "$MODEL" --out "$FEATURES" \
  --set features.reasons_per_user="$PER_USER" --set features.aligned="$ALIGNED"

# (a) text only: items enter as projected pooled-reason vectors; no item-ID embeddings.
$CUREC train curec --data "$DATA" --features "$FEATURES" --variant attention \
  --out "$OUT/a-$NAME" --seeds "$SEEDS" "${common[@]}" --set curec.ids=false
# (b) with IDs: warm-started from the controls run's SASRec of the same seed.
$CUREC train curec --data "$DATA" --features "$FEATURES" --variant attention \
  --out "$OUT/b-$NAME" --seeds "$SEEDS" --config "$SASREC_CONFIG" "${common[@]}" \
  --set curec.init_tower="\"$CONTROLS/sasrec/seed-{seed}/model.safetensors\""

$CUREC compare "$OUT/a-$NAME" "$CONTROLS/pop"
$CUREC compare "$OUT/a-$NAME" "$CONTROLS/a-shuffled"
$CUREC compare "$OUT/a-$NAME" "$CONTROLS/a-oracle"
$CUREC compare "$OUT/b-$NAME" "$CONTROLS/sasrec"
