#!/usr/bin/env bash
# Weak mobile networks: a release `tern serve` in one network namespace, `tern-loadgen` in
# another, the link between them shaped like a phone's (docs/operations.md, "Weak
# networks"). The run passes when the load generator's exactly-once verification does.
#
# Profiles (each direction of the link gets the same treatment):
#   lossy   300 ms ± 100 ms delay, 5 % loss
#   slow    1 Mbit/s, 40 ms delay, 2 % loss, 25 % of packets reordered (sent undelayed)
#   outage  20 ms delay; the link goes down --outage-at seconds into the run for
#           --outage-seconds, then comes back
#   ci      lossy, plus a 5 s outage: one short run for .ci/run
#
# The link is a veth pair shaped with `tc netem` when the kernel has sch_netem, otherwise
# two TUN devices joined by tools/netem/shaper.py, which applies the same profile in user
# space (--link picks one). An outage (--outage-mode) is either `down`: the client's
# interface goes administratively down, so its connects fail at once (a phone whose radio
# is off); or `blackhole`: every packet is dropped both ways and neither side hears of it
# (a phone in a tunnel).
#
# Everything it creates is named after its pid (namespaces tern-netem-PID-node and
# tern-netem-PID-client, interfaces inside them) and removed on every exit path; the
# leftovers of an earlier run that was killed before it could clean up are removed first.
# The loadgen run is bounded by `timeout`, so the script always stops by itself.
#
# usage: tools/netem/run.sh PROFILE [--clients N] [--window W | --rate R] [--duration S]
#          [--heartbeat S] [--outage-at S] [--outage-seconds S] [--outage-mode down|blackhole]
#          [--link auto|netem|tun] [--seed N] [--report FILE] [--html FILE]
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=${1:-}
[ -n "$profile" ] && shift || { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
clients=200 window=1 rate="" duration=40 heartbeat=30 seed=1 link=auto
outage_at="" outage_seconds="" outage_mode=down report="" html=""
case "$profile" in
  lossy)  delay=300 jitter=100 loss=5 rate_kbit=0 reorder=0 ;;
  slow)   delay=40 jitter=0 loss=2 rate_kbit=1000 reorder=25 ;;
  outage) delay=20 jitter=0 loss=0 rate_kbit=0 reorder=0 outage_at=10 outage_seconds=20 ;;
  ci)     delay=300 jitter=100 loss=5 rate_kbit=0 reorder=0 outage_at=6 outage_seconds=5
          clients=50 duration=16 ;;
  *) echo "unknown profile $profile (lossy, slow, outage, ci)" >&2; exit 2 ;;
esac
while [ $# -gt 0 ]; do
  case "$1" in
    --clients) clients=$2; shift 2 ;;
    --window) window=$2; rate=""; shift 2 ;;
    --rate) rate=$2; window=""; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --heartbeat) heartbeat=$2; shift 2 ;;
    --outage-at) outage_at=$2; shift 2 ;;
    --outage-seconds) outage_seconds=$2; shift 2 ;;
    --outage-mode) outage_mode=$2; shift 2 ;;
    --link) link=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --report) report=$2; shift 2 ;;
    --html) html=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$outage_mode" in down|blackhole) ;; *) echo "--outage-mode is down or blackhole" >&2; exit 2 ;; esac
if [ -n "$outage_at" ] && [ -z "$outage_seconds" ]; then outage_seconds=20; fi
[ "$(id -u)" = 0 ] || { echo "tools/netem needs root (network namespaces)" >&2; exit 2; }
command -v ip >/dev/null && command -v tc >/dev/null \
  || { echo "tools/netem needs iproute2 (ip, tc)" >&2; exit 2; }

target=${CARGO_TARGET_DIR:-target}
tern=$target/release/tern
loadgen=$target/release/tern-loadgen
[ -x "$tern" ] && [ -x "$loadgen" ] || cargo build --release -p tern -p tern-loadgen

# Leftovers of runs whose script is gone (SIGKILL, power cut): their processes, then
# their namespaces, which take the interfaces inside them along.
for ns in $(ip netns list | awk '{print $1}' | grep '^tern-netem-[0-9]*-' || true); do
  owner=${ns#tern-netem-}; owner=${owner%%-*}
  [ "$owner" != $$ ] && kill -0 "$owner" 2>/dev/null && continue
  for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  ip netns del "$ns" 2>/dev/null || true
done

ns_node=tern-netem-$$-node ns_client=tern-netem-$$-client
dev_node=tnn$$ dev_client=tnc$$
addr_node=10.213.0.1 addr_client=10.213.0.2
base=$(mktemp -d "${TMPDIR:-/tmp}/tern-netem.XXXXXX")
node_pid="" shaper_pid="" loadgen_pid=""

stop_pid() { # pid [seconds]: TERM, then KILL if it outlives the wait
  local pid=$1 tries=$(( ${2:-5} * 10 ))
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  while [ "$tries" -gt 0 ] && kill -0 "$pid" 2>/dev/null; do sleep 0.1; tries=$((tries - 1)); done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  set +e
  stop_pid "$loadgen_pid" 2
  stop_pid "$node_pid" 10
  stop_pid "$shaper_pid" 2
  ip netns del "$ns_client" 2>/dev/null
  ip netns del "$ns_node" 2>/dev/null
  rm -rf "$base"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ip netns add "$ns_node"
ip netns add "$ns_client"
ip -n "$ns_node" link set lo up
ip -n "$ns_client" link set lo up

if [ "$link" = auto ]; then
  # sch_netem may be missing from the kernel (some cloud and microVM kernels).
  if ip netns exec "$ns_node" tc qdisc add dev lo root netem delay 1ms 2>/dev/null; then
    ip netns exec "$ns_node" tc qdisc del dev lo root
    link=netem
  else
    link=tun
  fi
fi

# netem arguments of the profile; `loss 100%` is the blackhole.
netem_args() {
  local args="limit 1000"
  [ "$delay" != 0 ] && args+=" delay ${delay}ms"
  [ "$jitter" != 0 ] && args+=" ${jitter}ms"
  [ "$loss" != 0 ] && args+=" loss ${loss}%"
  [ "$reorder" != 0 ] && args+=" reorder ${reorder}%"
  [ "$rate_kbit" != 0 ] && args+=" rate ${rate_kbit}kbit"
  echo "$args"
}

case "$link" in
  netem)
    ip link add "$dev_node" netns "$ns_node" type veth peer name "$dev_client" netns "$ns_client"
    ip -n "$ns_node" addr add "$addr_node/24" dev "$dev_node"
    ip -n "$ns_client" addr add "$addr_client/24" dev "$dev_client"
    ip -n "$ns_node" link set "$dev_node" up
    ip -n "$ns_client" link set "$dev_client" up
    # shellcheck disable=SC2046
    ip netns exec "$ns_node" tc qdisc add dev "$dev_node" root netem $(netem_args)
    # shellcheck disable=SC2046
    ip netns exec "$ns_client" tc qdisc add dev "$dev_client" root netem $(netem_args)
    ;;
  tun)
    ip -n "$ns_node" tuntap add dev "$dev_node" mode tun
    ip -n "$ns_client" tuntap add dev "$dev_client" mode tun
    ip -n "$ns_node" addr add "$addr_node" peer "$addr_client" dev "$dev_node"
    ip -n "$ns_client" addr add "$addr_client" peer "$addr_node" dev "$dev_client"
    ip -n "$ns_node" link set "$dev_node" up
    ip -n "$ns_client" link set "$dev_client" up
    python3 tools/netem/shaper.py --ns-a "$ns_node" --dev-a "$dev_node" \
      --ns-b "$ns_client" --dev-b "$dev_client" --delay-ms "$delay" --jitter-ms "$jitter" \
      --loss "$(awk -v p="$loss" 'BEGIN {print p / 100}')" --rate-kbit "$rate_kbit" \
      --reorder "$(awk -v p="$reorder" 'BEGIN {print p / 100}')" --seed "$seed" \
      >"$base/shaper.out" 2>&1 &
    shaper_pid=$!
    for _ in $(seq 1 50); do grep -qs "shaper ready" "$base/shaper.out" && break; sleep 0.1; done
    grep -q 'shaper ready' "$base/shaper.out" || { cat "$base/shaper.out" >&2; exit 1; }
    ;;
  *) echo "--link is auto, netem or tun" >&2; exit 2 ;;
esac

# What the load generator runs (as `LINK down` and `LINK up`) for the outage.
cat >"$base/link" <<EOF
#!/usr/bin/env bash
set -eu
case "$outage_mode/$link/\$1" in
  down/*/down) ip -n $ns_client link set $dev_client down ;;
  down/*/up) ip -n $ns_client link set $dev_client up ;;
  blackhole/tun/down) kill -USR1 $shaper_pid ;;
  blackhole/tun/up) kill -USR2 $shaper_pid ;;
  blackhole/netem/down)
    ip netns exec $ns_node tc qdisc change dev $dev_node root netem loss 100%
    ip netns exec $ns_client tc qdisc change dev $dev_client root netem loss 100% ;;
  blackhole/netem/up)
    ip netns exec $ns_node tc qdisc change dev $dev_node root netem $(netem_args)
    ip netns exec $ns_client tc qdisc change dev $dev_client root netem $(netem_args) ;;
esac
EOF
chmod +x "$base/link"

data="$base/data"
mkdir -p "$data"
mkfifo "$base/ready"
heartbeat_ms=$(awk -v s="$heartbeat" 'BEGIN {printf "%d", s * 1000}')
ip netns exec "$ns_node" "$tern" serve --data "$data" --listen "$addr_node:0" \
  --durability fsync --heartbeat-ms "$heartbeat_ms" >"$base/ready" 2>"$base/node.err" &
node_pid=$!
ready=""
read -r -t 30 ready <"$base/ready" || true
[ -n "$ready" ] || { echo "node did not start:" >&2; cat "$base/node.err" >&2; exit 1; }
server=$(echo "$ready" | awk '{print $4}')
cat "$base/ready" >"$base/node.out" &

load=(--server "$server" --data "$data" --node-pid "$node_pid" --clients "$clients"
      --duration "$duration" --heartbeat "$heartbeat" --seed "$seed" --quiet
      --report "${report:-$base/report.json}")
if [ -n "$window" ]; then load+=(--window "$window"); else load+=(--rate "$rate"); fi
[ -n "$html" ] && load+=(--html "$html")
if [ -n "$outage_at" ]; then
  load+=(--outage-at "$outage_at" --outage-seconds "$outage_seconds" --outage-cmd "$base/link")
fi
echo "netem: profile $profile over $link (delay ${delay}±${jitter} ms, loss $loss %," \
  "rate ${rate_kbit} kbit/s, reorder $reorder %${outage_at:+, $outage_mode outage of \
${outage_seconds} s at ${outage_at} s}), $clients clients, node $server"
# The drain and the final sync may take up to 60 s each on top of the run.
status=0
ip netns exec "$ns_client" timeout -k 5 "$(awk -v d="$duration" 'BEGIN {print int(d + 180)}')" \
  "$loadgen" "${load[@]}" &
loadgen_pid=$!
wait "$loadgen_pid" || status=$?
loadgen_pid=""
[ "$link" = tun ] && { stop_pid "$shaper_pid" 2; shaper_pid=""; grep '^shaper ' "$base/shaper.out"; }
python3 - "${report:-$base/report.json}" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
m, o = r["messages"], r.get("outage")
print(f"netem: acked {m['acked']} ({m['acked_per_second']:.1f}/s) lost {m['lost']} "
      f"duplicated {m['duplicated']} out of order {m['out_of_order']} | "
      f"connects {r['events']['connects']} logins {r['events']['logins']} | "
      f"ack p50/p99 {r['latency_ms']['ack']['p50']:.0f}/{r['latency_ms']['ack']['p99']:.0f} ms")
if o:
    print(f"netem: outage {o['down_at_s']:.1f}..{o['up_at_s']:.1f} s: converged "
          f"{o['converged_seconds']} s after link-up, last device back after "
          f"{o['reconnected_seconds']} s; {o['devices_reconnected']} devices reconnected "
          f"with {o['connect_attempts']} attempts (per device max "
          f"{o['connect_attempts_per_device_max']}), peak {o['connect_attempts_peak']} "
          f"in one second; per second {o['connect_attempts_per_second']}")
PY
exit "$status"
