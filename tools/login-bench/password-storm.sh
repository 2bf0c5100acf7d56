#!/bin/bash
# usage: password-storm.sh BIN_DIR LABEL PORT
# Ack latency of 200 loadgen clients (200 msg/s, 20 s) alone, then with 8 loops of
# `tern send` guessing one account's password.
BIN=$1; LABEL=$2; PORT=${3:-7451}
D=$(mktemp -d /tmp/password-storm.XXXX)
$BIN/tern user add victim --password right-password --data $D/data >/dev/null
$BIN/tern serve --data $D/data --listen 127.0.0.1:$PORT --shards 2 > $D/serve.log 2>&1 &
PID=$!
for i in $(seq 100); do grep -q listening $D/serve.log && break; sleep 0.1; done
LG="$BIN/tern-loadgen --server 127.0.0.1:$PORT --data $D/data --node-pid $PID --clients 200 --rate 200 --duration 20"
echo "== $LABEL baseline"; $LG --report $D/base.json --seed 1 2>&1 | grep -E "^ack|^e2e|passed|FAILED|verif" 
touch $D/storm
for i in $(seq 8); do
  ( n=0; while [ -f $D/storm ]; do $BIN/tern send --server 127.0.0.1:$PORT --user victim --password wrong-$i-$n --to victim x >/dev/null 2>>$D/guess.$i; n=$((n+1)); done ) &
done
sleep 2
S0=$(cat $D/guess.* | wc -l)
echo "== $LABEL storm"; $LG --report $D/storm.json --seed 2 --user-prefix s- 2>&1 | grep -E "^ack|^e2e|passed|FAILED|verif"
S1=$(cat $D/guess.* | wc -l)
rm $D/storm; wait $(jobs -p | grep -v "^$PID$") 2>/dev/null
echo "guesses during the storm run: $((S1-S0)); answers over the whole storm:"; cat $D/guess.* | sed 's/retry in [0-9]* ms/retry in N ms/' | sort | uniq -c
kill -TERM $PID; wait $PID
echo "data: $D"
python3 -c "
import json,sys
for f in ['base','storm']:
    r=json.load(open('$D/'+f+'.json'))['latency_ms']['ack']
    print('$LABEL', f, 'ack p50 %.2f ms p99 %.2f ms' % (r['p50'], r['p99']))
"
