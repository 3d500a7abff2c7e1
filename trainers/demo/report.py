"""The demo's `report.md` and plots: training losses, expected sparsity per modality over the pruning steps,
and a per-layer heat map of the heads and FFN neurons each encoder kept."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from trainers.evaluation.retrieval import ITM_SCORE_WORDS  # noqa: E402
from trainers.tasks import task_spec  # noqa: E402


def plot_losses(histories: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """Training loss against step, one line per training run."""
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name, history in histories.items():
        points = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]
        if points:
            axis.plot(*zip(*points), label=name)
    axis.set(xlabel="optimizer step", ylabel="training loss", title="Training losses", yscale="log")
    if axis.lines:
        axis.legend(fontsize=7)
    else:  # every run was shorter than the logging interval (`--quick`)
        message = "no losses logged: every run was shorter than the logging interval"
        axis.text(0.5, 0.5, message, ha="center", transform=axis.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_sparsity(histories: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """Expected sparsity overall and per modality during each pruning run (with its target)."""
    # Mask-learning runs only (the fixed-mask runs that follow them log no sparsity).
    runs = {
        name: history
        for name, history in histories.items()
        if name.startswith("pruned_") and any("sparsity" in key for entry in history for key in entry)
    }
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
    the fraction kept; each cell is labelled kept/total in a colour that contrasts with the cell. Grey cells
    are layers an encoder does not have (its stack is shorter than the longest one)."""
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    figure, axes = plt.subplots(
        1, max(1, len(pruning_reports)), figsize=(6.5 * max(1, len(pruning_reports)), 4.4), squeeze=False
    )
    for axis, (task, report) in zip(axes[0], pruning_reports.items()):
        before, kept = report["structures_before"], report["structures_kept"]
        keys = [key for key in before if before[key]]
        width = max(len(before[key]) for key in keys)
        grid = [[float("nan")] * width for _ in keys]
        for row, key in enumerate(keys):
            for layer, total in enumerate(before[key]):
                grid[row][layer] = kept[key][layer] / total if total else float("nan")
        image = axis.imshow(grid, vmin=0, vmax=1, cmap=cmap, aspect="auto")
        for row, key in enumerate(keys):
            for layer, total in enumerate(before[key]):
                fraction = kept[key][layer] / total if total else None
                # viridis is dark below ~0.55 and light (green to yellow) above: white text on dark, black on light.
                color = "black" if fraction is None or fraction > 0.55 else "white"
                label = f"{kept[key][layer]}/{total}" if total else "none"
                axis.text(layer, row, label, ha="center", va="center", fontsize=8, color=color, fontweight="bold")
        axis.set_yticks(range(len(keys)), keys, fontsize=8)
        axis.set_xticks(range(width), [f"layer {i}" for i in range(width)], fontsize=8)
        axis.set_title(f"{task}: heads / FFN neurons kept (kept/total)")
        bar = figure.colorbar(image, ax=axis, fraction=0.04)
        bar.set_label("fraction kept")
    figure.text(
        0.01,
        0.01,
        "grey cell: no such layer (that encoder has fewer layers than the longest one); 'none': a sub-block "
        "with no prunable units",
        fontsize=8,
    )
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_plots(
    output_dir: Path, histories: dict[str, list[dict[str, float]]], pruning_reports: dict[str, dict[str, Any]]
) -> dict[str, Path]:
    plots = Path(output_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    return {
        # The ablations' many runs (targets x seeds x rows) would bury the stages' curves.
        "losses": plot_losses(
            {name: h for name, h in histories.items() if not name.startswith("ablation_")},
            plots / "training_losses.png",
        ),
        "sparsity": plot_sparsity(histories, plots / "expected_sparsity.png"),
        "kept": plot_kept_structures(pruning_reports, plots / "kept_structures.png"),
    }


# The paper's headline: the pruned student keeps 98.4% of the teacher's task score at 2.2x its speed; the bar a
# demo row passes is >= 98.4% retained at >= 2x faster.
PAPER_RETAINED = 98.4
PAPER_SPEEDUP = 2.0


def _retained(score: float, teacher: float) -> float:
    return 100 * score / teacher if teacher else float("nan")


def results_table(task: str, metrics: dict[str, dict[str, float]], benchmark: list[dict[str, Any]]) -> str:
    """Markdown table teacher | student | pruned (| ablations) for one task, on its primary metric (task
    registry), with the paper's bar (>= 98.4% of the teacher at >= 2x faster) for the compressed rows; for
    retrieval, ITC-only recall beside the re-ranked one (and ITM-only recall when the re-ranking score adds ITC)."""
    metric = task_spec(task).primary_metric
    teacher_score = metrics["teacher"][metric]
    heads = [name for name in ("itc", "itm") if task == "retrieval" and f"{name}_{metric}" in metrics["teacher"]]
    extra = "".join(f" {name.upper()}-only {metric} |" for name in heads)
    header = f"| {task} | params (M) | GFLOPs | median latency (ms) | speedup | {metric} |{extra}"
    lines = [
        header + f" % of teacher | paper bar (≥ {PAPER_RETAINED}% at ≥ {PAPER_SPEEDUP:g}x) |",
        "|" + "---|" * (header.count("|") + 1),
    ]
    for row in benchmark:
        score = metrics[row["name"]][metric]
        retained = _retained(score, teacher_score)
        verdict = "—"
        if row["name"] != "teacher":
            verdict = "pass" if retained >= PAPER_RETAINED and row["speedup"] >= PAPER_SPEEDUP else "fail"
        head_cells = "".join(f" {metrics[row['name']].get(f'{name}_{metric}', float('nan')):.4f} |" for name in heads)
        lines.append(
            f"| {row['name']} | {row['parameters'] / 1e6:.2f} | {row['gflops']:.3f} | {row['median_ms']:.1f} "
            f"| {row['speedup']:.2f}x | {score:.4f} |{head_cells} {retained:.2f}% | {verdict} |"
        )
    return "\n".join(lines)


def baseline_lines(run: Any, task: str) -> list[str]:
    """What the scores compare against: answer-prior baselines (majority, question text only) for VQA and
    NLVR2, chance and ITC-only recall for retrieval."""
    metrics = run.metrics[task]
    teacher, student = metrics["teacher"], metrics["student"]
    metric = task_spec(task).primary_metric
    lines = []
    if task == "vqa":
        vqa = run.stats["vqa"]
        lines.append(
            f"Baselines (VQA accuracy): majority answer of the question type {vqa['majority_baseline_vqa']:.4f}; "
            f"question text only (no image) {vqa['text_only_baseline_vqa']:.4f}; teacher minus text-only: "
            f"{teacher[metric] - vqa['text_only_baseline_vqa']:+.4f}."
        )
    if task == "retrieval":
        k, score = run.settings.retrieval_k, run.settings.retrieval_itm_score
        lines.append(
            f"Retrieval ranks the top {k} ITC candidates of every query by the ITM head's {ITM_SCORE_WORDS[score]} "
            f"(`efficientvlm evaluate --k {k} --itm_score {score}`; X-VLM re-ranks 128 on Flickr30K, by the raw "
            f"match logit). ITC alone: teacher "
            f"{teacher['itc_r_mean']:.4f}, re-ranked {teacher['r_mean']:.4f} "
            f"({'re-ranking helps' if teacher['r_mean'] > teacher['itc_r_mean'] else 're-ranking does not help'}"
            " the teacher)."
        )
        share = (run.settings.task_config_overrides or {}).get("retrieval", {}).get("itm_caption_negatives", 0)
        if share:
            lines.append(
                f"Its models learn ITM with the image's caption negative (its caption with one colour, shape, cell or "
                f"count changed) as the negative text of {share:.0%} of the images (`itm_caption_negatives`)."
            )
        if "itm_r_mean" in teacher:
            ahead = teacher["itm_r_mean"] > teacher["itc_r_mean"]
            lines.append(
                f"The ITM log-odds alone rank the teacher's candidates at {teacher['itm_r_mean']:.4f}, "
                + ("above" if ahead else "below")
                + f" ITC alone ({teacher['itc_r_mean']:.4f}): "
                + (
                    "the ITM head is the better judge."
                    if ahead
                    else "the ITM head, trained on one negative per pair, does not yet judge better than ITC, "
                    "trained on the whole batch; the sum keeps what ITC knows."
                )
            )
        test_images = run.stats.get("retrieval", {}).get("test_images") or run.settings.num_eval_images
        lines.append(f"Chance recall@1 for text retrieval is {1 / test_images:.4f} ({test_images} test images).")
    if task == "nlvr2":
        nlvr2 = run.stats["nlvr2"]
        lines.append(
            f"Baselines (accuracy): 0.5 (chance; labels are balanced); majority label of the training statements "
            f"{nlvr2.get('majority_baseline', float('nan')):.4f}; sentence text only "
            f"{nlvr2.get('text_only_baseline', float('nan')):.4f}."
        )
    lines.append(teacher_student_line(teacher[metric], student[metric], run.stats.get("num_records", {}), task))
    return lines


# What one record of a task's test split (`<task>_test` in the corpus's counts) is: the unit of the score's
# sampling error.
_TEST_UNITS = {"vqa": "questions", "nlvr2": "statements", "retrieval": "images"}


def teacher_student_line(teacher: float, student: float, num_records: dict[str, int], task: str) -> str:
    """Whether the teacher leads its unpruned student, measured against the binomial standard error of one score on
    the task's test items, sqrt(p (1 - p) / n) (for recall, per image) with p the teacher's or the student's score,
    whichever gives the larger error (a perfect score alone has none): a lead under twice it is read as a tie."""
    head = f"Teacher {teacher:.4f} vs unpruned student {student:.4f}: "
    unit, count = _TEST_UNITS.get(task, "items"), num_records.get(f"{task}_test")
    error = (max(0.0, *(p * (1 - p) for p in (teacher, student))) / count) ** 0.5 if count else None
    if teacher <= student:
        margin = ""
        if student > teacher and error is not None:
            beyond = "more" if student - teacher >= 2 * error else "less"
            margin = (
                f" (ahead by {student - teacher:.4f}, {beyond} than twice the standard error of a score on {count} "
                f"test {unit}, {error:.4f})"
            )
        return head + (
            f"**the student is not behind the teacher**{margin}: distillation may have taken it past its teacher, "
            "the teacher may be under-trained, or the two tie within the run-to-run spread of this metric (repeat "
            "with other seeds to tell); either way '% of teacher' may overstate what compression keeps."
        )
    if error is None:
        return head + "the teacher is ahead."
    if teacher - student >= 2 * error:
        return (
            head
            + "the teacher is ahead, by more than twice the standard error of a score on "
            + f"{count} test {unit} ({error:.4f})."
        )
    return head + (
        f"the teacher is ahead by {teacher - student:.4f}, less than twice the standard error of a score on {count} "
        f"test {unit} ({error:.4f}): **read it as a tie** (a larger test split or other seeds would tell)."
    )


ABLATION_LABELS = {"learned": "learned, modal-adaptive", "random": "random masks", "uniform": "uniform split"}


def _spread(values: list[float]) -> str:
    """`mean` and, over more than one seed, `± standard deviation (min to max)`."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {statistics.stdev(values):.4f} ({min(values):.4f} to {max(values):.4f})"


def ablation_table(title: str, rows: list[Any], fixed_steps: int, metric: str) -> list[str]:
    """Markdown table of ablation rows (`trainers.demo.run.AblationRow`, one target): per kind of masks, the seeds,
    sparsity and GFLOPs, `metric` right after masking and after `fixed_steps` fixed-mask steps, and the learned
    masks' lead over that row per seed (mean ± std, min to max); then a sentence with the verdict."""
    kinds = list(dict.fromkeys(row.kind for row in rows))
    by_kind = {kind: [row for row in rows if row.kind == kind] for kind in kinds}
    learned = {row.seed: row for row in by_kind.get("learned", [])}
    lines = [
        f"| {title}: masks | seeds | sparsity | GFLOPs | {metric} right after masking | {metric} after "
        f"{fixed_steps} fixed-mask steps | learned minus this row (after training) |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for kind in kinds:
        own = by_kind[kind]
        lead = ""
        if kind != "learned":
            gaps = [learned[r.seed].after_training - r.after_training for r in own if r.seed in learned]
            lead = _spread(gaps) if gaps else ""
            if gaps:
                mean = statistics.mean(gaps)
                wins = sum(gap > 0 for gap in gaps)
                verdict = "beat" if mean > 0 and wins == len(gaps) else "do **not** consistently beat"
                verdicts.append(
                    f"{verdict} {ABLATION_LABELS.get(kind, kind)} (by {mean:+.4f} on average; ahead in {wins} of "
                    f"{len(gaps)} seeds)"
                )
        masking = [r.after_masking for r in own if r.after_masking is not None]
        lines.append(
            f"| {ABLATION_LABELS.get(kind, kind)} | {', '.join(str(r.seed) for r in own)} "
            f"| {_spread([r.sparsity for r in own])} | {_spread([r.gflops for r in own])} "
            f"| {_spread(masking) if masking else '—'} | {_spread([r.after_training for r in own])} | {lead or '—'} |"
        )
    if verdicts:
        lines += ["", f"{title}: after the same fixed-mask training, the learned masks {'; they '.join(verdicts)}."]
    return lines


def ablation_lines(run: Any, task: str) -> list[str]:
    """Whether the learned, modal-adaptive masks beat random masks and a uniform split at the same sparsity:
    the ablation table over the seeds, with how it was measured."""
    rows = getattr(run, "ablation_results", {}).get(task)
    if not rows:
        return []
    metric = task_spec(task).primary_metric
    compared = "ITC-only r_mean" if task == "retrieval" else metric
    learn_steps, fixed_steps = run.settings.pruning_schedule(task)
    lines = [
        "Ablations, at each target: the same student pruned to the sparsity the learned masks reached with random "
        "masks (units drawn at random until that share of the prunable parameters is gone) and with a uniform "
        "split (every kind of structure in every layer of every modality cut alike, lowest learned mask scores "
        f"first). Every row then trains {fixed_steps} steps with its masks fixed (same schedule, learning rate and "
        f"distillation from the teacher); the learned masks first learned for {learn_steps} steps with the weights, "
        "so 'right after masking' is after those steps for them and straight from the student for the others. "
        f"Compared on {compared} of the held-out split"
        + (" (ITM re-ranking of every model at k = 128 would cost about a minute each)" if task == "retrieval" else "")
        + "; mean ± standard deviation (min to max) over the seeds of the pruning stage.",
    ]
    for target in dict.fromkeys(row.target for row in rows):
        title = f"{task} at target sparsity {target:g}"
        lines += ["", *ablation_table(title, [row for row in rows if row.target == target], fixed_steps, compared)]
    return lines


def _pipelines_note(jobs: int, niceness: dict[str, int] | None = None) -> str:
    if jobs == 1:
        return ""
    lowered = {task: n for task, n in (niceness or {}).items() if n}
    priority = (
        f", {', '.join(t for t in niceness if t not in lowered)} at normal CPU priority and "
        f"{', '.join(lowered)} at niceness {max(lowered.values())}"
        if lowered
        else ""
    )
    return f" (the task pipelines {jobs} at a time, 1 thread each{priority})"


def write_report(run: Any, plots: dict[str, Path]) -> Path:
    """`report.md`: the machine, the results tables with baselines and the paper's bar, the modality split
    pruning chose, the ablations, time per stage and the plots."""
    out = Path(run.output_dir)
    s = run.settings
    machine = run.machine
    lines = [
        "# EfficientVLM demo report",
        "",
        f"Teacher {s.teacher_layers[0]} vision / {s.teacher_layers[1]} text / {s.teacher_layers[2]} fusion layers "
        f"(width {s.hidden_size}); student {s.student_layers[0]}/{s.student_layers[1]}/{s.student_layers[2]}, "
        f"pruned to a global target sparsity of {s.target_sparsity}. Latency: median CPU time of the encoders "
        f"(vision, text, fusion) on the same batch of {s.benchmark_batch_size}, measured side by side in this run; "
        "GFLOPs are the encoders' too, params the whole model's (task heads included). One run's medians: "
        "`efficientvlm benchmark --models <folders> --rounds 6` re-measures them with their spread.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores available, {machine['torch_threads']} torch "
        f"thread(s){_pipelines_note(run.jobs, run.pipeline_priorities)}, torch {machine['torch']} with its "
        "deterministic algorithms; "
        f"seed {run.seed}; total {run.timings.get('total', 0) / 60:.1f} min.",
        "",
    ]
    for task in run.tasks:
        lines += [f"## {task}", "", results_table(task, run.metrics[task], run.benchmarks[task]), ""]
        lines += [line + "\n" for line in baseline_lines(run, task)]
        ablations = ablation_lines(run, task)
        lines += ablations + ([""] if ablations else [])
        report = run.pruning_reports[task]
        split = ", ".join(f"{m} {v:.3f}" for m, v in report["sparsity_per_modality"].items())
        snap = report.get("snap_to_target")
        snapped = (
            f" The multipliers had brought the masks to {snap['sparsity_before']:.3f}; they were snapped to the "
            f"target (one log-alpha offset, {snap['offset']:+.2f}, for every unit)."
            if snap
            else ""
        )
        lines += [
            f"Pruning reached sparsity {report['sparsity']:.3f} of the prunable parameters "
            f"(target {report['target_sparsity']}); per modality: {split}.{snapped}",
            "",
        ]
    lines += ["## Time per stage", "", "| stage | optimizer steps | seconds | share |", "|---|---|---|---|"]
    total = run.timings.get("total", sum(run.timings.values()))
    for name, seconds in run.timings.items():
        if name == "total":
            continue
        steps = run.stage_steps.get(name, "")
        lines.append(f"| {name} | {steps} | {seconds:.0f} | {100 * seconds / total:.0f}% |")
    other = total - sum(v for k, v in run.timings.items() if k != "total")
    lines.append(f"| other (between stages) | | {other:.0f} | {100 * other / total:.0f}% |")
    lines.append(f"| **total** | {sum(run.stage_steps.values())} | {total:.0f} | 100% |")
    lines += ["", "Training runs inside the stages above (not added again to the total):", ""]
    if run.jobs > 1:
        lines += [
            f"The task pipelines ran {run.jobs} at a time, so their runs overlap: each run's seconds are its "
            "own, on cores it shared.",
            "",
        ]
    lines += ["| training run | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in run.run_timings.items()]
    lines += ["", "## Plots", ""]
    lines += [f"![{name}](plots/{path.name})" for name, path in plots.items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
