"""The benchmark: every workload x batch size x image size x thread count, models timed side by side.

For each setting, the models' workloads run in interleaved rounds (A, P, B, P, C, P, A, P, ...), each followed
by a matmul peak workload P (back-to-back 1024^3 products of the faster library, as many FLOPs as the row's call
within about 0.1 s) timed the same way; each row reports the median and the interquartile range / extremes of
every timed call, FLOPs (`torch.utils.flop_counter`), the achieved GFLOP/s and its fraction of the fp32 matmul
peak at the same thread count twice: of the run's best (best of 10 products, measured before and after every
setting) and of the median of the P calls timed beside the row. The peak targets are judged on the second: a row
and its ceiling measured by the same statistic in the same moments, so a slow spell of a shared host slows both
(against the best, it counts as the model's inefficiency). Then speedup and FLOPs reduction against the reference
(the first model) and against the model's base (the preset a randomly pruned copy came from, else the reference).
Speed targets are pass/fail columns, never assertions.

[`BenchmarkSettings`]' defaults are the ones the demo report uses, so both print the same speedups.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from modeling_efficientvlm.packing_efficientvlm import cpu_packing_available, cpu_products_library, fuses_activations
from trainers.cpu_memory import freed_memory_kept
from trainers.evaluation.benchmarking import (
    Spread,
    back_to_back,
    count_flops,
    count_parameters,
    fastest_matmul,
    interleaved_timings,
    matmul_peak_gflops,
    synchronized,
)
from trainers.placement import DTYPES, dtype_name, resolve_placement

from .models import KERNEL_SUFFIX, PACKED_SUFFIX, BenchmarkModel
from .workloads import WORKLOADS, WorkloadShape, build_workloads, can_run, family_of

# Issue 15's targets. A compressed model turns >= 90% of its FLOPs cut into speed; the forward workloads run at
# >= 80% (retrieval, with its top-k and bookkeeping: >= 70%) of the matmul peak; a mask-learning step costs at
# most 1.2 distillation steps.
SPEEDUP_PER_FLOPS_TARGET = 0.9
PEAK_TARGETS = {"encoders": 0.8, "itm": 0.8, "retrieval": 0.7}
MASK_STEP_TARGET = 1.2
# The matmul peak workload timed beside each row: back-to-back products of as many FLOPs as the row's call, at most
# about this long.
PEAK_BESIDE_SECONDS = 0.1
PEAK_BESIDE = "matmul peak"  # its timings' key: (PEAK_BESIDE, workload, model)
# A row whose interquartile range exceeds this fraction of its median was timed in a noisy moment: its ratios and
# the verdicts drawn from them can move by as much (a busy host's neighbours, a frequency change).
NOISY_SPREAD = 0.05
# `torch.compile` modes a benchmark can add compiled rows with ("reduce-overhead" replays CUDA graphs; "freezing"
# is the default mode with inductor's freezing: the weights become constants, folded and pre-packed for the
# CPU's matmul library, and each linear layer's bias and activation run inside its matmul; inference only), and
# the workloads that compile as one graph (retrieval loops over batches, the train step runs a `Trainer`).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "freezing")
COMPILABLE_WORKLOADS = ("encoders", "itm", "vqa")
RECOMPILE_LIMIT = 256  # compiled graphs of one workload's code in one setting (one per model)
COMPILED_SUFFIX = " [compiled]"


@dataclass
class BenchmarkSettings:
    """What to measure. Defaults (the demo report's too): the encoders workload, batch 32, each model's own image
    size as the reference model has it, 16 text tokens, the current torch thread count, 3 warm-up calls and 10
    timed calls per round, 2 rounds, on the CPU in float32.

    `device` / `dtype`: where the models run and the dtype of their weights for the forward workloads (the train
    step keeps float32 weights and runs under the `Trainer`'s bf16 / fp16 mixed precision instead); the matmul
    peak is measured on the same device in the same dtype. Several dtypes, comma-separated (`"float32,bfloat16"`):
    every model runs in the first, and a copy of it in each other, `<name> [bfloat16]`, timed in the same rounds,
    whose base is the model in the first dtype (so `speedup_vs_base` is what the dtype buys) and whose share of
    the peak is of that dtype's peak. `retrieval_batch_size`: images / texts per encoder
    pass and pairs per fusion pass of the retrieval workload (`retrieval_evaluate`'s `batch_size`). `compile`: a
    `torch.compile` mode; every model of the encoders / itm / vqa workloads then gets a second row, `<name> [compiled]`,
    timed in the same rounds, whose base is the eager model (so `speedup_vs_base` is what compiling buys); its
    FLOPs are those of the eager call, and compiling happens before the warm-up calls. `pack_cpu_weights`: every
    EfficientVLM model also runs from oneDNN-packed weights (`EfficientVLMPreTrainedModel.pack_cpu_weights`), as
    `<name> [packed]` timed in the same rounds, whose base is the model itself (CPU, float32). `progress`: a line on
    stderr as each setting (and each model's memory process) starts, with how many there are."""

    workloads: tuple[str, ...] = ("encoders",)
    batch_sizes: tuple[int, ...] = (32,)
    image_sizes: tuple[int | None, ...] = (None,)  # None: the reference model's image size
    threads: tuple[int | None, ...] = (None,)  # None: torch's current setting
    text_length: int = 16
    warmup: int = 3
    repeats: int = 10
    rounds: int = 2
    vqa_candidates: int = 32
    vqa_k: int = 8
    texts_per_image: int = 5
    retrieval_k: int = 16
    retrieval_batch_size: int = 32
    memory: bool = False  # peak RSS of a fresh process per model (models given by name only)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    compile: str | None = None
    pack_cpu_weights: bool = False
    cpu_attention_kernel: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown or not self.workloads:
            raise ValueError(f"Unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}.")
        if len(set(self.workloads)) < len(self.workloads):
            raise ValueError(f"`workloads` repeat: {self.workloads}.")
        for name in ("batch_sizes", "image_sizes", "threads"):
            values = getattr(self, name)
            if not values or any(v is not None and v < 1 for v in values):
                raise ValueError(f"`{name}` must be positive integers; got {values}.")
            if len(set(values)) < len(values):
                raise ValueError(f"`{name}` repeat: {values} (each setting is timed once, in the same rounds).")
        if "train-step" in self.workloads and min(self.batch_sizes) < 2:
            raise ValueError(
                f"`batch_sizes` (--batch_sizes / --batch_size) {list(self.batch_sizes)}: the train-step workload needs "
                "batches of at least 2 (ITM training takes each pair's negative from another image of the batch)."
            )
        for name in ("text_length", "vqa_candidates", "vqa_k", "texts_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1; got {getattr(self, name)}.")
        if self.vqa_k > self.vqa_candidates:
            raise ValueError(f"`vqa_k` ({self.vqa_k}) re-scores some of the `vqa_candidates` ({self.vqa_candidates}).")
        if self.retrieval_k < 0:
            raise ValueError(f"`retrieval_k` must be at least 0; got {self.retrieval_k}.")
        if self.repeats < 1 or self.rounds < 1 or self.warmup < 0:
            raise ValueError("`repeats` and `rounds` must be at least 1, `warmup` at least 0.")
        if self.retrieval_batch_size < 1:
            raise ValueError(f"`retrieval_batch_size` must be positive; got {self.retrieval_batch_size}.")
        if self.device == "auto":
            raise ValueError("The benchmark's `device` is cpu, cuda or cuda:N: name the one to measure.")
        if not self.dtypes or len(set(self.dtypes)) < len(self.dtypes):
            raise ValueError(f"`dtype` must be distinct dtypes, comma-separated; got {self.dtype!r}.")
        for dtype in self.dtypes:
            resolve_placement(self.device, dtype)  # a known dtype, and one this device runs
        kind = torch.device(self.device).type
        if kind == "cuda" and self.memory:
            raise ValueError(
                "`memory` measures the resident memory of a CPU process; on CUDA every row reports the workload's "
                "peak GPU memory anyway."
            )
        if self.pack_cpu_weights and (kind != "cpu" or self.dtypes[0] != "float32"):
            raise ValueError(
                "`pack_cpu_weights` packs float32 weights for the CPU; got device "
                f"{self.device!r} and dtype {self.dtypes[0]!r}."
            )
        if self.cpu_attention_kernel and (kind != "cpu" or self.dtypes[0] != "float32"):
            raise ValueError(
                "`cpu_attention_kernel` is a float32 CPU kernel; got device "
                f"{self.device!r} and dtype {self.dtypes[0]!r}."
            )
        if self.compile is not None:
            if self.compile not in COMPILE_MODES:
                raise ValueError(f"Unknown compile mode {self.compile!r}; choose from {', '.join(COMPILE_MODES)}.")
            if not any(workload in COMPILABLE_WORKLOADS for workload in self.workloads):
                raise ValueError(
                    f"`compile` adds compiled rows to the {', '.join(COMPILABLE_WORKLOADS)} workloads; got "
                    f"{', '.join(self.workloads)} only."
                )

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The dtype names of `dtype` (one, or several comma-separated); the first is the models' own."""
        return tuple(part.strip() for part in self.dtype.split(",") if part.strip())

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtypes[0]]

    @property
    def on_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"


@dataclass
class BenchmarkResult:
    """One model on one workload at one setting. Times in ms; `speedup` and `flops_reduction` against the
    reference (the first model), `*_vs_base` against the model's base; targets "pass" / "fail" / None (n/a)."""

    workload: str
    name: str
    batch_size: int
    image_size: int
    threads: int
    parameters: int  # the whole model, heads included
    encoder_parameters: int  # what the encoders workload runs (and pruning shrinks)
    gflops: float
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    gflops_per_s: float
    peak_fraction: float  # of the run's best matmul peak in this row's dtype at this thread count
    speedup: float = 1.0
    flops_reduction: float = 1.0
    base: str | None = None
    speedup_vs_base: float = 1.0
    flops_reduction_vs_base: float = 1.0
    speed_target: str | None = None
    target_base: str | None = None  # a variant row's speed target is judged against this row (else `base`)
    peak_target: str | None = None
    peak_rss_mb: float | None = None
    loaded_rss_mb: float | None = None
    peak_device_mb: float | None = None  # CUDA: the allocator's high-water mark while the workload runs
    device_workload_mb: float | None = None  # ... of which allocated by the workload (over its model and inputs)
    dtype: str = "float32"  # the weights' (the train steps: their mixed precision)
    # The median rate of the matmul peak workload timed right after this row's calls in every round (same dtype,
    # same threads), and this row's fraction of it: what the peak target is judged on.
    peak_beside_gflops: float | None = None
    peak_beside_fraction: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchmarkReport:
    settings: BenchmarkSettings
    results: list[BenchmarkResult]
    matmul_peak_gflops: dict[int, float]  # per thread count (on the settings' device, in their first dtype)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    dtype_peaks_gflops: dict[str, dict[int, float]] = field(default_factory=dict)  # of each further dtype
    # Every measurement of the peak (before the first setting and after each), per dtype and thread count: the
    # peak is their best; their spread is how much the host's own speed moved during the run.
    peak_samples: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    # What each row's name stands for: kind, base, and how it was built (`ModelSource`; None: a model given in
    # Python), as `model_record` writes them.
    models: list[dict[str, Any]] = field(default_factory=list)

    def peaks_of(self, dtype: str) -> dict[int, float]:
        """The matmul peaks measured in `dtype`, per thread count."""
        return self.matmul_peak_gflops if dtype == self.settings.dtypes[0] else self.dtype_peaks_gflops[dtype]

    def rows(self, workload: str | None = None) -> list[BenchmarkResult]:
        return [r for r in self.results if workload is None or r.workload == workload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchmarkReport:
        """A report read back from `--output_json` (to print or plot it again)."""
        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in data["settings"].items()}
        return cls(
            BenchmarkSettings(**settings),
            [BenchmarkResult(**row) for row in data["results"]],
            {int(k): v for k, v in data["matmul_peak_gflops"].items()},
            notes=list(data["notes"]),
            machine=dict(data["machine"]),
            dtype_peaks_gflops={
                dtype: {int(k): v for k, v in peaks.items()}
                for dtype, peaks in data.get("dtype_peaks_gflops", {}).items()
            },
            peak_samples={
                dtype: {int(k): list(v) for k, v in samples.items()}
                for dtype, samples in data.get("matmul_peak_samples", {}).items()
            },
            models=list(data.get("models", [])),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "models": self.models,
            "machine": self.machine,
            "matmul_peak_gflops": {str(k): v for k, v in self.matmul_peak_gflops.items()},
            "dtype_peaks_gflops": {
                dtype: {str(k): v for k, v in peaks.items()} for dtype, peaks in self.dtype_peaks_gflops.items()
            },
            "matmul_peak_samples": {
                dtype: {str(k): v for k, v in samples.items()} for dtype, samples in self.peak_samples.items()
            },
            "targets": {
                "speedup_per_flops_reduction": SPEEDUP_PER_FLOPS_TARGET,
                "peak_fraction": PEAK_TARGETS,
                "mask_step_per_distillation_step": MASK_STEP_TARGET,
            },
            "results": [r.as_dict() for r in self.results],
            "notes": self.notes,
        }


def encoder_parameters(kind: str, model: nn.Module) -> int:
    """Parameters of what the encoders workload runs: EfficientVLM's backbone, BLIP's vision model + text
    encoder, the CLIP vision tower."""
    if kind == "blip":
        parts = [model.vision_model, model.text_encoder]
    else:
        parts = [getattr(model, "efficientvlm", model)]
    return sum(p.numel() for part in parts for p in part.parameters())


def model_record(entry: BenchmarkModel) -> dict[str, Any]:
    """What a report's row name stands for: `{"name", "kind", "base", "source"}`, `source` the `ModelSource` it was
    built from (spec: preset, peer, folder or Hub id; sparsity and seed of a random pruning; packing), or None for a
    model given in Python."""
    source = entry.source.to_dict() if entry.source is not None else None
    return {"name": entry.name, "kind": entry.kind, "base": entry.base, "source": source}


def machine_info(device: str = "cpu") -> dict[str, Any]:
    import os
    import platform

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "freed_memory_kept": freed_memory_kept(),  # `trainers.cpu_memory`: the `efficientvlm` commands keep it
        # The CPU float32 peak is also timed through oneDNN (`matmul_peak_gflops`) where this build has it.
        "onednn_peak": cpu_packing_available(),
        # Which library the unpacked models' inference products ran on (`EFFICIENTVLM_CPU_PRODUCTS`, the CPU vendor).
        "cpu_products": cpu_products_library(),
        # Where oneDNN products ran the FFN activation: "inside" (a post-op) or "after" (torch's in-place pass).
        "cpu_activations": "inside" if fuses_activations() else "after",
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["float32_matmul_precision"] = torch.get_float32_matmul_precision()  # "highest": no TF32
    return info


def run_benchmark(models: list[BenchmarkModel], settings: BenchmarkSettings | None = None) -> BenchmarkReport:
    """Measures every model on every workload and setting; see the module docstring."""
    settings = settings or BenchmarkSettings()
    if not models:
        raise ValueError("Give at least one model to benchmark.")
    names = {entry.name for entry in models}
    for entry in models:
        if entry.base is not None and entry.base not in names:
            raise ValueError(
                f"{entry.name} is measured against its base {entry.base}, which is not among the models; add it "
                "(its speedup and FLOPs cut are relative to it)."
            )
    first, *others = settings.dtypes
    for entry in models:
        entry.place(settings.device, settings.torch_dtype)
    _check_workloads(models, settings)
    _check_image_sizes(models, settings)
    # Each model followed by its copies in the other dtypes, all in the same interleaved rounds.
    models = [variant for entry in models for variant in (entry, *(entry.in_dtype(DTYPES[d]) for d in others))]
    if settings.pack_cpu_weights:  # each float32 EfficientVLM model followed by its packed copy
        packs = [entry.kind == "efficientvlm" and entry.dtype == torch.float32 for entry in models]
        models = [v for entry, pack in zip(models, packs) for v in (entry, *([entry.packed()] if pack else []))]
    if settings.cpu_attention_kernel:  # each float32 EfficientVLM model (its packed copy, if any) + the kernel
        kernel = [
            entry.kind == "efficientvlm"
            and entry.dtype == torch.float32
            and entry.name.endswith(PACKED_SUFFIX) == settings.pack_cpu_weights
            for entry in models
        ]
        models = [v for entry, k in zip(models, kernel) for v in (entry, *[entry.with_attention_kernel()] * k)]
    previous_threads = torch.get_num_threads()
    results, peaks = [], {dtype: {} for dtype in settings.dtypes}
    unable: dict[str, list[str]] = {}  # workload -> the models that cannot run it (no row)
    depadded: dict[str, int] = {}  # model -> padding neurons its train-step students were built without
    samples: dict[str, dict[int, list[float]]] = {dtype: {} for dtype in settings.dtypes}

    def measure_peaks(threads: int) -> None:
        # Re-measured after every setting, the best kept: on a loaded machine one sample may fall in a busy moment
        # and make the models look faster than the peak.
        for dtype, found in peaks.items():
            peak = matmul_peak_gflops(threads, device=settings.device, dtype=DTYPES[dtype])
            found[threads] = max(found.get(threads, 0.0), peak)
            samples[dtype].setdefault(threads, []).append(peak)

    count = len(settings.threads) * len(settings.image_sizes) * len(settings.workloads) * len(settings.batch_sizes)
    done = 0
    try:
        for threads in settings.threads:
            threads = threads or previous_threads
            torch.set_num_threads(threads)
            measure_peaks(threads)
            for image_size in settings.image_sizes:
                for workload in settings.workloads:
                    for batch_size in settings.batch_sizes:
                        done += 1
                        if settings.progress:
                            size = f"{image_size} px" if image_size else "the models' image size"
                            _progress(
                                f"setting {done}/{count}: {workload}, batch {batch_size}, {size}, {threads} "
                                f"thread(s), {len(models)} model(s) x {settings.rounds} round(s)"
                            )
                        results += _measure_setting(
                            models, workload, settings, batch_size, image_size, threads, unable, depadded
                        )
                        measure_peaks(threads)
    finally:
        torch.set_num_threads(previous_threads)
    for row in results:
        row.peak_fraction = row.gflops_per_s / peaks[row.dtype][row.threads]
        row.peak_beside_fraction = row.gflops_per_s / row.peak_beside_gflops
        if row.workload in PEAK_TARGETS:
            row.peak_target = "pass" if row.peak_beside_fraction >= PEAK_TARGETS[row.workload] else "fail"
    if settings.memory:
        _add_memory(models, results, settings)
    report = BenchmarkReport(
        settings,
        results,
        peaks[first],
        machine=machine_info(settings.device),
        dtype_peaks_gflops={dtype: peaks[dtype] for dtype in others},
        peak_samples=samples,
        models=[model_record(entry) for entry in models],
    )
    report.notes = [*_unable_notes(unable), *_depadded_notes(depadded), *target_notes(report)]
    return report


def _progress(message: str) -> None:
    print(f"benchmark: {message}", file=sys.stderr, flush=True)


def _unable_notes(unable: dict[str, list[str]]) -> list[str]:
    """One line per workload that some models have no rows for: they have no model of its kind (a peer without a
    VQA head, a saved folder of another task)."""
    return [
        f"No {workload} rows for {', '.join(names)}: no model of that kind (a peer without that head, or a saved "
        "folder of another task)."
        for workload, names in unable.items()
    ]


def _depadded_notes(depadded: dict[str, int]) -> list[str]:
    """One line per model whose train-step students were built without an earlier pruning's padding."""
    return [
        f"{name}: train-step students without its {neurons} padding FFN neurons (all-zero, as pruning pads widths), "
        "which mask learning removes before masking; the distillation student drops them too, so both steps train "
        "the same model (the teacher keeps them; the outputs are the same)."
        for name, neurons in depadded.items()
    ]


def _check_workloads(models: list[BenchmarkModel], settings: BenchmarkSettings) -> None:
    """Raises before anything is timed for a workload that none of the models can run (it would have no rows in
    any setting)."""
    for workload in settings.workloads:
        if not any(can_run(entry, workload) for entry in models):
            raise ValueError(
                f"None of the models can run the {workload!r} workload ({', '.join(e.name for e in models)}: peers "
                "without that head, or saved folders of another task)."
            )


def _check_image_sizes(models: list[BenchmarkModel], settings: BenchmarkSettings) -> None:
    """Raises before anything is timed when an image size is not a multiple of a model's patch size (the setting
    would fail after the earlier ones were measured)."""
    sizes = [size for size in settings.image_sizes if size is not None]
    for entry in models if sizes else ():
        model = next(filter(None, (entry.build(family_of(w)) for w in settings.workloads)), None)
        vision = getattr(model.config, "vision_config", model.config) if model is not None else None
        patch = getattr(vision, "patch_size", None)
        bad = [size for size in sizes if isinstance(patch, int) and size % patch]
        if bad:
            raise ValueError(f"--image_sizes {bad}: not multiples of {entry.name}'s patch size {patch}.")


def _reference_image_size(models: list[BenchmarkModel], workload: str) -> int:
    for entry in models:
        model = entry.build(family_of(workload))
        if model is not None:
            config = model.config
            return getattr(config, "vision_config", config).image_size
    raise ValueError(f"None of the models can run the {workload!r} workload.")


def _measure_setting(
    models: list[BenchmarkModel],
    workload: str,
    settings: BenchmarkSettings,
    batch_size: int,
    image_size: int | None,
    threads: int,
    unable: dict[str, list[str]] | None = None,
    depadded: dict[str, int] | None = None,
) -> list[BenchmarkResult]:
    """Times every model on one workload at one setting; the models that cannot run it are added to
    `unable[workload]`, those whose train-step students were built without padding neurons to `depadded` (name ->
    neurons)."""
    size = image_size or _reference_image_size(models, workload)
    shape = _shape(settings, batch_size, size)
    calls: dict[tuple[str, str], Any] = {}
    eager_of: dict[str, str] = {}  # a compiled row's name -> its model's name
    compiling = settings.compile is not None and workload in COMPILABLE_WORKLOADS
    if compiling:
        # Inductor's CPU kernels keep the thread count they were generated for, and dynamo would hand an earlier
        # setting's graph to a workload of the same shapes: every setting compiles afresh.
        torch._dynamo.reset()
    for entry in models:
        if workload == "train-step" and entry.name.endswith((PACKED_SUFFIX, KERNEL_SUFFIX)):
            continue  # packs and the kernel apply without autograd only: a training step would time the model again
        workloads = build_workloads(entry, workload, shape)
        if not workloads and unable is not None and entry.name not in unable.setdefault(workload, []):
            unable[workload].append(entry.name)
        for name, call in workloads.items():
            if getattr(call, "silent_neurons_dropped", 0) and depadded is not None:
                depadded[entry.name] = call.silent_neurons_dropped
            calls[(name, entry.name)] = call
            if compiling:
                compiled_name = entry.name + COMPILED_SUFFIX
                calls[(name, compiled_name)] = compiled_call(call, settings.compile)
                eager_of[compiled_name] = entry.name
    calls = {key: synchronized(call, settings.device) for key, call in calls.items()}
    flops = {key: count_flops(call) for key, call in calls.items() if key[1] not in eager_of}
    flops.update({(name, model): flops[(name, eager_of[model])] for name, model in calls if model in eager_of})
    by_name = {entry.name: entry for entry in models}
    dtype_of = {model: by_name[eager_of.get(model, model)].dtype for _, model in calls}
    timed, peak_flops = _with_peaks_beside(calls, flops, dtype_of, settings.device)
    timings = interleaved_timings(timed, warmup=settings.warmup, repeats=settings.repeats, rounds=settings.rounds)
    del timed  # the peak's matrices (512 MB on a GPU) are in no row's memory
    device_memory = _device_memory(calls, settings.device)
    rows = []
    for name, model_name in calls:
        entry = by_name[eager_of.get(model_name, model_name)]
        model = entry.build(family_of(workload))
        spread = Spread.of(timings[(name, model_name)])
        gflops = flops[(name, model_name)] / 1e9
        rate = gflops / (spread.median_ms / 1e3)
        peak_time = Spread.of(timings[(PEAK_BESIDE, name, model_name)]).median_ms / 1e3
        peak_beside = peak_flops[(name, model_name)] / 1e9 / peak_time
        rows.append(
            BenchmarkResult(
                workload=name,
                name=model_name,
                batch_size=batch_size,
                image_size=size,
                threads=threads,
                parameters=count_parameters(model),
                encoder_parameters=encoder_parameters(entry.kind, model),
                gflops=gflops,
                median_ms=spread.median_ms,
                q1_ms=spread.q1_ms,
                q3_ms=spread.q3_ms,
                min_ms=spread.min_ms,
                max_ms=spread.max_ms,
                gflops_per_s=rate,
                peak_fraction=0.0,  # set once the run's matmul peak is known
                base=entry.name if model_name in eager_of else entry.base,
                **device_memory.get((name, model_name), {}),
                dtype=dtype_name(entry.dtype),
                peak_beside_gflops=peak_beside,
            )
        )
    _add_ratios(rows, {**by_name, **{compiled: by_name[eager] for compiled, eager in eager_of.items()}})
    return rows


def _with_peaks_beside(
    calls: dict[tuple[str, str], Any],
    flops: dict[tuple[str, str], int],
    dtype_of: dict[str, torch.dtype],
    device: str,
) -> tuple[dict[tuple, Any], dict[tuple[str, str], int]]:
    """The workloads to time, each followed by the matmul peak in its model's dtype (A, P, B, P, ...; the peak's
    key is `(PEAK_BESIDE, workload, model)`), and the FLOPs of each row's peak call: as many as the row's call,
    within `PEAK_BESIDE_SECONDS` (a tiny model's row: one product)."""
    fastest = {dtype: fastest_matmul(device, dtype) for dtype in set(dtype_of.values())}
    timed: dict[tuple, Any] = {}
    peak_flops = {}
    for key, call in calls.items():
        product, product_flops, seconds = fastest[dtype_of[key[1]]]
        count = max(1, min(round(PEAK_BESIDE_SECONDS / seconds), math.ceil(flops[key] / product_flops)))
        timed[key], timed[(PEAK_BESIDE, *key)] = call, back_to_back(product, count)
        peak_flops[key] = count * product_flops
    return timed, peak_flops


def _compile_arguments(mode: str) -> dict[str, Any]:
    """`torch.compile`'s keyword arguments for a benchmark compile mode (see `COMPILE_MODES`)."""
    return {"options": {"freezing": True}} if mode == "freezing" else {"mode": mode}


def compile_call_text(mode: str) -> str:
    """How `compiled_call` compiles in `mode`, as code."""
    return f"torch.compile({', '.join(f'{k}={v!r}' for k, v in _compile_arguments(mode).items())})"


def compiled_call(call: Any, mode: str) -> Any:
    """`call` through `torch.compile` in `mode`, compiled by a first call made here (not timed); a workload that does
    not compile raises a RuntimeError naming the mode."""
    compiled = torch.compile(call, **_compile_arguments(mode))
    try:
        # Every model's workload is the same code: past dynamo's default of 8 graphs per code, the rest would
        # silently run eager.
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            compiled()  # as the timed calls run: grad mode is part of what a compiled graph is kept for
    except Exception as error:  # dynamo / inductor errors have many types; the message says what failed
        raise RuntimeError(f"{compile_call_text(mode)} failed on this workload: {error}") from error
    return compiled


def _device_memory(calls: dict[tuple[str, str], Any], device: str) -> dict[tuple[str, str], dict[str, float]]:
    """CUDA: each workload's peak allocated memory in one more call (and how much of it the call itself allocated:
    activations, caches, outputs); on a CPU, nothing (`memory` measures a fresh process's RSS there)."""
    if torch.device(device).type != "cuda":
        return {}
    memory = {}
    for key, call in calls.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        peak = torch.cuda.max_memory_allocated(device)
        memory[key] = {"peak_device_mb": peak / 2**20, "device_workload_mb": (peak - before) / 2**20}
    return memory


def _shape(settings: BenchmarkSettings, batch_size: int, image_size: int) -> WorkloadShape:
    return WorkloadShape(
        batch_size=batch_size,
        image_size=image_size,
        text_length=settings.text_length,
        vqa_candidates=settings.vqa_candidates,
        vqa_k=settings.vqa_k,
        texts_per_image=settings.texts_per_image,
        retrieval_k=settings.retrieval_k,
        retrieval_batch_size=settings.retrieval_batch_size,
        seed=settings.seed,
    )


def _add_ratios(rows: list[BenchmarkResult], models: dict[str, BenchmarkModel]) -> None:
    """Speedup and FLOPs reduction against the reference (first model of each workload) and the base; targets."""
    for workload in dict.fromkeys(r.workload for r in rows):
        group = {r.name: r for r in rows if r.workload == workload}
        reference = next(iter(group.values()))
        for row in group.values():
            row.speedup = reference.median_ms / row.median_ms
            row.flops_reduction = reference.gflops / row.gflops
            base = group.get(row.base) if row.base else reference
            row.base = base.name
            row.speedup_vs_base = base.median_ms / row.median_ms
            row.flops_reduction_vs_base = base.gflops / row.gflops
            row.speed_target = _speed_verdict(models[row.name], row.speedup_vs_base, row.flops_reduction_vs_base)
        for row in group.values():
            _judge_variant_against_its_base(row, group, models)


def _judge_variant_against_its_base(
    row: BenchmarkResult, group: dict[str, BenchmarkResult], models: dict[str, BenchmarkModel]
) -> None:
    """A variant row (`<model> [packed]`, `[compiled]`, `[bfloat16]`, ...; its base is its model) of a compressed
    model: its speed target against the same variant of its model's base (a pruned copy's packed row against its
    preset's packed row, a student's against the reference's), recorded as `target_base`. Runs once every row's
    base is set."""
    origin, suffix = row, ""
    while origin.base and origin.name.startswith(origin.base + " [") and origin.base in group:
        suffix = origin.name[len(origin.base) :] + suffix
        origin = group[origin.base]
    model_base = origin.base if suffix and origin.base != origin.name else None
    counterpart = group.get(f"{model_base}{suffix}") if model_base else None
    if counterpart is None:
        return
    verdict = _speed_verdict(models[row.name], counterpart.median_ms / row.median_ms, counterpart.gflops / row.gflops)
    if verdict is not None:
        row.speed_target, row.target_base = verdict, counterpart.name


def _speed_verdict(model: BenchmarkModel, speedup: float, flops_cut: float) -> str | None:
    """Whether a smaller EfficientVLM model (not a peer) turns its FLOPs cut into speed: "pass" / "fail"; None for
    a model that is not smaller or not ours to judge."""
    if model.kind != "efficientvlm" or flops_cut <= 1.05:
        return None
    return "pass" if speedup >= SPEEDUP_PER_FLOPS_TARGET * flops_cut else "fail"


def _add_memory(models: list[BenchmarkModel], rows: list[BenchmarkResult], settings: BenchmarkSettings) -> None:
    """Peak RSS per model and workload at the largest batch and image size measured (in a fresh process; each train
    step in its own, which builds that step's trainer alone)."""
    from .memory import peak_memory

    by_name = {entry.name: entry for entry in models}
    for workload in dict.fromkeys(r.workload for r in rows):
        for name, entry in by_name.items():
            mine = [r for r in rows if r.name == name and r.workload == workload]
            if not mine or entry.source is None:
                continue
            if settings.progress:
                _progress(f"peak memory of {name} ({workload}) in a process of its own")
            largest = max(mine, key=lambda r: (r.batch_size, r.image_size, r.threads))
            shape = _shape(settings, largest.batch_size, largest.image_size)
            memory = peak_memory(entry.source, workload, shape, largest.threads, dtype_name(entry.dtype))
            for row in mine:
                if (row.batch_size, row.image_size, row.threads) == (
                    largest.batch_size,
                    largest.image_size,
                    largest.threads,
                ):
                    row.peak_rss_mb, row.loaded_rss_mb = memory["peak_mb"], memory["loaded_mb"]


def _row_label(row: BenchmarkResult) -> str:
    """A row named with its setting, as the notes under the table name it."""
    return f"{row.name} ({row.workload}, batch {row.batch_size}, {row.image_size}px, {row.threads} thread(s))"


def target_notes(report: BenchmarkReport) -> list[str]:
    """One line per variant row judged against another row than its base (see `_judge_variant_against_its_base`)
    and one per mask-learning step against its distillation step (target <= 1.2x); then, when there are any, one
    naming the rows whose peak target would read otherwise against the run's best peak, one naming the rows timed
    with a wide spread and one giving the matmul peak's own drift over the run."""
    notes = []
    for row in report.results:
        if row.target_base is None:
            continue
        base = next(
            r
            for r in report.results
            if r.name == row.target_base
            and (r.workload, r.batch_size, r.image_size, r.threads)
            == (row.workload, row.batch_size, row.image_size, row.threads)
        )
        speedup, cut = base.median_ms / row.median_ms, base.gflops / row.gflops
        notes.append(
            f"{_row_label(row)}: speed target against {base.name}: {speedup:.2f}x / {cut:.2f}x FLOPs cut = "
            f"{speedup / cut:.2f} (target >= {SPEEDUP_PER_FLOPS_TARGET}: {row.speed_target})"
        )
    steps = {}
    for row in report.results:
        if row.workload.startswith("train-step/"):
            steps[(row.name, row.batch_size, row.image_size, row.threads, row.workload)] = row.median_ms
    for (name, batch, size, threads, workload), ms in steps.items():
        if workload != "train-step/mask-learning":
            continue
        plain = steps.get((name, batch, size, threads, "train-step/distillation"))
        if plain:
            ratio = ms / plain
            verdict = "pass" if ratio <= MASK_STEP_TARGET else "fail"
            notes.append(
                f"{name}, batch {batch}, {size}px, {threads} thread(s): mask-learning step {ratio:.2f}x a "
                f"distillation step (target <= {MASK_STEP_TARGET}x: {verdict})"
            )
    differing = [
        f"{_row_label(row)}: {row.peak_beside_fraction:.0%} of {row.peak_beside_gflops:.1f} GFLOP/s beside it, "
        f"{row.peak_fraction:.0%} of the best {report.peaks_of(row.dtype)[row.threads]:.1f}"
        for row in report.results
        if row.workload in PEAK_TARGETS
        and row.peak_beside_fraction is not None
        and (row.peak_beside_fraction >= PEAK_TARGETS[row.workload])
        != (row.peak_fraction >= PEAK_TARGETS[row.workload])
    ]
    if differing:
        notes.append(
            "Peak targets whose verdict would differ against the run's best matmul peak (the target is judged "
            f"against the peak timed beside each row, in the same rounds): {'; '.join(differing)}. The host ran "
            "slower while these rows were timed than at its best moment."
        )
    noisy = [
        f"{_row_label(row)}: {(row.q3_ms - row.q1_ms) / row.median_ms:.1%}"
        for row in report.results
        if row.median_ms > 0 and row.q3_ms - row.q1_ms > NOISY_SPREAD * row.median_ms
    ]
    if noisy:
        notes.append(
            f"Noisy timings (interquartile range over {NOISY_SPREAD:.0%} of the median): {'; '.join(noisy)}. Ratios "
            "and verdicts involving these rows can move by as much: rerun with more --rounds, on a quieter machine."
        )
    drifts = [
        f"{dtype}, {threads} thread(s): {min(found):.1f}-{max(found):.1f} GFLOP/s over {len(found)} measurements"
        for dtype, by_threads in report.peak_samples.items()
        for threads, found in by_threads.items()
        if max(found) - min(found) > NOISY_SPREAD * max(found)
    ]
    if drifts:
        notes.append(
            f"The matmul peak itself moved by over {NOISY_SPREAD:.0%} during the run ({'; '.join(drifts)}): the "
            "host's own speed changed, and rows timed in its slower moments read low against the best by up to as "
            "much (not against the peak timed beside them, which the peak targets are judged on)."
        )
    return notes


__all__ = [
    "COMPILE_MODES",
    "DTYPES",
    "MASK_STEP_TARGET",
    "NOISY_SPREAD",
    "PEAK_TARGETS",
    "SPEEDUP_PER_FLOPS_TARGET",
    "BenchmarkReport",
    "BenchmarkResult",
    "BenchmarkSettings",
    "run_benchmark",
]
