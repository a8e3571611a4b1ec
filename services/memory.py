"""The gateway's memory after large messages: hand freed memory back to the system.

glibc's malloc keeps what a process frees for reuse. A gateway that has parsed a few 8 MB
requests (gRPC's buffers, protobuf's, numpy's) on several threads keeps hundreds of MiB it no
longer uses: each thread allocates from its own arena (up to eight per core), every
allocation under the *dynamic* mmap threshold (it rises to 32 MiB once a large block is freed)
comes from those arenas' heaps, and a heap only shrinks from its top. A 10,000-request fuzz
run (tests/fuzz) took the gateway from 221 to 593 MiB for good, 215 MiB of it in malloc's
arena heaps.

:func:`tune_allocator` sets what ``MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=1048576
MALLOC_TRIM_THRESHOLD_=1048576`` would, from inside the process, so that every way of starting
the gateway (``deepserve serve``, ``serve run``, KubeRay, the tests) gets it: few arenas,
blocks of 1 MiB and more in their own mappings (returned whole on free), and heaps trimmed
once 1 MiB is free at their top. A daemon thread also calls ``malloc_trim(0)`` now and then,
which returns the free pages inside the heaps too. Elsewhere than glibc (musl, macOS) it does
nothing. With it, the same run leaves 222 -> 419 MiB, as the environment variables do (393).

What it cannot return is memory an allocator above malloc keeps: ONNX Runtime's CPU arena
keeps the regions its largest batch needed (most of what the fuzz run still leaves) until a
run asks it to shrink.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
import time

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h) and the values set.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
SETTINGS = {  # parameter -> (environment variable that sets it instead, value)
    M_ARENA_MAX: ("MALLOC_ARENA_MAX", 2),
    M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", 1 << 20),
    M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", 1 << 20),
}
TRIM_EVERY_S = 10.0  # malloc_trim walks every arena under its lock: a few ms, rarely

_started = False


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator(trim_every_s: float | None = TRIM_EVERY_S) -> bool:
    """Make this process give freed memory back (see the module's docstring). Idempotent.

    A parameter whose ``MALLOC_*`` environment variable is set is left to it: an operator's
    explicit choice wins.

    Args:
        trim_every_s: how often a daemon thread calls ``malloc_trim(0)``; None: never.

    Returns:
        Whether glibc's allocator was found (False: nothing was done).
    """
    global _started
    libc = _glibc()
    if libc is None:
        return False
    for parameter, (variable, value) in SETTINGS.items():
        if variable not in os.environ and libc.mallopt(parameter, value) != 1:
            log.warning("mallopt(%d, %d) failed; %s stays glibc's default", parameter, value, variable)
    if trim_every_s is not None and not _started:
        _started = True
        threading.Thread(target=_trim_forever, args=(libc, trim_every_s), name="malloc-trim", daemon=True).start()
    return True


def _trim_forever(libc: ctypes.CDLL, every_s: float) -> None:
    while True:  # a daemon thread: it ends with the process
        time.sleep(every_s)
        libc.malloc_trim(0)  # ctypes lets go of the GIL meanwhile
