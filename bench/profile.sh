#!/bin/sh
# py-spy profile of meterproxy (strict durability, /small) under closed-loop wrk load.
# usage: bench/profile.sh [SECONDS] [MP_CMD]   -> /tmp/meterproxy-profile.{txt,svg}
set -eu
cd "$(dirname "$0")/.."
SECS=${1:-10}
MP=${2:-".venv/bin/python -m proxy"}
W=$(mktemp -d)
trap 'kill $OPID $PPID_ 2>/dev/null || true' EXIT
# meterproxy's ports go in its config: free a moment ago (another process may take one
# first, and then its start fails); the origin listens on port 0 and says which it got
PPORT=$(.venv/bin/python -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
APORT=$(.venv/bin/python -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
taskset -c 0 .venv/bin/python bench/origin.py 0 > "$W/origin.out" & OPID=$!
OPORT=
while [ -z "$OPORT" ]; do
  kill -0 $OPID || { echo "bench/origin.py did not start" >&2; exit 1; }
  sleep 0.05
  OPORT=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$W/origin.out" | head -n 1)
done
.venv/bin/python -c "import bench.run as r; open('$W/rules.yaml','w').write(r.RULES)" 2>/dev/null \
  || .venv/bin/python -c "import sys; sys.path.insert(0,'bench'); import run; open('$W/rules.yaml','w').write(run.RULES)"
$MP customers create bench --db "$W/m.db" >/dev/null
KEY=$($MP keys create --customer bench --db "$W/m.db" | .venv/bin/python -c 'import json,sys;print(json.load(sys.stdin)["key"])')
cat > "$W/c.yaml" <<EOC
{"listen": "127.0.0.1:$PPORT", "admin_listen": "127.0.0.1:$APORT",
 "upstream": {"url": "http://127.0.0.1:$OPORT"}, "rules": "$W/rules.yaml",
 "storage": {"path": "$W/m.db", "durability": "strict", "commit_interval": "10ms"},
 "admin": {"token": "bench-admin-token"}, "stripe": {"sink": "dry_run", "flush_interval": "1h"},
 "log_level": "warning"}
EOC
taskset -c 1 $MP serve --config "$W/c.yaml" & PPID_=$!
until curl -s -o /dev/null "http://127.0.0.1:$PPORT/small"; do
  kill -0 $PPID_ || { echo "meterproxy did not start (a port taken meanwhile?)" >&2; exit 1; }
  sleep 0.1
done
taskset -c 0 wrk -t1 -c32 -d$((SECS + 4))s -H "Authorization: Bearer $KEY" "http://127.0.0.1:$PPORT/small" > "$W/wrk.txt" &
sleep 2
.venv/bin/py-spy record --pid "$PPID_" --duration "$SECS" --rate 250 --format raw -o /tmp/meterproxy-profile.txt --nonblocking >/dev/null 2>&1
.venv/bin/py-spy record --pid "$PPID_" --duration 3 --rate 250 -o /tmp/meterproxy-profile.svg --nonblocking >/dev/null 2>&1 || true
wait %3 2>/dev/null || sleep 5
cat "$W/wrk.txt" | grep -E "Requests/sec|requests in"
echo "raw collapsed stacks: /tmp/meterproxy-profile.txt; flame graph: /tmp/meterproxy-profile.svg"
