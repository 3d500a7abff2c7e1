"""`--device` / `--dtype` of the inference commands (`evaluate`, `benchmark`)."""

from __future__ import annotations

import pytest
import torch

from trainers.placement import resolve_placement


def test_auto_is_the_gpu_when_torch_sees_one_else_the_cpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_placement() == (torch.device("cpu"), torch.float32)
    assert resolve_placement("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_placement("auto", "float16") == (torch.device("cuda"), torch.float16)
    assert resolve_placement("cuda:1") == (torch.device("cuda", 1), torch.float32)


def test_bad_placements_name_the_flag(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"Unknown dtype 'fp8' \(--dtype\); choose from float32, bfloat16, float16"):
        resolve_placement("cpu", "fp8")
    with pytest.raises(ValueError, match=r"Unknown device 'gpu0' \(--device\)"):
        resolve_placement("gpu0")
    with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N; got 'meta'"):
        resolve_placement("meta")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        resolve_placement("cuda")
    with pytest.raises(ValueError, match="--dtype float16 runs on CUDA only"):
        resolve_placement("auto", "float16")  # auto is the CPU here
