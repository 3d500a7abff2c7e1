"""Where inference runs and in which dtype: the `--device` / `--dtype` flags of `efficientvlm evaluate` and
`efficientvlm benchmark`, checked once with errors that name the flag."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_placement(device: str = "auto", dtype: str = "float32") -> tuple[torch.device, torch.dtype]:
    """`(torch.device, torch.dtype)` of a device name (`auto`: the GPU if torch sees one, else the CPU; `cpu`,
    `cuda`, `cuda:N`) and a dtype name (float32, bfloat16, float16).

    bfloat16 runs on CPUs too (fast where the CPU has bfloat16 matmul units, such as Intel AMX); float16 only on
    CUDA, whose kernels for it the CPU lacks or runs slowly."""
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r} (--dtype); choose from {', '.join(DTYPES)}.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        place = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"Unknown device {device!r} (--device): {error}") from None
    if place.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N; got {device!r}.")
    if place.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device!r}: torch {torch.__version__} sees no CUDA device (a CPU-only build, or no GPU)."
        )
    if place.type == "cpu" and dtype == "float16":
        raise ValueError("--dtype float16 runs on CUDA only (CPU kernels for it are slow or missing): use bfloat16.")
    return place, DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """The name [`DTYPES`] gives `dtype` ("float32", ...)."""
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"{dtype} is none of {', '.join(DTYPES)}.")


__all__ = ["DTYPES", "dtype_name", "resolve_placement"]
