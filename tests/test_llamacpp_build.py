"""Which runtime a llama-server was built for, from the binary itself: a static CUDA, ROCm or Vulkan build has no
ggml backend library beside it, only the runtime's libraries in its ELF's DT_NEEDED list. Built here with the
machine's C compiler: real ELF files that link stand-in runtime libraries of the real names."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hal0.hardware.placement import Placement, launch_env
from hal0.providers.llamacpp import LlamaCppProvider, build_kind_of, find_llama_server, needed_libraries


@pytest.fixture(scope="module")
def cc() -> str:
    found = shutil.which("cc") or shutil.which("gcc")
    if found is None:
        pytest.skip("no C compiler to build ELF files")
    return found


def _linked(cc: str, root: Path, runtime: str | None) -> Path:
    """A `bin/llama-server` executable that links `runtime` (a stand-in shared library by that soname)."""
    (root / "bin").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "main.c").write_text("int runtime_call(void);\nint main(void) { return %s; }\n"
                                 % ("runtime_call()" if runtime else "0"))
    link = []
    if runtime:
        (root / "rt.c").write_text("int runtime_call(void) { return 0; }\n")
        subprocess.run([cc, "-shared", "-fPIC", f"-Wl,-soname,{runtime}", "-o", str(root / "lib" / runtime),
                        str(root / "rt.c")], check=True)
        link = [f"-L{root / 'lib'}", f"-l:{runtime}"]
    binary = root / "bin" / "llama-server"
    subprocess.run([cc, "-o", str(binary), str(root / "main.c"), *link], check=True)
    return binary


@pytest.mark.parametrize(("runtime", "kind", "hidden"), [
    ("libcudart.so.13", "cuda", {"CUDA_VISIBLE_DEVICES": ""}),
    ("libcublas.so.12", "cuda", {"CUDA_VISIBLE_DEVICES": ""}),
    ("libamdhip64.so.6", "rocm", {"HIP_VISIBLE_DEVICES": ""}),
    ("libvulkan.so.1", "vulkan", {"GGML_VK_VISIBLE_DEVICES": ""}),
    (None, "cpu", {})])
def test_a_static_build_is_known_by_the_runtime_it_links(cc: str, tmp_path: Path, runtime: str | None,
                                                         kind: str, hidden: dict[str, str]) -> None:
    binary = _linked(cc, tmp_path, runtime)
    assert (runtime in needed_libraries(binary)) if runtime else "libc.so.6" in needed_libraries(binary)
    assert build_kind_of(binary) == kind
    provider = LlamaCppProvider(str(binary))
    assert provider.build_kind() == kind
    # What it changes: a cpu slot of a GPU build is hidden from every GPU.
    assert launch_env(provider.build_kind(), Placement((), 0, explicit=True)) == hidden


def test_what_is_not_an_elf_binary_is_a_cpu_build(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "llama-server"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\nexec llama-server-real \"$@\"\n")
    assert needed_libraries(script) == () and build_kind_of(script) == "cpu"
    truncated = tmp_path / "truncated"
    truncated.write_bytes(b"\x7fELF\x02\x01" + b"\0" * 20)
    assert needed_libraries(truncated) == () and needed_libraries(tmp_path / "absent") == ()


def test_the_installed_llama_server_is_read_too() -> None:
    binary = find_llama_server("")
    assert "libc.so.6" in needed_libraries(binary)
    assert build_kind_of(binary) in {"cpu", "cuda", "rocm", "vulkan"}
