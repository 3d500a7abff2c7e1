"""Peak memory of one model running one workload, measured in a fresh process.

torch's CPU allocator keeps no statistics and `tracemalloc` does not see its buffers, so the honest figure is
the process's resident-set high-water mark (`VmHWM` in `/proc/self/status`) in a process that does nothing
else: after the imports, after building the model and its inputs, and after running the workload. It includes
the Python interpreter and the libraries (the first figure), and the allocator's cached blocks.
(`getrusage`'s `ru_maxrss` would not do: Linux carries the parent's high-water mark over fork and exec.)

    python -m trainers.benchmark.memory '{"source": {...}, "workload": "itm", "shape": {...}, "threads": 2}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainers.cpu_memory import freed_memory_kept, keep_freed_memory

from .models import ModelSource
from .workloads import WorkloadShape

ROOT = Path(__file__).resolve().parents[2]


def _status_mb(field: str) -> float:
    """`VmHWM` (peak resident set size since the last reset) or `VmRSS` (now) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"No {field} in /proc/self/status: peak memory is measured on Linux only.")


def _max_rss_mb() -> float:
    return _status_mb("VmHWM")


def _reset_peak() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so the next peak is the workload's alone and not the build's
    (a pruned copy is built at full size first)."""
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the figure is the peak since the start: an upper bound


def peak_memory(
    source: ModelSource, workload: str, shape: WorkloadShape, threads: int, dtype: str = "float32"
) -> dict[str, float]:
    """`{"imports_mb", "loaded_mb", "peak_mb"}` of a fresh process (MiB) that builds the model with `dtype` weights:
    its peak RSS after the imports, its RSS once the model and inputs are built, and its peak RSS while the
    workload runs twice (the peak is reset after the build, so building a pruned copy at full size first does not
    count)."""
    request = {
        "source": source.to_dict(),
        "workload": workload,
        "shape": asdict(shape),
        "threads": threads,
        "dtype": dtype,
        "keep_freed_memory": freed_memory_kept(),  # the fresh process allocates as this one does
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "trainers.benchmark.memory", json.dumps(request)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"Measuring the memory of {source.spec} ({workload}) failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _measure(request: dict[str, Any]) -> dict[str, float]:
    import torch

    from trainers.placement import DTYPES

    from .models import BenchmarkModel
    from .workloads import build_workloads

    if request["keep_freed_memory"]:
        keep_freed_memory()
    torch.set_num_threads(request["threads"])
    imports = _max_rss_mb()
    source = ModelSource(**request["source"])
    entry = BenchmarkModel(source.spec, _kind(source.spec), source)
    entry.place("cpu", DTYPES[request["dtype"]])
    workloads = build_workloads(entry, request["workload"], WorkloadShape(**request["shape"]))
    _reset_peak()
    loaded = _status_mb("VmRSS")
    with torch.no_grad():
        for workload in workloads.values():
            for _ in range(2):
                workload()
    return {"imports_mb": imports, "loaded_mb": loaded, "peak_mb": _max_rss_mb()}


def _kind(spec: str) -> str:
    from .models import PEERS, _peer_kind

    return _peer_kind(spec) if spec in PEERS else "efficientvlm"


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
