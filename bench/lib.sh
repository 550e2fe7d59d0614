# bench/lib.sh - shared by bench/run and bench/profile. Sourced, not run.
#
# Loopback only: every server started here binds 127.0.0.1 and every load generator
# targets 127.0.0.1. Every process started here is recorded by PID and stopped by PID
# on exit (trap EXIT); every load run is bounded by a request count or a duration and
# additionally by `timeout`.

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../scripts/common.sh
source "$BENCH/../scripts/common.sh"   # REPO, VENV, say, as_root, apt_install, ensure_venv

HOST=127.0.0.1
PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin   # nutcracker lives in /usr/sbin
export LC_ALL=C

# redisp reads REDISP_* from the environment and ./conf.yaml: neither may leak into a run.
# REDISP_ARGS (extra redisp options, a knob of the scripts) survives, unexported.
_args=${REDISP_ARGS:-}
for _v in ${!REDISP_@}; do unset "$_v"; done
REDISP_ARGS=$_args
unset _v _args

log() { echo "# $*" >&2; }
die() { echo "bench: ERROR: $*" >&2; exit 1; }

# ---------------------------------------------------------------- tools

# ensure_tools CMD...: install the Debian package of every missing command (as root)
ensure_tools() {
  local -A pkg=(
    [redis-server]=redis-server [redis-cli]=redis-tools [redis-benchmark]=redis-tools
    [nutcracker]=nutcracker [webdis]=webdis [wrk]=wrk [taskset]=util-linux [curl]=curl
    [ss]=iproute2 [timeout]=coreutils [awk]=gawk
  )
  local missing=() t p
  for t in "$@"; do
    command -v "$t" >/dev/null && continue
    p=${pkg[$t]:-$t}
    [[ " ${missing[*]} " == *" $p "* ]] || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  log "installing Debian packages: ${missing[*]}"
  apt_install "${missing[@]}" || die "could not install ${missing[*]} (needs apt-get as root)"
  for t in "$@"; do command -v "$t" >/dev/null || die "'$t' still missing after installing ${missing[*]}"; done
}

# ensure_redisp: a venv with redisp whose twistd plugin loads (reinstalled when redisp.core._lru,
# the cache's C table, or redisp.protocol._resp, the parser's, is not built yet: the rows measure them)
ensure_redisp() {
  if ! [[ -x "$VENV/bin/twistd" ]] || ! "$VENV/bin/python" -c 'import redisp, twisted, redisp.core._lru, redisp.protocol._resp, redis' 2>/dev/null; then
    ensure_venv bench
  fi
  local out
  out=$(cd "$TMP" && "$VENV/bin/twistd" -n --pidfile= redisp --help 2>&1) \
    || die "'twistd -n --pidfile= redisp --help' fails, redisp cannot start:"$'\n'"$(tail -5 <<<"$out")"
}

# ---------------------------------------------------------------- processes

TMP=$(mktemp -d "${TMPDIR:-/tmp}/redisp-bench.XXXXXX")
PIDS=()           # every process started here, in start order
declare -A PID_OF # name -> pid
declare -A LOG_OF # name -> log file

# stop every process started here (by PID, newest first), waiting up to 10 s each
stop_all() {
  local i p
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[i]}" 2>/dev/null || true; done
  for p in ${PIDS[@]+"${PIDS[@]}"}; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PIDS=()
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_all
  if [[ -n "${KEEP_TMP:-}" ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# pinning: servers on SRV_CPU, load generators on LOAD_CPU
setup_pinning() {
  PIN=${PIN:-1}; SRV_CPU=${SRV_CPU:-1}; LOAD_CPU=${LOAD_CPU:-0}
  if [[ "$PIN" == 1 ]] && (($(nproc) < 2)); then
    log "WARNING: only $(nproc) cpu: PIN=1 needs two, running unpinned"; PIN=0
  fi
  if [[ "$PIN" == 1 ]]; then SRV=(taskset -c "$SRV_CPU"); LOAD=(taskset -c "$LOAD_CPU")
  else SRV=(); LOAD=(); fi
}

declare -A USED_PORTS
port_busy() { [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]; }
# a port nothing listens on, below the ephemeral range so no outgoing connection takes it
free_port() {
  local p
  for _ in $(seq 500); do
    p=$((15000 + RANDOM % 17000))
    [[ -z "${USED_PORTS[$p]:-}" ]] && ! port_busy "$p" && { USED_PORTS[$p]=1; echo "$p"; return; }
  done
  die "no free port found"
}

# spawn NAME DIR CMD...: start CMD (pinned to the server cpu) in DIR, log to $TMP/NAME.log
spawn() {
  local name=$1 dir=$2; shift 2
  LOG_OF[$name]=$TMP/$name.log
  ( cd "$dir" && exec "${SRV[@]}" "$@" ) >"${LOG_OF[$name]}" 2>&1 &
  PIDS+=($!); PID_OF[$name]=$!
}

# alive NAME: dies with the tail of its log when the process has exited
alive() {
  kill -0 "${PID_OF[$1]}" 2>/dev/null && return 0
  local rc=0; wait "${PID_OF[$1]}" 2>/dev/null || rc=$?
  die "$1 (pid ${PID_OF[$1]}) exited with status $rc; last lines of its log:"$'\n'"$(tail -20 "${LOG_OF[$1]}")"
}

# wait_port NAME PORT: bounded polling (WAIT_S seconds) until PORT listens; NAME must stay alive
wait_port() {
  local i
  for ((i = 0; i < ${WAIT_S:-20} * 20; i++)); do
    port_busy "$2" && return 0
    alive "$1"
    sleep 0.05
  done
  die "$1: nothing listening on $HOST:$2 after ${WAIT_S:-20}s; log:"$'\n'"$(tail -20 "${LOG_OF[$1]}")"
}

rcli() { timeout 60 redis-cli -h "$HOST" "$@"; }

# start_redis: a private redis-server on a free port -> RP
start_redis() {
  RP=$(free_port)
  spawn redis "$TMP" redis-server --port "$RP" --bind "$HOST" --save '' --appendonly no \
    --daemonize no --protected-mode yes --dir "$TMP" --logfile "$TMP/redis-server.log"
  wait_port redis "$RP"
  log "redis-server pid ${PID_OF[redis]} on $HOST:$RP"
}

declare -A RESP_PORT HTTP_PORT
# start_redisp NAME [redisp options...]: twistd -n redisp on two free loopback ports, run from an
# empty directory (no ./conf.yaml), with a clean environment (no REDISP_*)
start_redisp() {
  local name=$1; shift
  local dir="$TMP/$name.d"; mkdir -p "$dir"
  RESP_PORT[$name]=$(free_port); HTTP_PORT[$name]=$(free_port)
  # as scripts/run and the Dockerfile run it: glibc returns large freed tables to the system
  spawn "$name" "$dir" env MALLOC_MMAP_THRESHOLD_=131072 "$VENV/bin/twistd" -n --pidfile= redisp \
    --http "tcp:${HTTP_PORT[$name]}:interface=$HOST" --resp "tcp:${RESP_PORT[$name]}:interface=$HOST" \
    --redis "redis://$HOST:$RP/0" "$@"
  wait_port "$name" "${RESP_PORT[$name]}"
  wait_port "$name" "${HTTP_PORT[$name]}"
  log "$name pid ${PID_OF[$name]}: resp $HOST:${RESP_PORT[$name]} http $HOST:${HTTP_PORT[$name]} ($*)"
}

# metric NAME PORT [LABEL-FILTER-REGEX]: sum of a metric's samples from redisp's /metrics
metric() {
  curl -sf --max-time 10 "http://$HOST:$2/metrics" \
    | awk -v m="$1" -v f="${3:-}" '$1 == m || index($1, m "{") == 1 {
        if (f == "" || $1 ~ f) s += $2 } END { printf "%.0f\n", s }'
}

# tls_certs: a throwaway CA and server certificate (SAN 127.0.0.1 and localhost) made in
# $TMP/certs by tests/tls_support.py -> CA, SSL_OPTS (what an ssl: endpoint string needs) and
# TLS_ARGS (what redis-cli and redis-benchmark need)
tls_certs() {
  "$VENV/bin/python" -c 'import cryptography' 2>/dev/null || "$VENV/bin/python" -m pip install -q cryptography
  (cd "$REPO" && "$VENV/bin/python" -c 'import sys; from pathlib import Path
from tests.tls_support import make_tls_files
make_tls_files(Path(sys.argv[1]))' "$TMP/certs") || die "could not make the test certificates"
  CA=$TMP/certs/ca.pem
  SSL_OPTS="certKey=$TMP/certs/server.pem:privateKey=$TMP/certs/server.key"
  TLS_ARGS=(--tls --cacert "$CA")
}

# buffered_tls_path: a directory -> BUFFERED_TLS whose sitecustomize.py makes sending.unbuffer a
# no-op: a redisp started with it as PYTHONPATH keeps Twisted's buffering TLS transport on its
# RESP door (what redisp did before), for an A/B in one run
buffered_tls_path() {
  BUFFERED_TLS=$TMP/buffered-tls; mkdir -p "$BUFFERED_TLS"
  cat >"$BUFFERED_TLS/sitecustomize.py" <<'PY'
import redisp.protocol.sending  # before doors.resp imports the name: its TLS stays buffered
redisp.protocol.sending.unbuffer = lambda transport: None
PY
}

# rss_kib PID: resident set size in KiB from /proc/PID/status
rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

# quiet: other workloads may share these cores. Before a measurement wait (<= QUIET_WAIT s)
# until the whole machine's busy% over 1 s is <= QUIET_BUSY_MAX; BUSY holds what was seen.
busy_pct() {
  local a b t=0 i
  read -ra a < /proc/stat; sleep 1; read -ra b < /proc/stat
  for i in 1 2 3 4 5 6 7 8; do t=$((t + b[i] - a[i])); done
  echo $((100 * (t - (b[4] - a[4]) - (b[5] - a[5])) / (t > 0 ? t : 1)))
}
quiet() {
  if [[ "${QUIET:-1}" == 0 ]]; then BUSY=na; return 0; fi
  local end=$((SECONDS + ${QUIET_WAIT:-60}))
  while BUSY=$(busy_pct); ((BUSY > ${QUIET_BUSY_MAX:-25} && SECONDS < end)); do :; done
  ((BUSY <= ${QUIET_BUSY_MAX:-25})) || log "WARNING: machine still ${BUSY}% busy before measuring"
  return 0
}

# rb PORT PIPE N [ARGS...]: one bounded redis-benchmark run from the load cpu -> RPS.
# Any error reply, connection error or time-out stops the whole run (redis-benchmark 7
# exits non-zero on an error reply).
rb() {
  local port=$1 pipe=$2 n=$3; shift 3
  local out
  out=$(timeout -k 5 "${RB_TIMEOUT:-600}" "${LOAD[@]}" redis-benchmark -h "$HOST" -p "$port" \
        -n "$n" -c "${C:-50}" -P "$pipe" --csv "$@" 2>"$TMP/rb.err") \
    || die "redis-benchmark -p $port -P $pipe -n $n $* failed (status $?):"$'\n'"$(grep -v 'Could not fetch server CONFIG' "$TMP/rb.err" | tail -5)"
  RPS=$(tail -1 <<<"$out" | cut -d, -f2 | tr -d '"')
  [[ "$RPS" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "redis-benchmark printed no rate: $out"
}

# wk URL: one bounded wrk run from the load cpu -> RPS; non-2xx answers or socket errors
# stop the whole run
wk() {
  local out non2xx errs
  out=$(timeout -k 5 "${WRK_TIMEOUT:-120}" "${LOAD[@]}" wrk -t"${WRK_T:-1}" -c"${WRK_C:-50}" \
        -d"${WRK_D:-8s}" "$1" 2>&1) || die "wrk $1 failed (status $?):"$'\n'"$out"
  RPS=$(awk '/^Requests\/sec:/{print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx or 3xx responses:/{print $NF}' <<<"$out")
  errs=$(grep 'Socket errors' <<<"$out" || true)
  [[ "$RPS" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "wrk printed no rate:"$'\n'"$out"
  [[ -z "$non2xx" || "$non2xx" == 0 ]] || die "wrk $1: $non2xx non-2xx answers:"$'\n'"$out"
  [[ -z "$errs" ]] || die "wrk $1: $errs"$'\n'"$out"
}
