"""Freed memory kept in the process for the next tensor (glibc's malloc), as the `efficientvlm` commands run.

glibc's malloc gives a request above its mmap threshold (dynamic, at most 32 MiB by default) pages of its own
mapping and returns them to the kernel when the tensor is freed, and gives the top of its heap back once more than
its trim threshold lies free there. A CPU forward allocates tensors of a few MiB per op, so every call touches fresh
pages and pays a page fault per 4 KiB (about 33,000 per ITM call of `efficientvlm-small` at 384 px, batch 1; a few
percent of its time). Raising both thresholds keeps freed blocks for the next op, as jemalloc and tcmalloc (which
CPU inference guides preload) do by design. The cost: memory freed after a peak stays with the process (its peak is
unchanged) until it exits.

The `efficientvlm` commands call [`keep_freed_memory`] at start (`EFFICIENTVLM_KEEP_FREED_MEMORY=0` leaves glibc's
defaults); a Python process of one's own may call it too.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT_VARIABLE = "EFFICIENTVLM_KEEP_FREED_MEMORY"
# Requests above this still get a mapping of their own (and give it back when freed).
MMAP_THRESHOLD_BYTES = 1 << 30
# Free memory at the top of the heap beyond this is given back to the kernel.
TRIM_THRESHOLD_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>

_SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_kept = False


def keep_freed_memory() -> bool:
    """Raises glibc malloc's mmap and trim thresholds of this process (see the module docstring). Returns whether
    freed memory is now kept: False off Linux, with a C library other than glibc, or when
    `EFFICIENTVLM_KEEP_FREED_MEMORY=0`."""
    global _kept
    if not _opted_in() or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl's `mallopt` does nothing)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _kept = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _kept


def _opted_in() -> bool:
    setting = os.environ.get(OPT_OUT_VARIABLE, "1")
    switch = _SWITCH.get(setting.strip().lower())
    if switch is None:
        raise ValueError(
            f"{OPT_OUT_VARIABLE}={setting!r}: expected 1 (keep freed memory, the default) or 0 (glibc's defaults)."
        )
    return switch


def freed_memory_kept() -> bool:
    """Whether [`keep_freed_memory`] took effect in this process."""
    return _kept
