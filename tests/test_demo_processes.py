"""The demo's task pipelines in forked processes: results, threads, limits, logs and failures come back intact."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from trainers.demo.processes import can_fork, console, run_in_processes

pytestmark = pytest.mark.skipif(not can_fork(), reason="forked processes are the Linux path")


def test_each_job_runs_in_its_own_process_with_one_thread_and_returns_tensors() -> None:
    def job(scale: int):
        # Several threads here would hang: this process has run torch's OpenMP pool before forking (below).
        return os.getpid(), torch.get_num_threads(), torch.arange(4) * scale, torch.randn(64, 64) @ torch.randn(64, 64)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.randn(512, 512) @ torch.randn(512, 512)  # the parent's OpenMP pool, as the demo's pre-training leaves it
        results = run_in_processes({"b": lambda: job(2), "a": lambda: job(3)})
    finally:
        torch.set_num_threads(threads)
    assert list(results) == ["b", "a"]  # the order of the jobs, not of completion
    pids = {result[0] for result in results.values()}
    assert len(pids) == 2 and os.getpid() not in pids
    assert [result[1] for result in results.values()] == [1, 1]
    assert torch.equal(results["b"][2], torch.tensor([0, 2, 4, 6]))
    assert torch.equal(results["a"][2], torch.tensor([0, 3, 6, 9]))


def test_a_job_runs_at_the_niceness_it_is_given_and_bad_increments_are_errors() -> None:
    base = os.nice(0)
    results = run_in_processes({"long": lambda: os.nice(0), "short": lambda: os.nice(0)}, niceness={"short": 5})
    assert results == {"long": base, "short": min(base + 5, 19)}
    assert os.nice(0) == base  # the parent's own priority is untouched
    with pytest.raises(ValueError, match="'other': 1"):
        run_in_processes({"long": lambda: 0}, niceness={"other": 1})
    with pytest.raises(ValueError, match="'long': -1"):
        run_in_processes({"long": lambda: 0}, niceness={"long": -1})


def test_jobs_run_at_once_up_to_the_limit(tmp_path: Path) -> None:
    def job(name: str, wait_for_others: bool) -> int:
        """The most jobs it saw running at once, itself included."""
        (tmp_path / f"{name}.running").touch()
        seen, deadline = 1, time.monotonic() + 20
        while True:
            seen = max(seen, len(list(tmp_path.glob("*.running"))))
            if not wait_for_others or seen == 3:
                break
            assert time.monotonic() < deadline, "the jobs did not run at once"
            time.sleep(0.01)
        time.sleep(0.05)
        seen = max(seen, len(list(tmp_path.glob("*.running"))))
        (tmp_path / f"{name}.running").unlink()
        return seen

    # Without a limit all three run together (each waits until it sees the three running).
    together = run_in_processes({n: (lambda n=n: job(n, True)) for n in "xyz"})
    assert together == {"x": 3, "y": 3, "z": 3}
    # One at a time, none sees another running.
    alone = run_in_processes({n: (lambda n=n: job(n, False)) for n in "xyz"}, max_running=1)
    assert alone == {"x": 1, "y": 1, "z": 1}


def test_a_failing_job_is_raised_with_its_name_and_traceback_and_stops_the_others(tmp_path: Path) -> None:
    def slow() -> None:
        time.sleep(30)
        (tmp_path / "finished").touch()

    def bad() -> None:
        raise ValueError("record 7 has no caption")

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"The retrieval process failed") as error:
        run_in_processes({"vqa": slow, "retrieval": bad})
    assert "ValueError: record 7 has no caption" in str(error.value) and "in bad" in str(error.value)
    assert time.monotonic() - start < 20  # the slow job was stopped, not waited for
    time.sleep(0.2)
    assert not (tmp_path / "finished").exists()


def test_a_process_that_dies_is_an_error_with_its_exit_code() -> None:
    with pytest.raises(RuntimeError, match=r"The nlvr2 process ended with exit code 3"):
        run_in_processes({"nlvr2": lambda: os._exit(3)})


def test_a_result_that_cannot_be_pickled_is_reported() -> None:
    with pytest.raises(RuntimeError, match=r"The vqa process failed:(.|\n)*pickle"):
        run_in_processes({"vqa": lambda: lambda: None})


def test_job_output_goes_to_its_log_and_progress_lines_to_the_terminal(tmp_path: Path, capfd) -> None:
    def job() -> str:
        print("loss 0.5")
        print("a progress bar", file=sys.stderr)
        print("[demo] vqa: 10/40 steps", file=console(), flush=True)
        return "done"

    assert run_in_processes({"vqa": job}, log_dir=tmp_path) == {"vqa": "done"}
    log = (tmp_path / "vqa.log").read_text()
    assert "loss 0.5" in log and "a progress bar" in log and "10/40 steps" not in log
    out, err = capfd.readouterr()
    assert "[demo] vqa: 10/40 steps" in out and "loss 0.5" not in out + err
