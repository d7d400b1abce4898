#!/usr/bin/env bash
# Requests and client CPU per 10,000 contacts, per listing and children strategy, for a full
# export and for an incremental run after 1% of the contacts changed (BENCHMARKS.md,
# "Request economy"). Usage: benches/economy.sh [CONTACTS]   (default 100000)
#
# The simulator runs in its own process on loopback without a rate limit; each export reads
# its request counts and its own CPU seconds from its manifest. "today's" rows are the
# strategies of the previous release: GET /contacts/ and one request per contact and child.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
BIN=target/release/contacts-etl
LOC=benchLocation0000001
cargo build --release --locked --bin contacts-etl >&2
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" --quiet sim --host 127.0.0.1 --port "$PORT" --contacts "$N" --location "$LOC" \
  --rate-limit off --daily-quota 0 --seed 42 2>/dev/null &
SIM=$!
WORK=$(mktemp -d)
trap 'kill $SIM 2>/dev/null; rm -rf "$WORK"' EXIT
until curl -sf "http://127.0.0.1:$PORT/_sim/stats" >/dev/null; do sleep 0.2; done
export HL_TOKEN=bench HL_BASE_URL="http://127.0.0.1:$PORT"

# export NAME FLAGS...: one export into $WORK/NAME-<n>, its manifest's figures on stdout.
run() {
  local name=$1; shift
  local out="$WORK/$name-$RANDOM"
  "$BIN" --quiet export --location "$LOC" --out "$out" --rate-limit off --concurrency 16 "$@"
  python3 - "$out/_manifest.json" "$N" "$name" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1])); n = int(sys.argv[2])
r = m["requests"]; per = 10_000 / n
print(f"| {sys.argv[3]} | {m.get('runKind','')} | {m.get('contactsListed',0)} | {r['attempts']} | "
      f"{r['attempts']/n:.3f} | {r['attempts']*per:.0f} | {m['resources']['cpuSeconds']*per:.3f} |")
EOF
}

echo "| scenario | run | contacts listed | requests | requests per contact | requests per 10k contacts | client CPU s per 10k contacts |"
echo "|---|---|--:|--:|--:|--:|--:|"
run "full, today's (GET, children per contact)" --listing get --children-by contact
run "full, search, children per contact" --listing search --children-by contact
run "full, search, tasks and appointments location-wide" --listing search --children-by location
# Incremental: each strategy's first night, then 1% of contacts edited and 10 deleted, then
# each strategy's second night.
S1="$WORK/state-today"; S2="$WORK/state-new"
run "incremental night 1, today's" --incremental --state-dir "$S1" --listing get --children-by contact >/dev/null
run "incremental night 1, new" --incremental --state-dir "$S2" --listing search --children-by location >/dev/null
curl -sf -X POST "http://127.0.0.1:$PORT/_sim/mutate/1/10/7" >&2; echo >&2
run "incremental after 1% changed, today's (GET walk, children per contact)" --incremental --state-dir "$S1" --listing get --children-by contact
run "incremental after 1% changed, search filtered, location-wide" --incremental --state-dir "$S2" --listing search --children-by location
