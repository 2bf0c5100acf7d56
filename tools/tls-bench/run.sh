#!/bin/sh
# TLS against plain TCP, same node settings, alternating runs: idle RSS per connection,
# node CPU per heartbeat, and the reconnect storm (docs/architecture.md, TLS).
#
#   tools/tls-bench/run.sh [CLIENTS] [REPEATS]
#
# Each run: tern-loadgen --spawn, CLIENTS clients logging in with tokens, pinging every
# 10 s, no messages; at 25 s every client is dropped at once (--storm-at) and reconnects
# (TLS clients resume with the ticket from their first connection); the run ends at 40 s.
# Clients come from 40 loopback addresses, as phones come from many: from one address the
# node's bound on waiting connections per address (SHARD_UNAUTHENTICATED_PER_ADDRESS_MAX)
# refuses most of a storm, and every refused TLS attempt spends one of the device's tickets.
# Needs a release build: cargo build --release -p tern -p tern-loadgen.
set -eu
clients=${1:-5000}
repeats=${2:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release
out=$(mktemp -d)
"$bin/tern" cert generate --out "$out/certs" --name 127.0.0.1 >/dev/null
for round in $(seq 1 "$repeats"); do
  for transport in tcp tls; do
    tls_args=""
    if [ "$transport" = tls ]; then
      tls_args="--ca $out/certs/ca.pem --node-tls-cert $out/certs/server.pem --node-tls-key $out/certs/server.key"
    fi
    # shellcheck disable=SC2086
    "$bin/tern-loadgen" --spawn --tern-bin "$bin/tern" --clients "$clients" --heartbeat 10 \
      --rate 0 --duration 40 --storm-at 25 --durability none --node-shards 2 \
      --source-ips 127.0.0.2-127.0.0.41 --transport "$transport" $tls_args --quiet --report "$out/$transport-$round.json" \
      >/dev/null
    python3 - "$out/$transport-$round.json" "$clients" "$transport" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); n = int(sys.argv[2])
ts = r["timeseries"]
# Idle, all logged in: seconds 12..24 (ramp done, before the storm at 25).
idle = [s for s in ts if 12 <= s["t"] <= 24]
rss = sorted(s["node_rss_bytes"] for s in idle)[len(idle) // 2]
start = r["server"]["rss_bytes"]["start"]
cpu_s = sum(s["node_cpu_pct"] for s in idle) / 100.0
pings = n / 10.0 * len(idle)
storm = r["latency_ms"]["storm"]
print(json.dumps({
    "transport": sys.argv[3],
    "rss_per_conn_bytes": round((rss - start) / n),
    "cpu_per_heartbeat_us": round(cpu_s / pings * 1e6, 1),
    "storm_p50_ms": storm["p50"], "storm_p99_ms": storm["p99"], "storm_max_ms": storm["max"],
    "storm_count": storm["count"],
    "login_p50_ms": r["latency_ms"]["login"]["p50"],
    "tls_full": r["events"]["tls_full_handshakes"],
    "tls_resumed": r["events"]["tls_resumed_handshakes"],
    "failed": r["clients"]["failed"],
}))
PY
  done
done
echo "reports in $out" >&2
