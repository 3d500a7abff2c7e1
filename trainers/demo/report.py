"""The demo's `report.md` and plots: training losses, expected sparsity per modality over the pruning steps,
and a per-layer heat map of the heads and FFN neurons each encoder kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from trainers.tasks import task_spec  # noqa: E402


def plot_losses(histories: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """Training loss against step, one line per training run."""
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name, history in histories.items():
        points = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]
        if points:
            axis.plot(*zip(*points), label=name)
    axis.set(xlabel="optimizer step", ylabel="training loss", title="Training losses", yscale="log")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_sparsity(histories: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """Expected sparsity overall and per modality during each pruning run (with its target)."""
    runs = {name: history for name, history in histories.items() if name.startswith("pruned_")}
    figure, axes = plt.subplots(1, max(1, len(runs)), figsize=(5 * max(1, len(runs)), 4), squeeze=False)
    for axis, (name, history) in zip(axes[0], runs.items()):
        keys = sorted({key for entry in history for key in entry if "sparsity" in key})
        for key in keys:
            points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
            if points:
                style = "--" if "target" in key else "-"
                axis.plot(*zip(*points), style, label=key)
        axis.set(xlabel="optimizer step", ylabel="sparsity", title=name, ylim=(0, 1))
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_kept_structures(pruning_reports: dict[str, dict[str, Any]], path: Path) -> Path:
    """Heat map per task: rows are structure kinds (vision heads, text FFN, ...), columns layers, the colour
    the fraction kept."""
    figure, axes = plt.subplots(
        1, max(1, len(pruning_reports)), figsize=(6 * max(1, len(pruning_reports)), 3.8), squeeze=False
    )
    for axis, (task, report) in zip(axes[0], pruning_reports.items()):
        before, kept = report["structures_before"], report["structures_kept"]
        keys = [key for key in before if before[key]]
        width = max(len(before[key]) for key in keys)
        grid = [[float("nan")] * width for _ in keys]
        for row, key in enumerate(keys):
            for layer, total in enumerate(before[key]):
                grid[row][layer] = kept[key][layer] / total if total else float("nan")
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for row, key in enumerate(keys):
            for layer, total in enumerate(before[key]):
                axis.text(layer, row, f"{kept[key][layer]}/{total}", ha="center", va="center", fontsize=7, color="w")
        axis.set_yticks(range(len(keys)), keys, fontsize=8)
        axis.set_xticks(range(width), [f"layer {i}" for i in range(width)], fontsize=8)
        axis.set_title(f"{task}: kept heads / FFN neurons")
        figure.colorbar(image, ax=axis, fraction=0.04)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_plots(
    output_dir: Path, histories: dict[str, list[dict[str, float]]], pruning_reports: dict[str, dict[str, Any]]
) -> dict[str, Path]:
    plots = Path(output_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    return {
        "losses": plot_losses(histories, plots / "training_losses.png"),
        "sparsity": plot_sparsity(histories, plots / "expected_sparsity.png"),
        "kept": plot_kept_structures(pruning_reports, plots / "kept_structures.png"),
    }


def results_table(task: str, metrics: dict[str, dict[str, float]], benchmark: list[dict[str, Any]]) -> str:
    """Markdown table teacher | student | pruned for one task, on its primary metric (task registry)."""
    metric = task_spec(task).primary_metric
    teacher_score = metrics["teacher"][metric]
    lines = [
        f"| {task} | params (M) | GFLOPs | median latency (ms) | speedup | {metric} | % of teacher |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in benchmark:
        score = metrics[row["name"]][metric]
        retained = 100 * score / teacher_score if teacher_score else float("nan")
        lines.append(
            f"| {row['name']} | {row['parameters'] / 1e6:.2f} | {row['gflops']:.3f} | {row['median_ms']:.1f} "
            f"| {row['speedup']:.2f}x | {score:.4f} | {retained:.1f}% |"
        )
    return "\n".join(lines)


def write_report(run: Any, plots: dict[str, Path]) -> Path:
    """`report.md`: the results tables, the modality split pruning chose, baselines, timings and plots."""
    out = Path(run.output_dir)
    s = run.settings
    lines = [
        "# EfficientVLM demo report",
        "",
        f"Teacher {s.teacher_layers[0]} vision / {s.teacher_layers[1]} text / {s.teacher_layers[2]} fusion layers "
        f"(width {s.hidden_size}); student {s.student_layers[0]}/{s.student_layers[1]}/{s.student_layers[2]}, "
        f"pruned to a global target sparsity of {s.target_sparsity}. Latency: median CPU time of the encoders "
        f"(vision, text, fusion) on the same batch of {s.benchmark_batch_size}, measured side by side in this run.",
        "",
    ]
    for task in run.tasks:
        lines += [f"## {task}", "", results_table(task, run.metrics[task], run.benchmarks[task]), ""]
        if task == "vqa":
            vqa = run.stats["vqa"]
            teacher = run.metrics["vqa"]["teacher"]["vqa_accuracy"]
            lines += [
                f"Majority-answer baseline (VQA accuracy): {vqa['majority_baseline_vqa']:.4f}; "
                f"question-text-only baseline: {vqa['text_only_baseline_vqa']:.4f}. "
                f"The teacher's {teacher:.4f} is {teacher / vqa['majority_baseline_vqa']:.1f}x the majority baseline.",
                "",
            ]
        if task == "retrieval":
            images = run.settings.num_eval_images
            lines += [f"Chance recall@1 is {1 / images:.4f} for text retrieval ({images} test images).", ""]
        if task == "nlvr2":
            lines += ["Majority baseline: 0.5 (labels are balanced).", ""]
        report = run.pruning_reports[task]
        split = ", ".join(f"{m} {v:.3f}" for m, v in report["sparsity_per_modality"].items())
        lines += [
            f"Pruning reached sparsity {report['sparsity']:.3f} of the prunable parameters "
            f"(target {report['target_sparsity']}); per modality: {split}.",
            "",
        ]
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in run.timings.items()]
    lines += ["", "## Plots", ""]
    lines += [f"![{name}](plots/{path.name})" for name, path in plots.items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
