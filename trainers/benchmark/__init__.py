"""`efficientvlm benchmark`'s engine: models (folders, presets, randomly pruned copies, peers), workloads, the
interleaved measurement over batch sizes, image sizes and thread counts, and its table / JSON / plot."""

from .models import PEERS, BenchmarkModel, ModelSource, benchmark_models, prebuilt_models
from .report import format_report, plot_report, report_figure, write_json
from .suite import BenchmarkReport, BenchmarkResult, BenchmarkSettings, run_benchmark
from .workloads import WORKLOADS

__all__ = [
    "PEERS",
    "WORKLOADS",
    "BenchmarkModel",
    "BenchmarkReport",
    "BenchmarkResult",
    "BenchmarkSettings",
    "ModelSource",
    "benchmark_models",
    "format_report",
    "plot_report",
    "report_figure",
    "prebuilt_models",
    "run_benchmark",
    "write_json",
]
