#!/usr/bin/env bash
# Disk cost of the store write path, several node settings side by side in one run.
#
# For each --journal-interval-ms value given, starts a release `tern serve` (fsync) on a
# fresh data folder on the disk that holds $STORE_IO_DIR (default /var/tmp), loads it with
# tern-loadgen (pairs, 100-byte messages, closed loop), and prints one line: acked
# messages/s, the node's /proc/PID/io write_bytes per acked message, the bytes the block
# device wrote per acked message (sectors, after sync; anything else writing to that disk
# meanwhile counts too, so give $STORE_IO_DIR a file system of its own, e.g. a
# loop-mounted image, for a clean count), store growth per message (allocated blocks), and
# the node's CPU per thread. Settings alternate over --repeat rounds so a noisy box hits
# each alike; compare medians.
#
# usage: tools/store-io/run.sh [--clients N] [--window W] [--duration S] [--repeat R]
#                              [--intervals "0 1000"]
set -euo pipefail
cd "$(dirname "$0")/../.."

clients=2000 window=1 duration=20 repeat=1 intervals="0 1000"
while [ $# -gt 0 ]; do
  case "$1" in
    --clients) clients=$2; shift 2 ;;
    --window) window=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    --intervals) intervals=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

tern=${TERN_BIN:-target/release/tern}  # another build to compare: TERN_BIN=path
loadgen=target/release/tern-loadgen
[ -x "$tern" ] && [ -x "$loadgen" ] || cargo build --release -p tern -p tern-loadgen
base=$(mktemp -d "${STORE_IO_DIR:-/var/tmp}/tern-store-io.XXXXXX")
trap 'rm -rf "$base"' EXIT

write_bytes() { awk '/^write_bytes/ {print $2}' "/proc/$1/io"; }

# The block device under $base, and the bytes it has written so far (sectors are 512 B).
dev=$(basename "$(df --output=source "$base" | tail -1)")
device_bytes() { sync; awk '{printf "%.0f\n", $7 * 512}' "/sys/class/block/$dev/stat" 2>/dev/null || echo 0; }

# name=cpu_seconds of every thread of pid $1 (utime+stime), same names summed.
thread_cpu() {
  local tick; tick=$(getconf CLK_TCK)
  for task in /proc/"$1"/task/*; do
    printf '%s %s\n' "$(cat "$task/comm")" "$(awk '{print $14 + $15}' "$task/stat")"
  done | awk -v tick="$tick" '{sum[$1] += $2} END {for (n in sum) printf "%s=%.2f ", n, sum[n] / tick}'
}

for round in $(seq 1 "$repeat"); do
  for interval in $intervals; do
    data="$base/data-$round-$interval"
    mkdir -p "$data"
    fifo="$base/ready"; rm -f "$fifo"; mkfifo "$fifo"
    "$tern" serve --data "$data" --listen 127.0.0.1:0 --durability fsync \
      --journal-interval-ms "$interval" >"$fifo" 2>"$base/node.err" &
    pid=$!
    read -r ready <"$fifo"
    addr=$(echo "$ready" | awk '{print $4}')
    cat "$fifo" >"$base/node.out" &
    report="$base/report-$round-$interval.json"
    before_device=$(device_bytes)
    before_bytes=$(write_bytes "$pid")
    before_store=$(du -s --block-size=1 "$data" | awk '{print $1}')
    "$loadgen" --server "$addr" --data "$data" --node-pid "$pid" --clients "$clients" \
      --window "$window" --pattern pairs --size 100..100 --duration "$duration" \
      --report "$report" --quiet >/dev/null 2>"$base/loadgen.err" || true
    after_bytes=$(write_bytes "$pid")
    threads=$(thread_cpu "$pid")
    kill -USR1 "$pid"
    for _ in $(seq 1 50); do grep -q '^tern stats' "$base/node.out" && break; sleep 0.1; done
    commits=$(grep -o 'store_commits=[0-9]*' "$base/node.out" | tail -1 | cut -d= -f2)
    kill -TERM "$pid"; wait "$pid" || true
    after_device=$(device_bytes)
    after_store=$(du -s --block-size=1 "$data" | awk '{print $1}')
    python3 - "$report" "$interval" "$round" "$before_bytes" "$after_bytes" \
      "$before_store" "$after_store" "$threads" "${commits:-0}" \
      "$before_device" "$after_device" <<'PY'
import json, sys
report, interval, rnd, b0, b1, s0, s1, threads, commits, d0, d1 = sys.argv[1:]
r = json.load(open(report))
m = r["messages"]
acked = max(m["acked"], 1)
print(f"round {rnd} journal-interval-ms {interval:>5}: acked {m['acked']} "
      f"({m['acked_per_second']:.0f}/s) lost {m['lost']} dup {m['duplicated']} | "
      f"write_bytes/msg {(int(b1) - int(b0)) / acked:.0f} B | "
      f"device bytes/msg {(int(d1) - int(d0)) / acked:.0f} B | "
      f"store growth/msg {(int(s1) - int(s0)) / acked:.0f} B | "
      f"e2e p50/p99 {r['latency_ms']['e2e']['p50']:.1f}/{r['latency_ms']['e2e']['p99']:.1f} ms | "
      f"commits {commits} ({acked / max(int(commits), 1):.1f} msg, "
      f"{(int(b1) - int(b0)) / max(int(commits), 1) / 1024:.1f} KiB each) | cpu s: {threads}")
PY
    grep '^tern stats' "$base/node.out" | tail -1 | tr ' ' '\n' | grep '^store_' | tr '\n' ' '; echo
    rm -rf "$data"
  done
done
