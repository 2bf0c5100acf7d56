#!/bin/bash
# usage: preauth-flood.sh BIN_DIR LABEL PORT
# Time of 10 `tern send` (password login + send) from 127.0.0.1 while 15,000 connections
# from 127.0.0.2-61 never log in.
BIN=$1; LABEL=$2; PORT=${3:-7461}
D=$(mktemp -d /tmp/preauth-flood.XXXX)
$BIN/tern user add alice --password pw --data $D/data >/dev/null
$BIN/tern user add bob --password pw --data $D/data >/dev/null
$BIN/tern serve --data $D/data --listen 127.0.0.1:$PORT --shards 2 > $D/serve.log 2>&1 &
PID=$!
for i in $(seq 100); do grep -q listening $D/serve.log && break; sleep 0.1; done
t() { local s=$(date +%s%N); $BIN/tern send --server 127.0.0.1:$PORT --user alice --password pw --to bob "hi" >/dev/null 2>$D/err || echo "failed: $(cat $D/err)"; echo $(( ($(date +%s%N)-s)/1000000 )); }
echo "$LABEL without flood (ms):" $(for i in $(seq 5); do t; done)
python3 "$(dirname "$0")/flood.py" $PORT 15000 2 61 120 > $D/flood.log 2>&1 &
FP=$!
for i in $(seq 20); do sleep 1; o=$(ls /proc/$PID/fd | wc -l); [ $o -gt 8000 ] && break; done; sleep 3
echo "node fds open: $(ls /proc/$PID/fd | wc -l) after ${i}s"
echo "$LABEL during flood (ms):" $(for i in $(seq 10); do t; done)
echo "node fds open: $(ls /proc/$PID/fd | wc -l)"
kill $FP; wait $FP 2>/dev/null; tail -2 $D/flood.log
kill -TERM $PID; wait $PID
rm -rf $D
