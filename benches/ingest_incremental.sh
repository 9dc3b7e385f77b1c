#!/usr/bin/env bash
# Incremental cost of ingestion (issue 21's target: ingesting 1,000 interactions into the state of
# a 2M-interaction replay costs at most 1/100 of replaying the 2M). `curec bench replay --out`
# replays the synthetic log with the stand-in (timed inside the dataflow), then `curec ingest
# --from` that run adds NEW interactions of known users at later times (on a fresh copy of the run
# each repeat). Prints each run's JSON, then the medians and the ratios: the whole ingest command
# (reading the log and the state, the slice, the snapshot) and its slice in the operators alone.
#
#   benches/ingest_incremental.sh                   # 2,000,000 then 1,000, 1 worker, 3 repeats
#   INTERACTIONS=200000 NEW=100 WORKERS=2 REPEATS=5 benches/ingest_incremental.sh
set -euo pipefail
cd "$(dirname "$0")/.."
INTERACTIONS=${INTERACTIONS:-2000000}
NEW=${NEW:-1000}
WORKERS=${WORKERS:-1}
REPEATS=${REPEATS:-3}
cargo build --release --quiet
B=./target/release/curec
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
$B bench replay --interactions "$INTERACTIONS" -w "$WORKERS" --out "$d/run" | tee "$d/replay.json"
python3 - "$d/new.csv" "$NEW" "$INTERACTIONS" <<'PY'
import random, sys
path, n, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
random.seed(7)
with open(path, "w") as f:
    f.write("user,item,timestamp,rating\n")
    for k in range(n):  # known users and items (bench defaults: 100,000 and 50,000), later times
        f.write(f"{random.randrange(100000)},{random.randrange(50000)},{start + k},5\n")
PY
for r in $(seq "$REPEATS"); do
  rm -rf "$d/copy" && cp -r "$d/run" "$d/copy"
  /usr/bin/time -f '%e %M' -o "$d/time-$r" $B ingest --from "$d/copy" "$d/new.csv" -w "$WORKERS" 2>/dev/null \
    | tee "$d/ingest-$r.json"
done
python3 - "$d" "$REPEATS" <<'PY'
import json, statistics, sys
d, n = sys.argv[1], int(sys.argv[2])
replay = json.load(open(f"{d}/replay.json"))
ing = [json.load(open(f"{d}/ingest-{r}.json")) for r in range(1, n + 1)]
times = [open(f"{d}/time-{r}").read().split() for r in range(1, n + 1)]
wall = statistics.median(float(t[0]) for t in times)
rss = max(int(t[1]) for t in times) / 1024
slice_s = statistics.median(sum(j["slice_seconds"]) for j in ing)
rep = replay["seconds"]
print(f"\nreplay of {replay['interactions']:,} on {replay['workers']} worker(s): {rep:.3f} s "
      f"({replay['per_worker_per_s'] / 1e6:.2f} M/s per worker)")
print(f"ingest of {ing[0]['interactions']:,}: command {wall:.3f} s (median of {n}, peak RSS {rss:.0f} MiB) "
      f"= 1/{rep / wall:.0f} of the replay; its slice in the operators {slice_s * 1e3:.3f} ms "
      f"= 1/{rep / slice_s:,.0f}")
PY
