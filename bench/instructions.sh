#!/bin/bash
# Deterministic cost per request: CPU instructions counted by valgrind (callgrind), which do
# not drift with the noisy neighbours that make wall-clock figures on shared VMs swing +-30%.
# For each target: run it under callgrind, send 200 then (in a second run) 800 requests from
# 16 concurrent clients, and report (I(800) - I(200)) / 600 = instructions per request, which
# cancels start-up and shutdown. Needs valgrind (apt-get install -y valgrind).
# nginx (proxy_pass, one process, keep-alive upstream pool; bench/nginx_conf.py) is the
# reference an operator would otherwise deploy; its count is native code, not Python.
# usage: bench/instructions.sh [TARGET...]  -> a table on stdout (~4 minutes for all)
#        TARGETS: bare (always first: the ratios' base) nginx free strict batched
#                 core (bench/core_proxy.py: aiohttp web.Server + the proxy.upstream pool, unmetered)
#                 floor (bench/server_floor.py: the same web.Server answering by itself, no upstream)
#                 fleet (strict, storage.backend postgres on a fresh database at $PGBASE,
#                        default postgresql://postgres@127.0.0.1:5432; the key made through the
#                        admin API by bench/fleet_key.py; needs psql)
# PAYLOAD=small (default: 216-byte JSON) | 64k (65,536-byte body) | sse (20-event
# text/event-stream; the metered targets read its tokens: rule `sse`, preset openai_chat,
# plus api_calls) picks the origin path every request asks for (bench/origin.py).
# BARE=N skips measuring the bare proxy and takes N as its figure (quick steps; a figure to
# publish comes from a run that measures it).
# N2=N: the second run sends N requests instead of 800 (per request: (I(N) - I(200)) / (N - 200));
#        the start-up's own count varies by a few million instructions between runs of the same
#        code (~+-8k per request over 600 requests), so a longer second run divides that noise
# KEEP=DIR (or CG_KEEP=DIR) keeps each run's callgrind output as DIR/<target>-<n>.out (for
#        callgrind_annotate; `bench/cg_diff.py DIR free strict` lists the instructions per
#        request by function, and what the second target costs over the first)
# Every process runs with address-space randomization off (setarch -R) and PYTHONHASHSEED=0:
# CPython 3.11's method cache is indexed by a type's version tag XOR the attribute name's
# address, so with randomized addresses two hot lookups collided in some runs and not in
# others (the same code measured 420,630 and 439,813 for strict: ~30 extra cache misses per
# request walking a long MRO). CG_RANDOM=1 keeps the randomization (as the code runs in
# production); a figure then needs several runs.
set -u
if [ "${CG_RANDOM:-0}" = 1 ]; then NORAND=; else NORAND="setarch -R"; export PYTHONHASHSEED=0; fi
cd "$(dirname "$0")/.."
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
cat > "$W/free.yaml" <<'EOR'
version: 1
meters: {api_calls: {stripe_event_name: api_calls}}
rules:
  - {name: free, match: {path: "/**"}, auth: none}
EOR
cat > "$W/metered.yaml" <<'EOR'
version: 1
meters: {api_calls: {stripe_event_name: api_calls}, llm_tokens: {stripe_event_name: llm_tokens}}
rules:
  - name: sse
    match: {path: /sse}
    usage: [{meter: llm_tokens, preset: openai_chat}, {meter: api_calls, quantity: 1}]
  - {name: all, match: {path: "/**"}, usage: [{meter: api_calls, quantity: 1}]}
EOR
# a port for a server that needs it in its config (meterproxy, nginx): free a moment ago, so
# another process may take it first; that run then fails (FAILED, never a wrong figure)
port() { .venv/bin/python -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
# the port a bench server started on port 0 bound: it prints "listening on 127.0.0.1:<port>"
# to FILE once it listens (no pick-then-bind race); waits up to CG_WAIT seconds (valgrind)
announced() { # FILE PID
  local end=$(( $(date +%s) + ${CG_WAIT:-3600} )) p
  while [ "$(date +%s)" -le $end ]; do
    p=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$1" 2>/dev/null | head -n 1)
    [ -n "$p" ] && { echo "$p"; return 0; }
    kill -0 "$2" 2>/dev/null || break
    sleep 0.05
  done
  echo "no 'listening on' line in $1" >&2; echo 0; return 1
}
run() { # target n -> instructions
  local target=$1 n=$2 OP PP AP KEY M O
  PP=$(port); AP=$(port)
  .venv/bin/python bench/origin.py 0 >"$W/origin.out" 2>&1 & O=$!
  OP=$(announced "$W/origin.out" $O)
  if [ "$target" = nginx ]; then
    KEY=none
    NG=$(.venv/bin/python bench/nginx_conf.py "$W/nginx" "$PP" "$OP")
    $NORAND valgrind --tool=callgrind --callgrind-out-file="$W/cg.out" "$NGINX" -e stderr -p "$W/nginx" \
      -c "$NG" >/dev/null 2>"$W/cg.err" & M=$!
  elif [ "$target" = bare ] || [ "$target" = core ] || [ "$target" = floor ]; then
    KEY=none
    script=bench/bare_proxy.py
    [ "$target" = core ] && script=bench/core_proxy.py
    [ "$target" = floor ] && script=bench/server_floor.py
    $NORAND valgrind --tool=callgrind --callgrind-out-file="$W/cg.out" .venv/bin/python "$script" \
      0 "http://127.0.0.1:$OP" >"$W/m.out" 2>"$W/cg.err" & M=$!
    PP=$(announced "$W/m.out" $M)
  elif [ "$target" = fleet ]; then
    DB=mp_instr_$$_$n
    psql "$PGBASE/postgres" -qc "CREATE DATABASE $DB" >/dev/null
    rm -f "$W"/f.db*
    cat > "$W/c.yaml" <<EOC
{"listen": "127.0.0.1:$PP", "admin_listen": "127.0.0.1:$AP", "upstream": {"url": "http://127.0.0.1:$OP"},
 "rules": "$W/metered.yaml", "storage": {"path": "$W/f.db", "durability": "strict", "backend": "postgres",
 "dsn": "$PGBASE/$DB"}, "fleet": {"member_id": "bench"},
 "admin": {"token": "bench-admin-token"}, "stripe": {"sink": "dry_run", "flush_interval": "1h"}, "log_level": "error"}
EOC
    $NORAND valgrind --tool=callgrind --callgrind-out-file="$W/cg.out" .venv/bin/python -m proxy serve \
      --config "$W/c.yaml" >/dev/null 2>"$W/cg.err" & M=$!
    KEY=$(.venv/bin/python bench/fleet_key.py "http://127.0.0.1:$AP" bench-admin-token)
  else
    rules=$W/metered.yaml; dur=strict
    [ "$target" = free ] && rules=$W/free.yaml
    [ "$target" = batched ] && dur=batched
    rm -f "$W"/m.db*
    .venv/bin/meterproxy customers create bench --db "$W/m.db" >/dev/null
    KEY=$(.venv/bin/meterproxy keys create --customer bench --db "$W/m.db" | .venv/bin/python -c 'import json,sys;print(json.load(sys.stdin)["key"])')
    cat > "$W/c.yaml" <<EOC
{"listen": "127.0.0.1:$PP", "admin_listen": "127.0.0.1:$AP", "upstream": {"url": "http://127.0.0.1:$OP"},
 "rules": "$rules", "storage": {"path": "$W/m.db", "durability": "$dur"},
 "admin": {"token": "bench-admin-token"}, "stripe": {"sink": "dry_run", "flush_interval": "1h"}, "log_level": "error"}
EOC
    $NORAND valgrind --tool=callgrind --callgrind-out-file="$W/cg.out" .venv/bin/python -m proxy serve \
      --config "$W/c.yaml" >/dev/null 2>"$W/cg.err" & M=$!
  fi
  local ok=1
  .venv/bin/python bench/cg_client.py "http://127.0.0.1:$PP/$PAYLOAD" "$n" "$KEY" 2>/dev/null || ok=0
  kill -0 $M 2>/dev/null || ok=0          # the proxy must still be running: it did all the work
  kill -TERM $M 2>/dev/null; wait $M 2>/dev/null; kill $O 2>/dev/null; wait $O 2>/dev/null
  [ "$target" = fleet ] && psql "$PGBASE/postgres" -qc "DROP DATABASE $DB WITH (FORCE)" >/dev/null
  KEEP=${KEEP:-${CG_KEEP:-}}
  [ -n "$KEEP" ] && mkdir -p "$KEEP" && cp "$W/cg.out" "$KEEP/$target-$n.out"
  if [ $ok = 1 ]; then grep -o "Collected : [0-9]*" "$W/cg.err" | awk '{print $3}'; else echo FAILED; fi
}
PAYLOAD=${PAYLOAD:-small}
N2=${N2:-800}   # the second run's requests (the first sends 200)
case "$PAYLOAD" in small|64k|sse) ;; *) echo "PAYLOAD must be small, 64k or sse" >&2; exit 2;; esac
echo "| target | instructions per request (/$PAYLOAD) | vs bare |"
echo "| --- | --- | --- |"
base=""
declare -A res
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
PGBASE=${PGBASE:-postgresql://postgres@127.0.0.1:5432}
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(nginx free strict batched)
if [ -n "${BARE:-}" ]; then   # a bare figure from an earlier run of this machine: not measured again
  base=$BARE; res[bare]=$BARE; echo "| bare (given: BARE=$BARE) | $BARE | 1.00x |"
fi
for t in bare "${targets[@]}"; do
  [ "$t" = bare ] && [ -n "$base" ] && continue
  if [ "$t" = nginx ] && [ ! -x "$NGINX" ]; then
    echo "| nginx | not installed (apt-get install -y nginx-light) | |"; continue
  fi
  a=$(run $t 200); b=$(run $t "$N2")
  if [ "$a" = FAILED ] || [ "$b" = FAILED ] || [ -z "$a" ] || [ -z "$b" ]; then
    # a client error or a proxy that died: no figure rather than a wrong one
    echo "| $t | FAILED (200: ${a:-none}, $N2: ${b:-none}) | |"; continue
  fi
  per=$(( (b - a) / (N2 - 200) ))
  [ -z "$base" ] && base=$per
  res[$t]=$per
  echo "| $t | $per | $(python3 -c "print(f'{$per/$base:.2f}x')") |"
done
if [ -n "${res[nginx]:-}" ]; then
  echo
  for t in "${targets[@]}"; do
    [ "$t" = nginx ] || echo "$t vs nginx: $(python3 -c "print(f'{${res[$t]}/${res[nginx]}:.2f}x')")"
  done
fi
