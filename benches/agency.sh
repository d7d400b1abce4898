#!/usr/bin/env bash
# Agency scale in one process (BENCHMARKS.md, "Agency scale: 200 locations in one run"): one
# `contacts-etl run` pipeline over LOCATIONS simulated locations, each at its full limit
# (100 requests per 10 s per location, as the API counts: per app per location), and what it
# costs: the exporter's CPU cores and peak RSS (whole run and per location), the 429s, and each
# location's share of its limit over its own busy time.
#
# Usage: benches/agency.sh [LOCATIONS] [CONTACTS_PER_LOCATION] [FORMAT]
#        (defaults 200, 1000, parquet; about 2 minutes of run plus the build)
#        KEEP=1 benches/agency.sh ...   keeps the work directory (reports, samples, logs)
#        SIM_EXTRA='--slow-rate 1 --slow-ms 150' benches/agency.sh ...   every reply 150 ms late,
#        as over a real network (any `contacts-etl sim` options)
#        RUN_PREFIX='perf record -g -o /tmp/agency.perf' benches/agency.sh ...   profiles the exporter
#        (the figures then include the profiler's cost)
#        STEAL=50/500 benches/agency.sh ...   a busy host, reproducibly: the exporter is stopped
#        (SIGSTOP) for 50 ms about every 500 ms (375 to 625; the stop at most 3/4 of the
#        period), as a virtual machine whose CPU the host gives to others (steal time): about a
#        tenth of its time (215 stops in a 113 s run). The simulator, the server, runs
#        undisturbed. The figures also give the host's own steal time during the run
#        (/proc/stat, summed over the CPUs), which lowers the shares as well: compare runs
#        with little of it.
#
# The simulator is a separate process (`contacts-etl sim`) serving every location with its own
# rate limit and daily quota; each location has its own token (HL_TOKEN_<n>, from the
# environment, as pipeline files require). The pipeline uses the defaults of a nightly export
# (search listing, pages of 500, tasks and appointments location-wide, notes per contact:
# about 1.05 requests per contact at 1,000 a location) with parallel_locations = LOCATIONS, so every location
# runs at once. The exporter runs under /usr/bin/time -v; the simulator's CPU comes from
# /proc/<pid>/stat before and after, and its counters from /_sim/stats, sampled every second.
set -euo pipefail
cd "$(dirname "$0")/.."
L=${1:-200}
N=${2:-1000}
FORMAT=${3:-parquet}
LIMIT=100 # requests per 10 s per location: the API's limit
BIN=$PWD/target/release/contacts-etl
cargo build --release --locked --bin contacts-etl >&2
[ -x /usr/bin/time ] || { echo "agency.sh needs /usr/bin/time (GNU time)" >&2; exit 2; }
STOP_MS=0
EVERY_MS=0
if [ -n "${STEAL:-}" ]; then
  [[ $STEAL =~ ^([0-9]+)/([0-9]+)$ ]] || {
    echo "STEAL=$STEAL: expected STOP_MS/EVERY_MS, such as 50/500" >&2
    exit 2
  }
  STOP_MS=$((10#${BASH_REMATCH[1]}))
  EVERY_MS=$((10#${BASH_REMATCH[2]}))
  if [ "$EVERY_MS" -eq 0 ] || [ $((STOP_MS * 4)) -gt $((EVERY_MS * 3)) ]; then
    echo "STEAL=$STEAL: the stop must be at most 3/4 of the period, such as 50/500" >&2
    exit 2
  fi
  command -v pgrep >/dev/null || { echo "STEAL needs pgrep (procps)" >&2; exit 2; }
fi

WORK=$(mktemp -d)
SIM=""
SAMPLER=""
cleanup() {
  [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null
  [ -n "$SIM" ] && kill "$SIM" 2>/dev/null
  # A run interrupted while its exporter was stopped does not leave it stopped.
  if [ -n "${RUN:-}" ]; then kill -CONT "$RUN" 2>/dev/null || true; fi
  wait 2>/dev/null
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

LOCS=()
for i in $(seq 0 $((L - 1))); do LOCS+=("$(printf 'agencyLocation%06d' "$i")"); done
SIM_ARGS=()
for l in "${LOCS[@]}"; do SIM_ARGS+=(--location "$l"); done
# shellcheck disable=SC2206 # SIM_EXTRA is a list of options to split
SIM_ARGS+=(${SIM_EXTRA:-})

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" --quiet sim --host 127.0.0.1 --port "$PORT" --contacts "$N" "${SIM_ARGS[@]}" \
  --rate-limit "$LIMIT/10s" --seed 42 2>"$WORK/sim.log" &
SIM=$!
until curl -sf "http://127.0.0.1:$PORT/_sim/stats" >/dev/null; do
  kill -0 "$SIM" 2>/dev/null || { cat "$WORK/sim.log" >&2; exit 1; }
  sleep 0.2
done

# The pipeline file: one [[locations]] entry per location, each with its own token variable.
P="$WORK/agency.toml"
{
  echo 'name = "agency"'
  echo '[api]'
  echo "rate_limit = \"$LIMIT/10s\""
  echo 'concurrency = 4'
  echo "max_concurrency = $((L * 4))"
  echo "parallel_locations = $L"
  for i in "${!LOCS[@]}"; do
    printf '[[locations]]\nid = "%s"\ntoken_env = "HL_TOKEN_%d"\n' "${LOCS[$i]}" "$i"
  done
  echo '[export]'
  echo "out = \"$WORK/out\""
  echo "format = \"$FORMAT\""
} >"$P"
for i in "${!LOCS[@]}"; do export "HL_TOKEN_$i=bench-token-$i"; done
export HL_BASE_URL="http://127.0.0.1:$PORT"

# CPU seconds (utime + stime) of a process, from /proc.
cpu_of() { awk '{ print ($14 + $15) / 100 }' "/proc/$1/stat"; }

# Samples the simulator's counters every second: "unix_time requests rate_limited".
(
  while :; do
    s=$(curl -sf "http://127.0.0.1:$PORT/_sim/stats") || break
    r=${s#*\"requests\":}; q=${s#*\"rate_limited\":}
    echo "$(date +%s.%N) ${r%%[,\}]*} ${q%%[,\}]*}"
    sleep 1
  done
) >"$WORK/samples" &
SAMPLER=$!

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
# The host's steal time so far, in clock ticks (the 8th value of the cpu line).
steal_ticks() { awk '/^cpu / { print $9 }' /proc/stat; }
STEAL0=$(steal_ticks)
SIM_CPU0=$(cpu_of "$SIM")
set +e
# shellcheck disable=SC2086 # RUN_PREFIX is a command line to split (perf record -g, strace -f ...)
/usr/bin/time -v -o "$WORK/time" ${RUN_PREFIX:-} "$BIN" --quiet run "$P" 2>"$WORK/run.log" &
TIMED=$!
STOPS=0
RUN=""
if [ -n "${STEAL:-}" ]; then
  ms() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }
  # The exporter itself, not /usr/bin/time or a RUN_PREFIX profiler around it.
  until RUN=$(pgrep -n -f "^$BIN --quiet run "); do
    kill -0 "$TIMED" 2>/dev/null || break
    sleep 0.05
  done
  while kill -0 "$RUN" 2>/dev/null; do
    sleep "$(ms $((EVERY_MS * 3 / 4 - STOP_MS + RANDOM % (EVERY_MS / 2 + 1))))"
    kill -STOP "$RUN" 2>/dev/null || break
    sleep "$(ms "$STOP_MS")"
    kill -CONT "$RUN" 2>/dev/null
    STOPS=$((STOPS + 1))
  done
fi
wait "$TIMED"
CODE=$?
RUN=""
set -e
SIM_CPU1=$(cpu_of "$SIM")
HOST_STEAL_S=$(awk -v a="$STEAL0" -v b="$(steal_ticks)" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", (b - a) / hz }')
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)
SIM_HWM_KB=$(awk '/^VmHWM:/ { print $2 }' "/proc/$SIM/status")
curl -sf "http://127.0.0.1:$PORT/_sim/stats" >"$WORK/stats.json"
kill "$SAMPLER" 2>/dev/null || true
SAMPLER=""
if [ "$CODE" != 0 ]; then
  echo "the pipeline exited $CODE:" >&2
  tail -20 "$WORK/run.log" >&2
fi

python3 - "$WORK" "$L" "$N" "$LIMIT" "$FORMAT" "$CODE" "$SIM_CPU0" "$SIM_CPU1" "$SIM_HWM_KB" "$LOAD0" "$LOAD1" "$HOST_STEAL_S" "${STEAL:-}" "$STOPS" <<'EOF'
import json, re, statistics, sys

work, L, N, limit, fmt, code = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
sim_cpu = float(sys.argv[8]) - float(sys.argv[7])
sim_hwm_mb = int(sys.argv[9]) / 1024
per_s = limit / 10

# /usr/bin/time -v of the exporter.
t = open(f"{work}/time").read()
def field(name):
    return re.search(re.escape(name) + r":\s*(.+)", t).group(1).strip()
user, sys_ = float(field("User time (seconds)")), float(field("System time (seconds)"))
wall_parts = [float(x) for x in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")]
wall = 0.0
for x in wall_parts:
    wall = wall * 60 + x
rss_mb = int(field("Maximum resident set size (kbytes)")) / 1024

report = json.load(open(f"{work}/out/_pipeline_report.json"))
locs = report["locations"]
stats = json.load(open(f"{work}/stats.json"))

# Per location: requests the server accepted (sent less 429s) over the location's busy time
# (durationSecs: from its start in the pipeline to its report, final write included).
shares, busy, reqs, r429 = [], [], 0, 0
for r in locs:
    q = r["requests"]
    accepted = q["attempts"] - q["rateLimited"]
    shares.append(accepted / (r["durationSecs"] * per_s))
    busy.append(r["durationSecs"])
    reqs += q["attempts"]
    r429 += q["rateLimited"]
complete = sum(1 for r in locs if r["status"] == "complete")
# The same, as the server saw it: accepted requests over the span from the location's first
# request to its last (n requests paced evenly fill n - 1 gaps). This leaves out the
# location's start-up and final write, so it measures the pacing alone; the goal is the
# share above, over the location's whole run.
served = stats.get("by_location", {})
paced = [(t["accepted"] - 1) / (t["span_secs"] * per_s)
         for l, t in served.items() if l and t["span_secs"] > 0]
contacts = sum(r["rows"].get("contacts", 0) for r in locs)

# Steady state, from the per-second samples of the simulator's counters: the busiest
# stretch's median requests/s between the first 10 s and the last location's end.
samples = [tuple(map(float, l.split())) for l in open(f"{work}/samples") if l.strip()]
rates = []
for (t0, r0, _), (t1, r1, _) in zip(samples, samples[1:]):
    if t1 > t0:
        rates.append((t1 - samples[0][0], (r1 - r0) / (t1 - t0)))
med_busy = statistics.median(busy)
steady = [r for at, r in rates if 10 <= at <= med_busy - 5]
steady_rate = statistics.median(steady) if steady else float("nan")

cores = (user + sys_) / wall
print(f"\nAgency scale: {L} locations x {N} contacts, {fmt}, {limit}/10s per location "
      f"({L * per_s:.0f} requests/s together); pipeline exit code {code}, "
      f"{complete} of {L} locations complete, {contacts} contacts; load average "
      f"{sys.argv[10]} before, {sys.argv[11]} after (other processes share the cores); host steal time "
      f"{sys.argv[12]} s (all CPUs)"
      + (f"; exporter stopped {sys.argv[14]} times (STEAL={sys.argv[13]} ms)" if sys.argv[13] else "") + "\n")
print("| locations | contacts per location | wall s | requests | steady requests/s (server) | exporter CPU s | exporter cores | peak RSS MB | peak RSS MB per location | sim CPU s | sim cores | sim peak RSS MB | 429s (client) | 429s (server) | busiest 10 s of a location | share of limit min / median / max | paced share (server) min / median / max |")
print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|")
pq = f"{min(paced):.1%} / {statistics.median(paced):.1%} / {max(paced):.1%}" if paced else "—"
print(f"| {L} | {N} | {wall:.1f} | {reqs} | {steady_rate:.0f} | {user + sys_:.1f} | {cores:.2f} | {rss_mb:.1f} | "
      f"{rss_mb / L:.2f} | {sim_cpu:.1f} | {sim_cpu / wall:.2f} | {sim_hwm_mb:.1f} | {r429} | {stats['rate_limited']} | "
      f"{stats['max_in_window']} | {min(shares):.1%} / {statistics.median(shares):.1%} / {max(shares):.1%} | {pq} |")
print(f"\nexporter CPU: user {user:.1f} s, system {sys_:.1f} s; busy time per location: "
      f"min {min(busy):.1f} s, median {med_busy:.1f} s, max {max(busy):.1f} s; "
      f"server requests {stats['requests']}, daily-quota 429s {stats['quota_exceeded']}")
# Where each location's run went beyond its requests' pacing: before its first request and
# after its last (start-up, final writes), from the run's and the server's times.
overhead = [r["durationSecs"] - served[r["locationId"]]["span_secs"]
            for r in locs if r["locationId"] in served]
if overhead:
    print(f"run time outside the first-to-last request span per location: min {min(overhead):.1f} s, "
          f"median {statistics.median(overhead):.1f} s, max {max(overhead):.1f} s")
print(f"whole pipeline: {reqs - r429} requests accepted in {wall:.1f} s, "
      f"{(reqs - r429) / (wall * L * per_s):.1%} of {L} locations' limits over the run's wall time")
worst = sorted(zip(shares, (r["locationId"] for r in locs)))[:3]
print("lowest shares: " + ", ".join(f"{l} {s:.1%}" for s, l in worst))

goals = [
    ("exporter under one core", cores < 1.0, f"{cores:.2f} cores"),
    ("exporter under 500 MB", rss_mb < 500, f"{rss_mb:.1f} MB peak RSS"),
    ("no 429s", r429 == 0 and stats["rate_limited"] == 0, f"{r429} client, {stats['rate_limited']} server"),
    ("each location at 97% of its limit or more", min(shares) >= 0.97, f"lowest {min(shares):.1%}"),
    ("every location complete", complete == L and code == 0, f"{complete} of {L}, exit {code}"),
]
print("\nGoals:")
for name, ok, what in goals:
    print(f"- {name}: {what}: {'met' if ok else 'NOT met'}")
EOF
