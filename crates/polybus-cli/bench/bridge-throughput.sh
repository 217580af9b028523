#!/usr/bin/env bash
# Bridge throughput: N events waiting at the source, the bridge started, time until the sink
# acknowledged all N (polybus_bridge_forwarded_total). Usage: bridge_tput.sh BIN N CONCURRENCY
# With SPOOL=1 the routes have delivery = "spool": polybus_bridge_forwarded_total then counts
# events committed to the spool (acked at the source), polybus_compose_forwarded_total those
# the spool forwarded to Kafka; both times are printed.
set -euo pipefail
B=$1; N=${2:-5000}; C=${3:-64}; SPOOL=${SPOOL:-0}
U=$(date +%s%N | tail -c 9)
D=$(mktemp -d)
fwd() { curl -s "http://$1/metrics" | awk '/^polybus_bridge_forwarded_total/{print $2}' | head -1; }
in_kafka() { curl -s "http://$1/metrics" | awk '/^polybus_compose_forwarded_total/{print $2}' | head -1; }
run_bridge() { # config -> sets BP and ADDR
  "$B" bridge --config "$1" 2> "$D/err" & BP=$!
  for _ in $(seq 100); do ADDR=$(sed -n 's/.*http on http:\/\/\([^ ]*\).*/\1/p' "$D/err"); [ -n "$ADDR" ] && break; sleep 0.1; done
}
wait_fwd() { # addr n -> seconds
  local t0; t0=$(date +%s.%N)
  until [ "$(fwd "$1")" = "$2" ]; do sleep 0.05; done
  echo "$(date +%s.%N) - $t0" | bc
}
measure() { # name from topic pubtopic
  cat > "$D/b.toml" <<T
[http]
listen = "127.0.0.1:0"
[[route]]
name = "$1"
from = "$2"
topic = "$3"
to = "kafka://127.0.0.1:9092"
to_topic = "tput-$1-$U"
concurrency = $C
T
  if [ "$SPOOL" = 1 ]; then printf 'delivery = "spool"\nspool_dir = "%s"\n' "$D/spool-$1" >> "$D/b.toml"; fi
  "$B" pub kafka://127.0.0.1:9092 "tput-$1-$U" init -q
  # First run: the subscription (JetStream durable, MQTT persistent session) exists.
  run_bridge "$D/b.toml"; "$B" pub "${2%%\?*}" "$4" warm -q; wait_fwd "$ADDR" 1 > /dev/null
  kill -TERM $BP; wait $BP
  local t0 t1; t0=$(date +%s.%N)
  "$B" pub "${2%%\?*}" "$4" '{"reading":42}' --count "$N" -q
  t1=$(date +%s.%N)
  echo "$1: polybus pub of $N to the source: $(echo "$N / ($t1 - $t0)" | bc) events/s (window 1)"
  local t2 secs; t2=$(date +%s.%N)
  run_bridge "$D/b.toml"
  until [ "$(fwd "$ADDR")" = "$N" ]; do sleep 0.05; done
  secs=$(echo "$(date +%s.%N) - $t2" | bc)
  if [ "$SPOOL" = 1 ]; then
    echo "$1: bridge acked $N at the source (in the spool) in ${secs}s (from start): $(echo "$N / $secs" | bc) events/s, concurrency $C"
    until [ "$(in_kafka "$ADDR")" = "$N" ]; do sleep 0.05; done
    secs=$(echo "$(date +%s.%N) - $t2" | bc)
    echo "$1: spool forwarded $N to Kafka in ${secs}s (from start): $(echo "$N / $secs" | bc) events/s"
  else
    echo "$1: bridge moved $N in ${secs}s (from start): $(echo "$N / $secs" | bc) events/s, concurrency $C"
  fi
  kill -TERM $BP; wait $BP
}
measure mqtt "mqtt://127.0.0.1:1883?client_id=tput-$U&session_expiry=300" "tput/$U/+" "tput/$U/dev1"
measure js "jetstream://127.0.0.1:4222?group=tput$U&ack_wait=5" "tput_js_$U" "tput_js_$U"
