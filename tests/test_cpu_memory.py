"""Freed memory kept for the next tensor (`trainers.cpu_memory`): page faults of a re-allocation, the opt-out, and
the `efficientvlm` script turning it on. Each measurement runs in a fresh process: the setting is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trainers.commands
from trainers import cpu_memory

ROOT = Path(__file__).resolve().parents[1]

# Allocates, fills and frees a 64 MiB tensor (above glibc's largest dynamic mmap threshold) 16 times, as a forward
# does call after call, and counts the minor page faults of the last 4 (glibc's aligned allocations settle on
# reusing the freed block after a few rounds).
_REALLOCATION = """
import json, resource, sys, torch
from trainers.cpu_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": sum(faults[-4:]) // 4}))
"""


def _reallocation(mode: str, **env: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", _REALLOCATION, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, **env},
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_kept_freed_memory_serves_the_next_tensor_without_page_faults() -> None:
    pages = 64 * 2**20 // 4096
    default = _reallocation("default")
    kept = _reallocation("keep")
    assert not default["kept"] and default["faults"] > pages // 2  # fresh pages from the kernel, every time
    assert kept["kept"] and kept["faults"] < pages // 20
    opted_out = _reallocation("keep", **{cpu_memory.OPT_OUT_VARIABLE: "0"})
    assert not opted_out["kept"] and opted_out["faults"] > pages // 2


def test_the_efficientvlm_script_keeps_freed_memory_before_running_a_command(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(trainers.commands, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(trainers.commands, "main", lambda: calls.append("main") or 0)
    assert trainers.commands.console() == 0
    assert calls == ["keep", "main"]


def test_a_misspelt_opt_out_is_an_error_naming_the_variable(monkeypatch) -> None:
    monkeypatch.setenv(cpu_memory.OPT_OUT_VARIABLE, "nope")
    with pytest.raises(ValueError, match="EFFICIENTVLM_KEEP_FREED_MEMORY='nope'"):
        cpu_memory.keep_freed_memory()
