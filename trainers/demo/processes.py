"""Running the demo's task pipelines at once, one forked process each.

The demo's models are small enough that a training step is mostly per-operation overhead: on 2 cores a step with 2
torch threads was only 1.35-1.5x faster than with 1. The pipelines of the tasks (fine-tune the teacher, fine-tune
and prune the student, evaluate) do not depend on one another, so running them side by side, one thread each, uses
the cores better than running them one after another with all of them.

One thread each, always: a process forked after its parent has run OpenMP threads (torch's intra-op pool) hangs
the first time it asks for more than one (GNU OpenMP does not survive fork), and the demo pre-trains with all cores
before it forks.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch


def can_fork() -> bool:
    """Whether jobs can run in forked processes: fork keeps the parent's models and data without pickling them, and
    is safe only where it is the platform's own default (Linux)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def run_in_processes(
    jobs: dict[str, Callable[[], Any]],
    log_dir: Path | None = None,
    max_running: int | None = None,
    niceness: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Runs every job of `jobs` (name -> callable) in its own forked process with 1 torch thread, at most
    `max_running` at once (default: all), and returns what each returned (pickled back to this process), by name in
    the order of `jobs`. `niceness` (name -> increment >= 0, default 0) lowers a job's CPU priority: where more
    processes run than there are cores, the others then leave a core to the jobs that keep theirs.

    With `log_dir`, a process writes its standard output and error (progress bars, logged losses) to
    `log_dir/<name>.log`; [`console`] still reaches this process's terminal. A job that raises is re-raised here as
    a `RuntimeError` naming it, with its traceback; a process that dies without an answer (killed, out of memory)
    is an error naming its exit code. Either way the other processes are stopped first."""
    context = multiprocessing.get_context("fork")
    niceness = dict(niceness or {})
    bad = {name: n for name, n in niceness.items() if name not in jobs or n < 0}
    if bad:
        raise ValueError(f"`niceness` must name jobs of `jobs` with increments >= 0; got {bad}.")
    waiting = list(jobs.items())
    running: dict[Connection, tuple[str, Any]] = {}
    results: dict[str, Any] = {}
    try:
        while waiting or running:
            while waiting and len(running) < (max_running or len(jobs)):
                name, job = waiting.pop(0)
                receiver, sender = context.Pipe(duplex=False)
                log = None if log_dir is None else Path(log_dir) / f"{name}.log"
                process = context.Process(
                    target=_child, args=(job, sender, log, niceness.get(name, 0)), name=f"job-{name}"
                )
                process.start()
                sender.close()  # the child holds the only writing end, so its death reads as end of file here
                running[receiver] = (name, process)
            for receiver in wait(list(running)):
                name, process = running.pop(receiver)
                try:
                    status, payload = pickle.loads(receiver.recv_bytes())
                except EOFError:
                    process.join()
                    raise RuntimeError(
                        f"The {name} process ended with exit code {process.exitcode} before returning its result "
                        "(killed, or out of memory?)."
                    ) from None
                process.join()
                if status != "ok":
                    raise RuntimeError(f"The {name} process failed:\n{payload}")
                results[name] = payload
        return {name: results[name] for name in jobs}
    finally:
        for _, process in running.values():
            process.terminate()
            process.join()


_CONSOLE = None  # in a job's process: the terminal, which its standard streams no longer reach


def console():
    """Where progress lines go: the terminal, also from a job whose output goes to its log file."""
    return _CONSOLE or sys.stdout


def _child(job: Callable[[], Any], sender: Connection, log: Path | None, niceness: int = 0) -> None:
    global _CONSOLE
    torch.set_num_threads(1)  # more would hang (the module's docstring)
    if niceness:
        os.nice(niceness)
    if log is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        _CONSOLE = os.fdopen(os.dup(1), "w", buffering=1)
        handle = open(log, "w", buffering=1)  # noqa: SIM115 (stays open for the process's life)
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        sys.stdout = sys.stderr = handle  # also where pytest or a notebook had replaced the streams
    try:
        # Plain pickle copies tensors into the message: torch's multiprocessing pickler would share their memory
        # through this process, which is gone by the time the parent reads them. Pickled whole before anything is
        # written, so a result that cannot be pickled is reported as a failure.
        message = pickle.dumps(("ok", job()))
    except BaseException:  # noqa: BLE001 (every failure goes to the parent, which raises it)
        message = pickle.dumps(("error", traceback.format_exc()))
    sender.send_bytes(message)
    sender.close()


__all__ = ["can_fork", "console", "run_in_processes"]
