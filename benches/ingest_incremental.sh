#!/usr/bin/env bash
# Incremental cost of ingestion (issue 21's target: ingesting 1,000 interactions into the state of
# a 2M-interaction replay costs at most 1/100 of replaying the 2M). `curec bench ingest` replays
# the synthetic log of `curec bench replay` into a temporary run (timed inside the dataflow), then
# ingests BATCHES batches of NEW interactions of known users at later times two ways, in the same
# process on the same cores: one-shot (`curec ingest`'s path: open the newest snapshot, run the
# batch, write a snapshot) and resident (`curec serve`'s path: one session kept up, each batch
# through the operators, one checkpoint at the end, timed on its own). Prints each JSON line, then
# the medians and the ratios replay / batch.
#
#   benches/ingest_incremental.sh                        # 2,000,000 then 1,000 × 5, 1 and 2 workers
#   INTERACTIONS=200000 NEW=100 WORKERS="1" BATCHES=9 benches/ingest_incremental.sh
set -euo pipefail
cd "$(dirname "$0")/.."
INTERACTIONS=${INTERACTIONS:-2000000}
NEW=${NEW:-1000}
WORKERS=${WORKERS:-"1 2"}
BATCHES=${BATCHES:-5}
cargo build --release --quiet
B=./target/release/curec
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
for w in $WORKERS; do
  /usr/bin/time -f '%M' -o "$d/rss-$w" $B bench ingest --interactions "$INTERACTIONS" --new "$NEW" \
    --batches "$BATCHES" -w "$w" 2>/dev/null | tee "$d/ingest-$w.json"
done
python3 - "$d" $WORKERS <<'PY'
import json, statistics, sys
d, workers = sys.argv[1], sys.argv[2:]
for w in workers:
    j = json.load(open(f"{d}/ingest-{w}.json"))
    rss = int(open(f"{d}/rss-{w}").read().split()[-1]) / 1024
    rep = j["replay_seconds"]
    one = statistics.median(j["one_shot_seconds"])
    res = statistics.median(j["resident_seconds"])
    ops = statistics.median(j["resident_dataflow_seconds"])
    print(f"\n{w} worker(s): replay of {j['interactions']:,}: {rep:.3f} s; batches of {j['new']:,} (median of {j['batches']}):")
    print(f"  one-shot (curec ingest):  {one:.3f} s = 1/{rep / one:.0f} of the replay")
    print(f"  resident (curec serve):   {res * 1e3:.1f} ms = 1/{rep / res:.0f} of the replay "
          f"(in the operators {ops * 1e3:.1f} ms); opening the session {j['resident_open_seconds']:.2f} s, "
          f"a checkpoint {j['checkpoint_seconds']:.3f} s; peak RSS {rss:.0f} MiB")
PY
