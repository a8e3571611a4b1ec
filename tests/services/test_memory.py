"""deepserve.memory: the gateway hands the memory it freed back to the system (glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"),
]

# A large block freed first (as after a large message: glibc's dynamic mmap threshold rises to
# its size), then 200 MiB in 512 KiB blocks, every page touched, then all freed but every tenth
# block. The kept blocks pin the heap's top, so malloc cannot trim it: unless the blocks had
# their own mappings, or malloc_trim runs, the freed 180 MiB stays resident.
FRAGMENT = """
import ctypes, sys, time
from deepserve.memory import tune_allocator

def rss_mib():
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) >> 10

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
tuned = sys.argv[1] == "tuned" and tune_allocator(trim_every_s=0.2)
libc.free(libc.malloc(8 << 20))
blocks = [libc.malloc(512 << 10) for _ in range(400)]
for block in blocks:
    ctypes.memset(block, 1, 512 << 10)
peak = rss_mib()
for i, block in enumerate(blocks):
    if i % 10:
        libc.free(block)
time.sleep(1.0)
print(tuned, peak, rss_mib())
"""


def _fragment(mode: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", FRAGMENT, mode], capture_output=True, text=True, check=True)
    tuned, peak, after = out.stdout.split()
    return tuned, int(peak), int(after)


def test_freed_memory_goes_back_to_the_system():
    tuned, peak, after = _fragment("tuned")
    assert tuned == "True" and peak >= 200
    assert after <= peak - 150, (peak, after)  # 180 MiB were freed


def test_without_it_freed_memory_stays():
    """The control: the same program, the allocator left as it is."""
    tuned, peak, after = _fragment("plain")
    assert tuned == "False" and after >= peak - 30, (peak, after)


def test_an_operators_malloc_variables_win(monkeypatch):
    from deepserve import memory

    calls = []

    class Libc:
        def mallopt(self, parameter: int, value: int) -> int:
            calls.append(parameter)
            return 1

    monkeypatch.setattr(memory, "_glibc", Libc)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert memory.tune_allocator(trim_every_s=None)
    assert sorted(calls) == sorted([memory.M_MMAP_THRESHOLD, memory.M_TRIM_THRESHOLD])
