#!/bin/sh
# Heartbeat and message cost of both event loops, side by side, on this machine.
#
# Usage: tools/hb-bench/run.sh [CONNS] [BEAT_S] [SHARDS]
#
# For each loop (epoll, uring): a fresh data folder with users hb0..hb3 (idle devices),
# hbs0..hbs7 (senders) and hbr (recipient); `tern serve --io LOOP --heartbeat-ms 10000
# --durability none`; hb-bench against it (see tools/hb-bench/main.rs); SIGTERM. Prints one
# JSON line per loop, then one for hb-floor (the CPU of one pong-sized loopback write, the
# floor under any loop's cost per heartbeat). Durability none keeps fsync latency out of a
# comparison of loops.
set -eu
CONNS=${1:-15000}
BEAT_S=${2:-30}
SHARDS=${3:-2}
PORT=7499
cargo build --release --bin tern --example hb-bench --example hb-floor >&2
TERN=target/release/tern
BENCH=target/release/examples/hb-bench
for io in epoll uring; do
    dir=$(mktemp -d)
    for user in hb0 hb1 hb2 hb3 hbs0 hbs1 hbs2 hbs3 hbs4 hbs5 hbs6 hbs7 hbr; do
        "$TERN" user add "$user" --password pw --data "$dir/data" >/dev/null
    done
    "$TERN" serve --data "$dir/data" --listen "127.0.0.1:$PORT" --io "$io" \
        --shards "$SHARDS" --heartbeat-ms 10000 --durability none \
        >"$dir/stdout" 2>"$dir/stderr" &
    pid=$!
    tries=0
    until grep -q "listening" "$dir/stdout" 2>/dev/null; do
        tries=$((tries + 1))
        if [ "$tries" -gt 200 ]; then
            echo "node did not start: $(cat "$dir/stderr")" >&2
            exit 1
        fi
        sleep 0.05
    done
    "$BENCH" --server "127.0.0.1:$PORT" --pid "$pid" --conns "$CONNS" --beat-s "$BEAT_S" \
        | sed "s/^{/{\"io\":\"$io\",\"shards\":$SHARDS,/"
    kill -TERM "$pid"
    wait "$pid" || true
    rm -rf "$dir"
done
# The floor under both: one pong-sized write on loopback (see tools/hb-bench/floor.rs).
target/release/examples/hb-floor --conns 1000 --rounds 20 | sed 's/^{/{"io":"floor",/'
