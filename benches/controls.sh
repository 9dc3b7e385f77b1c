#!/usr/bin/env bash
# Controls for the text path (issue 19, item 2): can the reward model turn a signal in the text
# into better rankings? Model-free features (oracle: collaborative reasons; shuffled: the same
# texts on random rows), the text-only setting (curec.ids=false: no item-ID embeddings anywhere)
# and the CUREC model with IDs, against Pop and SASRec, `SEEDS` seeds each, then paired
# per-user comparisons (`curec compare`).
#
#   DATA=runs/quickstart/data OUT=runs/controls SEEDS=2024,1,2 bash benches/controls.sh
#
# PART=a runs the text-only rows only, PART=b the with-IDs rows only (default: both).
set -euo pipefail
DATA=${DATA:-runs/quickstart/data}
OUT=${OUT:-runs/controls}
SEEDS=${SEEDS:-2024,1,2}
PART=${PART:-ab}
EPOCHS=${EPOCHS:-30}
CUREC=${CUREC:-./target/release/curec}
SASREC_CONFIG=${SASREC_CONFIG:-dataflows/sasrec-reference.toml}
mkdir -p "$OUT"
common=(--set curec.positions_per_user=32 --set curec.max_epochs="$EPOCHS")

for w in oracle shuffled; do
  [ -f "$OUT/features-$w/manifest.json" ] || \
    $CUREC features --data "$DATA" --out "$OUT/features-$w" --writer $w --set features.reasons_per_user=0 >/dev/null
done

$CUREC train pop --data "$DATA" --out "$OUT/pop" --seeds "$SEEDS"
if [[ $PART == *a* ]]; then
  # (a) text only: items are projected text vectors (descriptions for `text`, pooled reasons otherwise).
  $CUREC train curec --data "$DATA" --features "$OUT/features-oracle" --variant text \
    --out "$OUT/a-text" --seeds "$SEEDS" "${common[@]}" --set curec.ids=false
  for w in oracle shuffled; do
    $CUREC train curec --data "$DATA" --features "$OUT/features-$w" --variant attention \
      --out "$OUT/a-$w" --seeds "$SEEDS" "${common[@]}" --set curec.ids=false
  done
fi
if [[ $PART == *b* ]]; then
  # (b) with IDs, on the tuned SASRec (the reference job's settings, $SASREC_CONFIG): SASRec, the
  # CUREC model warm-started from the SASRec run of the same seed (tower and item embeddings
  # frozen, the matcher and DIN head trained, as in the quickstart job), and the paper's strongest
  # baselines: BERT4Rec and the KAR-style model (oracle texts; the same backbone settings).
  $CUREC train sasrec --data "$DATA" --out "$OUT/sasrec" --seeds "$SEEDS" --config "$SASREC_CONFIG"
  for w in oracle shuffled; do
    $CUREC train curec --data "$DATA" --features "$OUT/features-$w" --variant attention \
      --out "$OUT/b-$w" --seeds "$SEEDS" --config "$SASREC_CONFIG" "${common[@]}" \
      --set curec.init_tower="\"$OUT/sasrec/seed-{seed}/model.safetensors\""
  done
  $CUREC train bert4rec --data "$DATA" --out "$OUT/bert4rec" --seeds "$SEEDS"
  $CUREC train kar --data "$DATA" --features "$OUT/features-oracle" --out "$OUT/kar-oracle" \
    --seeds "$SEEDS" --config "$SASREC_CONFIG"
fi
for r in "$OUT"/a-* "$OUT"/b-* "$OUT"/sasrec "$OUT"/bert4rec "$OUT"/kar-*; do
  [ -f "$r/metrics.json" ] && $CUREC compare "$r" "$OUT/pop" || true
done
for r in "$OUT"/b-* "$OUT"/bert4rec "$OUT"/kar-*; do
  [ -f "$r/metrics.json" ] && $CUREC compare "$r" "$OUT/sasrec" || true
done
for w in text oracle; do
  [ -f "$OUT/a-$w/metrics.json" ] && $CUREC compare "$OUT/a-$w" "$OUT/a-shuffled" || true
done
