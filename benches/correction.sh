#!/usr/bin/env bash
# The correction's rows of the paper's Table 3 (issue 19, items 3-4): for each seed, the reward
# model of that seed's Table 3 attention run evaluated on the features as written (w/o Corr.),
# the chronological correction with the state frozen during the replay (w/o Update), and the full
# correction, each over the job's time window; then every pair compared user by user
# (`curec compare`: the seeds' per-user mean, paired bootstrap, thirds by item popularity).
#
#   JOB=dataflows/correction-ml100k.toml RM=runs/coverage-ml100k/b-smollm2 OUT=runs/corr-ml100k \
#     SASREC=runs/controls2-ml100k/sasrec SEEDS=2024,1,2 bash benches/correction.sh
#
# VARIANTS (default "no-correction no-update full") picks rows, so two shells can run rows side
# by side (RAYON_NUM_THREADS=1 each); COMPARE=0 skips the comparisons. Finished runs are kept and
# a killed replay resumes from its newest snapshot when the script is run again.
set -euo pipefail
JOB=${JOB:-dataflows/correction-ml100k.toml}
RM=${RM:-runs/coverage-ml100k/b-smollm2}
OUT=${OUT:-runs/corr-ml100k}
SASREC=${SASREC:-runs/controls2-ml100k/sasrec}
SEEDS=${SEEDS:-2024,1,2}
VARIANTS=${VARIANTS:-no-correction no-update full}
COMPARE=${COMPARE:-1}
CUREC=${CUREC:-./target/release/curec}

for s in ${SEEDS//,/ }; do
  for v in $VARIANTS; do
    run="$OUT/$v/seed-$s"
    if [ -f "$run/metrics.json" ]; then continue; fi
    flag=()
    case $v in
      no-correction) flag=(--no-correction) ;;
      no-update) flag=(--no-update) ;;
      full) ;;
      *) echo "unknown variant $v (no-correction, no-update, full)" >&2; exit 2 ;;
    esac
    mkdir -p "$OUT/$v"
    echo "== $v seed $s"
    $CUREC replay "$JOB" --out "$run" "${flag[@]}" --set train.seed="$s" \
      --set replay.reward_model="\"$RM/seed-$s\"" 2>&1 | tee "$run.log" | grep -v " epoch " || true
    [ -f "$run/metrics.json" ] || { echo "$run: the replay did not finish (see $run.log)" >&2; exit 1; }
  done
done
if [ "$COMPARE" = 1 ]; then
  for pair in "full no-correction" "no-update no-correction" "full no-update"; do
    set -- $pair
    echo "== $1 vs $2"
    $CUREC compare "$OUT/$1" "$OUT/$2"
  done
  echo "== each row vs SASRec ($SASREC)"
  for v in $VARIANTS; do
    echo "-- $v"
    $CUREC compare "$OUT/$v" "$SASREC"
  done
fi
