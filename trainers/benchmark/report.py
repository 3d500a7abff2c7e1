"""The benchmark's outputs: a Markdown table, JSON and a plot (latency vs batch size; speedup vs FLOPs reduction)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trainers.evaluation.benchmarking import matmul_peak_size

from .suite import (
    PEAK_BESIDE_SECONDS,
    PEAK_TARGETS,
    SPEEDUP_PER_FLOPS_TARGET,
    BenchmarkReport,
    BenchmarkResult,
    compile_call_text,
)


def _target(value: str | None) -> str:
    return value or "—"


def _significant(value: float) -> str:
    """3 significant digits (0.0101, 10.4, 153), whole numbers from 100 on (1234, not 1.23e+03)."""
    return f"{value:.0f}" if abs(value) >= 99.95 else f"{value:.3g}"


def format_report(report: BenchmarkReport) -> str:
    """The Markdown table (one row per workload, setting and model) with the matmul peaks and notes under it."""
    peak_header = "≥ " + "/".join(f"{int(100 * v)}%" for v in sorted(set(PEAK_TARGETS.values()), reverse=True))
    settings = report.settings
    on_cuda = settings.on_cuda
    memory_header = "peak GPU MB (+ in the workload)" if on_cuda else "peak RSS MB (+ in the workload)"
    lines = [
        "| workload | model | batch | image px | threads | params (M) | encoder params (M) | GFLOPs "
        "| median ms [IQR] | speedup | FLOPs reduction | base | speedup / FLOPs cut vs base "
        f"| GFLOP/s | % of matmul peak: best / beside | speed target (≥ {SPEEDUP_PER_FLOPS_TARGET} × FLOPs cut) "
        f"| peak target ({peak_header}) | {memory_header} |",
        "|" + "---|" * 18,
    ]
    for r in report.results:
        memory = "—"
        if r.peak_rss_mb is not None:
            memory = f"{r.peak_rss_mb:.0f} (+{r.peak_rss_mb - r.loaded_rss_mb:.0f})"
        elif r.peak_device_mb is not None:
            memory = f"{r.peak_device_mb:.0f} (+{r.device_workload_mb:.0f})"
        lines.append(
            f"| {r.workload} | {r.name} | {r.batch_size} | {r.image_size} | {r.threads} | {r.parameters / 1e6:.2f} "
            f"| {r.encoder_parameters / 1e6:.2f} | {_significant(r.gflops)} "
            f"| {r.median_ms:.1f} [{r.q1_ms:.1f}–{r.q3_ms:.1f}] "
            f"| {r.speedup:.2f}x | {r.flops_reduction:.2f}x | {r.base} "
            f"| {r.speedup_vs_base:.2f}x / {r.flops_reduction_vs_base:.2f}x | {r.gflops_per_s:.1f} "
            f"| {_peak_fractions(r)} | {_target(r.speed_target)} | {_target(r.peak_target)} | {memory} |"
        )
    size = matmul_peak_size(settings.device)
    first, *others = settings.dtypes
    where = f"on {report.machine.get('gpu', settings.device)}" if on_cuda else "on the CPU"
    precision = report.machine.get("float32_matmul_precision")
    if on_cuda and "float32" in settings.dtypes and precision:
        where += f", float32 matmul precision {precision!r}"
    peak_lines = []
    for dtype in settings.dtypes:
        peaks = ", ".join(
            f"{v:.1f} GFLOP/s" + ("" if on_cuda else f" with {k} thread(s)") for k, v in report.peaks_of(dtype).items()
        )
        peak_lines.append(
            f"{'fp32' if dtype == 'float32' else dtype} matmul peak measured in this run {where} ({size} x {size} "
            f"{_peak_product(dtype, on_cuda, report.machine)}, best of 10 before and after every setting): {peaks}."
        )
    peak_lines.append(
        "% of matmul peak: of that best, and of the peak timed beside the row (the faster product back to back, as "
        f"many FLOPs as the row's call up to about {PEAK_BESIDE_SECONDS:g} s, timed after each of the row's calls in "
        "every round: the median, as the row's); the peak target is judged on the second, a row and its ceiling "
        "timed alike in the same moments."
    )
    mixed = " (the train steps: float32 weights under mixed precision)" if first != "float32" else ""
    lines += [
        "",
        *peak_lines,
        f"The models' weights are {first}{mixed}."
        + "".join(
            f" [{dtype}]: the same model with {dtype} weights, timed in the same rounds; its base is the {first} "
            f"model (so its speedup vs base is what {dtype} buys), its % of the {dtype} peak."
            for dtype in others
        ),
        *(
            [
                f"[compiled]: the same model's workload through {compile_call_text(settings.compile)}, compiled "
                "before the warm-up; its base is the eager model (so its speedup vs base is what compiling buys), its "
                "FLOPs those of the eager call."
            ]
            if settings.compile is not None
            else []
        ),
        *(
            [
                "[packed]: the same model running its attention and FFN products from oneDNN-packed weights "
                "(`model.pack_cpu_weights()`: bias and residual add inside each product, the FFN activation as the "
                "'FFN activations' line says; one more copy of the weights in memory); its base is the model "
                "itself (so its speedup vs base is what packing buys)."
            ]
            if settings.pack_cpu_weights
            else []
        ),
        *(
            [
                "[kernel]: the same model with its attention on the CPU kernel (`attn_implementation="
                '"efficientvlm_cpu"`: whole-row softmax, oneDNN block products; masked attention stays on SDPA); its '
                "base is the model before it (so its speedup vs base is what the kernel buys)."
            ]
            if settings.cpu_attention_kernel
            else []
        ),
        f"Timing: median of {report.settings.rounds} interleaved rounds x {report.settings.repeats} calls per "
        f"model (after {report.settings.warmup} warm-up calls each round); [IQR] = first–third quartile. "
        "Speedup and FLOPs reduction against the first model; peak RSS: high-water resident memory of a fresh "
        "process running the workload at this setting (interpreter, libraries and model included), in brackets "
        "its rise while the workload runs (over the model and inputs built); peak GPU MB: the CUDA allocator's "
        "high-water mark during one call, in brackets what the call allocated over the model and inputs.",
        *([] if on_cuda else [_cpu_memory_line(report.machine), *_cpu_products_lines(report.machine)]),
        *report.notes,
    ]
    return "\n".join(lines)


def _peak_fractions(row: BenchmarkResult) -> str:
    beside = "" if row.peak_beside_fraction is None else f" / {100 * row.peak_beside_fraction:.0f}%"
    return f"{100 * row.peak_fraction:.0f}%{beside}"


def _peak_product(dtype: str, on_cuda: bool, machine: dict) -> str:
    # What the measuring machine timed: a report read back elsewhere (or from before oneDNN joined) says so too.
    if on_cuda or dtype != "float32" or not machine.get("onednn_peak"):
        return "torch.mm"
    return "product, the faster of torch.mm (MKL) and oneDNN's with a packed weight"


def _cpu_memory_line(machine: dict) -> str:
    if machine.get("freed_memory_kept"):
        return "CPU memory: freed blocks kept for the next tensors (`trainers.cpu_memory`, as the commands run)."
    return "CPU memory: the C library's default allocator (freed blocks not kept: see `trainers.cpu_memory`)."


def _cpu_products_lines(machine: dict) -> list[str]:
    library = machine.get("cpu_products")
    if library is None:  # a report from before the choice existed
        return []
    names = {
        "onednn": "oneDNN from the layers' own weights (products of 2^23 FLOPs or more)",
        "torch": "torch's own (MKL in x86 builds)",
    }
    lines = [
        f"CPU products of the unpacked models' inference forms: {names[library]} (`EFFICIENTVLM_CPU_PRODUCTS`: auto "
        "takes oneDNN on AVX-512 x86 CPUs not made by Intel, where MKL runs its AVX2 kernels; training runs torch's "
        "own)."
    ]
    activations = machine.get("cpu_activations")
    if activations is not None:  # absent from reports of before the choice
        where = "inside them (a post-op)" if activations == "inside" else "after them (torch's own pass, in place)"
        lines.append(
            f"FFN activations of the oneDNN products (packed rows, unpacked ones on oneDNN): {where} "
            "(`EFFICIENTVLM_CPU_ACTIVATIONS`: auto runs them inside on CPUs with AVX-512, after on the others, where "
            "oneDNN's post-ops cost more)."
        )
    return lines


def check_output_path(path: str | Path, flag: str) -> Path:
    """Raises, naming `flag`, unless `path` can be written: not a folder, its folder created (or there already) and
    writable, the file itself writable if it exists. Called before anything is timed; returns `path`."""
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; give the file to write.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{str(path)!r} is not writable")
    except OSError as error:
        raise ValueError(f"{flag} {str(path)!r}: cannot write there ({error}).") from error
    return path


def plot_path(path: str | Path) -> Path:
    """The file `plot_report` writes for `path`: with matplotlib's default format's suffix (`.png`) added when it has
    none, as `savefig` adds it; a suffix that is not one of matplotlib's formats raises, naming --plot."""
    from matplotlib import rcParams
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    formats = FigureCanvasBase.get_supported_filetypes()
    if not path.suffix:
        return path.with_name(f"{path.name}.{rcParams['savefig.format']}")
    if path.suffix[1:].lower() not in formats:
        raise ValueError(
            f"--plot {str(path)!r}: matplotlib writes no {path.suffix!r} files; end the name in one of "
            f"{', '.join('.' + name for name in formats)}."
        )
    return path


def write_json(report: BenchmarkReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return path


def plot_report(report: BenchmarkReport, path: str | Path) -> Path:
    """Two panels: median latency vs batch size per model and workload (log-log), and every compressed row's
    speedup vs its FLOPs reduction (against its base) with the y = x line (FLOPs cut fully turned into speed).
    Returns the file written (`plot_path`: `.png` added to a name without a suffix)."""
    import matplotlib.pyplot as plt

    path = plot_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = report_figure(report)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def report_figure(report: BenchmarkReport) -> Any:
    """The `matplotlib` figure `plot_report` saves (rendered off-screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    figure, (latency, speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[tuple, list] = {}
    for r in report.results:
        series.setdefault((r.workload, r.name, r.image_size, r.threads), []).append((r.batch_size, r.median_ms))
    for (workload, name, size, threads), points in series.items():
        points.sort()
        latency.plot(*zip(*points), marker="o", label=f"{workload}: {name} ({size}px, {threads}t)")
    latency.set(xscale="log", yscale="log", xlabel="batch size", ylabel="median latency (ms)", title="Latency")
    batch_sizes = sorted({r.batch_size for r in report.results})
    latency.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    # Only the batch sizes on x; y keeps its minor ticks, labelled where the latencies span less than a decade
    # (no power of ten in view: without them the axis had no number on it).
    latency.xaxis.set_minor_locator(NullLocator())
    latency.legend(fontsize=6)
    compressed = [r for r in report.results if r.flops_reduction_vs_base > 1.05]
    top = max([2.0, *(r.flops_reduction_vs_base for r in compressed), *(r.speedup_vs_base for r in compressed)])
    speed.plot([1, top], [1, top], "k--", label="y = x")
    speed.plot([1, top], [SPEEDUP_PER_FLOPS_TARGET, SPEEDUP_PER_FLOPS_TARGET * top], "k:", label="target 0.9 x")
    for r in compressed:
        speed.scatter(r.flops_reduction_vs_base, r.speedup_vs_base, s=18)
        speed.annotate(f"{r.name} b{r.batch_size}", (r.flops_reduction_vs_base, r.speedup_vs_base), fontsize=6)
    speed.set(xlabel="FLOPs reduction vs base", ylabel="speedup vs base", title="Speedup vs FLOPs reduction")
    speed.legend(fontsize=7)
    figure.tight_layout()
    return figure


__all__ = ["check_output_path", "format_report", "plot_path", "plot_report", "report_figure", "write_json"]
