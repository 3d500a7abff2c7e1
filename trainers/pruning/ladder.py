"""A sparsity ladder: one pruning run that saves a physically pruned model at each of several sparsities.

With `PruningConfig.sparsity_ladder = (0.2, 0.35, 0.5)` the global target of the [`SparsityLagrangian`] climbs
rung by rung (each rung warms up from the previous one: the schedule itself lives in `SparsityLagrangian.target`).
[`SparsityLadder`], a `TrainerCallback`, decides when a rung is done and saves it:

- a rung has *settled* once its target is fully warmed up and the sparsity of the deterministic masks (what
  would be saved: the expected number of units per layer, rounded) stays within `ladder_tolerance` (default
  0.01) of it for `ladder_patience` (default 3) consecutive optimizer steps. The saved sparsity, not the expected
  one, is checked: on small models the per-layer rounding can put them a few hundredths apart;
- a rung that has not settled by the end of its share of the run (rung i of n: step `max_steps * (i + 1) / n`)
  is saved there anyway, marked `"settled_by": "step_budget"` in its report (and a warning is logged).

Saving a rung prunes a copy of the student with the deterministic masks of that moment (which keep the expected
number of units per layer) and writes it as a
complete carded folder `OUTPUT/rung_0.20/` with its `pruning_report.json` (`trainers.saving.save_model_folder`),
so a settled rung's saved sparsity is within `ladder_tolerance` of the rung;
the optional evaluation runs on that pruned copy, so the metric is that of the saved model. Training then goes on
with the unpruned, masked student toward the next rung; it stops once the last rung is saved. [`ladder_table`]
benchmarks the rungs against the unpruned student (parameters, FLOPs, speedup) and [`write_ladder_table`] writes
`ladder.md`, `ladder.json` and `ladder.png` (metric, or sparsity without an evaluation set, vs speedup).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from modeling_efficientvlm.loading_efficientvlm import PRUNING_REPORT_FILE

if TYPE_CHECKING:
    from .trainer import ModalAdaptivePruningTrainer

logger = logging.get_logger(__name__)

LADDER_TABLE_NAME = "ladder"


def parse_sparsity_ladder(value: str | Sequence[float]) -> tuple[float, ...]:
    """The rungs of `--sparsity_ladder` ("0.2,0.35,0.5" or a sequence of numbers): at least two, each in (0, 1),
    strictly increasing; anything else raises a ValueError naming `sparsity_ladder`."""
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(",")]
        if any(not part for part in parts):
            raise ValueError(f"`sparsity_ladder` has an empty rung (a stray comma?); got {value!r}.")
        try:
            rungs = [float(part) for part in parts]
        except ValueError as error:
            raise ValueError(
                f"`sparsity_ladder` must be comma-separated numbers like 0.2,0.35,0.5; got {value!r}."
            ) from error
    else:
        rungs = list(value)
        for rung in rungs:
            if isinstance(rung, bool) or not isinstance(rung, (int, float)):
                raise ValueError(f"`sparsity_ladder` must hold numbers; got {rung!r} in {value!r}.")
    if len(rungs) < 2:
        raise ValueError(f"`sparsity_ladder` needs at least two rungs (use `target_sparsity` for one); got {value!r}.")
    for rung in rungs:
        if not 0.0 < rung < 1.0:
            raise ValueError(f"Every rung of `sparsity_ladder` must be in (0, 1); got {rung} in {value!r}.")
    if any(b <= a for a, b in zip(rungs, rungs[1:])):
        raise ValueError(f"`sparsity_ladder` must be sorted in strictly increasing order; got {value!r}.")
    for a, b in zip(rungs, rungs[1:]):
        if rung_folder_name(a) == rung_folder_name(b):
            raise ValueError(
                f"Rungs {a} and {b} of `sparsity_ladder` would both be saved as {rung_folder_name(a)}/: give rungs "
                f"that differ in the second decimal; got {value!r}."
            )
    return tuple(float(rung) for rung in rungs)


def rung_folder_name(target: float) -> str:
    """`rung_0.20` for the rung with target 0.2."""
    return f"rung_{target:.2f}"


@dataclass
class LadderOutputs:
    """How each rung's folder is evaluated and carded.

    Args:
        evaluate: `evaluate(pruned_model, rung_dir) -> metrics`, run on the pruned copy before it is saved.
        card: `card(metrics) -> ModelCardInfo` for the rung's model card (default: one for the model's task).
        processor: saved with every rung (default: the trainer's `processing_class`).
        answer_candidates: VQA candidate answers saved in each rung's config.
    """

    evaluate: Callable[[nn.Module, str], dict[str, float]] | None = None
    card: Callable[[dict[str, float]], Any] | None = None
    processor: Any = None
    answer_candidates: list[str] | None = None


@dataclass
class LadderRung:
    """One saved rung: its target, when and why it was saved, its folder, pruning report and metrics."""

    rung: int
    target: float
    step: int
    settled_by: str
    output_dir: str
    report: dict[str, Any] = field(repr=False)
    metrics: dict[str, float] = field(default_factory=dict)


class SparsityLadder(TrainerCallback):
    """Watches the expected sparsity after every optimizer step, saves each rung once it has settled (or its
    share of the steps is spent) and moves the Lagrangian's target to the next rung. `rungs` lists what was saved."""

    def __init__(self, trainer: ModalAdaptivePruningTrainer, outputs: LadderOutputs | None = None) -> None:
        self.trainer = trainer
        self.outputs = outputs or LadderOutputs()
        self.rungs: list[LadderRung] = []
        self._max_steps = 0

    @property
    def ladder(self) -> tuple[float, ...]:
        return self.trainer.lagrangian.ladder

    def on_train_begin(self, args, state, control, **kwargs):
        # The pruning trainer's own callback, before this one, has laid the schedule (a resume keeps the checkpoint's)
        # and the rungs' warm-up.
        self._max_steps = self.trainer.schedule_steps
        self._restore_saved_rungs(args.output_dir, state.global_step)
        self.check_step_budgets()

    def check_step_budgets(self) -> None:
        """Raises a ValueError when a rung's share of the steps (from the previous rung's step budget to its own)
        is shorter than its target's warm-up, or empty: it could not reach its target before it is saved, and with
        fewer steps than rungs two rungs would share a budget step, so that the last ones were never saved."""
        warmup = self.trainer.lagrangian.warmup_steps
        needed = max(1, warmup)  # a rung must reach its target (warm up) and be saved: at least one step of its own
        budgets = [0, *(self.step_budget(rung) for rung in range(len(self.ladder)))]
        for rung, target in enumerate(self.ladder):
            share = budgets[rung + 1] - budgets[rung]
            if share >= needed:
                continue
            ladder = ",".join(f"{value:g}" for value in self.ladder)
            config = self.trainer.pruning_config
            if config.sparsity_warmup_steps is not None and warmup > 1:
                why = f"the {needed} steps of its warm-up to its target (--sparsity_warmup_steps {warmup})"
            else:
                why = "the 1 step it needs at least to reach its target and be saved"
            raise ValueError(
                f"--sparsity_ladder {ladder} has {len(self.ladder)} rungs, and {self._max_steps} training steps "
                f"(--max_steps, or the epochs' steps) leave rung {target:g} {share} step(s) of its own, fewer than "
                f"{why}: it would not be reached, or never saved. Give at least {needed * len(self.ladder)} steps, "
                "fewer rungs or a shorter warm-up."
            )

    def _restore_saved_rungs(self, output_dir: str, step: int) -> None:
        """On a resume (the Lagrangian is back on a later rung), lists the rungs already saved in `output_dir`."""
        current = self.trainer.lagrangian.rung
        for index in range(len(self.rungs), len(self.ladder)):
            folder = os.path.join(output_dir, rung_folder_name(self.ladder[index]))
            report_path = Path(folder, PRUNING_REPORT_FILE)
            if not report_path.is_file():
                if index < current:  # saved by the run being resumed, but not in this output folder
                    logger.warning(
                        f"Sparsity ladder: resuming on rung {self.ladder[current]}, but rung {self.ladder[index]} "
                        f"has no {report_path}: the ladder's table will lack it (resume in the run's --output_dir)."
                    )
                break
            report = json.loads(report_path.read_text())
            saved_at = report.get("ladder", {}).get("step", step + 1)
            # The rungs below the current one were saved; the current one only if it is the last and was saved.
            if index > current or (index == current and (index + 1 < len(self.ladder) or saved_at > step)):
                break
            metrics_path = Path(folder, "eval_results.json")
            metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
            settled_by = report["ladder"]["settled_by"]
            self.rungs.append(LadderRung(index, self.ladder[index], saved_at, settled_by, folder, report, metrics))

    @property
    def finished(self) -> bool:
        """Whether the last rung is saved, and so every rung (the run then stops before its last step, on purpose;
        a resume outside the run's output folder lists fewer rungs, saved in the other one)."""
        return bool(self.rungs) and self.rungs[-1].rung == len(self.ladder) - 1

    def on_train_end(self, args, state, control, **kwargs):
        if self.finished:
            return
        # The rungs below the current one were saved (by this run, or the one it resumed).
        missing = ", ".join(rung_folder_name(target) for target in self.ladder[self.trainer.lagrangian.rung :])
        logger.warning(
            f"Sparsity ladder: training ended at step {state.global_step} of {state.max_steps} before the last rung "
            f"was saved: {missing} not saved. Resume from the run's last checkpoint to save them."
        )

    def step_budget(self, rung: int) -> int:
        """The step by which rung `rung` is saved even if it has not settled."""
        return round(self._max_steps * (rung + 1) / len(self.ladder))

    def on_step_end(self, args, state, control, **kwargs):
        lagrangian = self.trainer.lagrangian
        rung, step = lagrangian.rung, state.global_step
        if len(self.rungs) > rung:
            # The last rung is saved (a resumed run that had saved it already): the steps left change nothing saved.
            control.should_training_stop = True
            return
        target = self.ladder[rung]
        masker = self.trainer.masker
        sparsity = masker.sparsity_of(self.trainer.final_masks())  # what a save now would achieve
        # Counted on the Lagrangian, which checkpoints save: a resume continues the count.
        if lagrangian.warmed_up(step) and abs(sparsity - target) <= self.trainer.pruning_config.ladder_tolerance:
            lagrangian.steps_in_tolerance += 1
        else:
            lagrangian.steps_in_tolerance = 0
        if lagrangian.steps_in_tolerance >= self.trainer.pruning_config.ladder_patience:
            settled_by = "tolerance"
        elif step >= self.step_budget(rung):
            settled_by = "step_budget"
            logger.warning(
                f"Sparsity ladder: rung {target} did not settle within {self.trainer.pruning_config.ladder_tolerance} "
                f"by step {step} (sparsity {sparsity:.4f}, expected {masker.expected_sparsity().item():.4f}); "
                "saving it anyway."
            )
        else:
            return
        self.save_rung(step, settled_by)
        lagrangian.steps_in_tolerance = 0
        if rung + 1 < len(self.ladder):
            lagrangian.advance_rung(step)
        else:
            control.should_training_stop = True  # every rung is saved: the steps left would change nothing saved

    def save_rung(self, step: int, settled_by: str) -> LadderRung:
        """Prunes a copy of the student with the current deterministic masks, evaluates it (when an `evaluate` was
        given) and saves it as `rung_<target>/` in the output folder."""
        from trainers.saving import default_card, publish_model_folder, save_model_folder
        from trainers.sharding import broadcast_from_first_process, whole_model

        trainer = self.trainer
        rung, target = trainer.lagrangian.rung, trainer.lagrangian.ladder[trainer.lagrangian.rung]
        output_dir = os.path.join(trainer.args.output_dir, rung_folder_name(target))
        # A copy with all the weights (under FSDP / ZeRO-3 gathered into the first process only; None elsewhere).
        pruned = whole_model(trainer, copy_weights=True)
        report, metrics = None, {}
        if pruned is not None:
            report = trainer.prune_with_final_masks(pruned)
            report["ladder"] = {"rung": rung, "rungs": list(self.ladder), "step": step, "settled_by": settled_by}
            pruned.eval()
        if trainer.args.should_save and pruned is not None:
            processor = self.outputs.processor if self.outputs.processor is not None else trainer.processing_class
            if processor is None:
                raise ValueError(
                    "The sparsity ladder saves each rung with its processor: pass `processing_class=` to the trainer "
                    "or `LadderOutputs(processor=...)`."
                )
            card = self.outputs.card({}) if self.outputs.card is not None else default_card(pruned, "prune")
            # Saved before it is evaluated: an evaluation that fails loses no rung.
            save_model_folder(
                pruned,
                processor,
                output_dir,
                card,
                pruning_report=report,
                answer_candidates=self.outputs.answer_candidates,
            )
            if self.outputs.evaluate is not None:
                metrics = dict(self.outputs.evaluate(pruned, output_dir))
            if metrics and self.outputs.card is not None:
                publish_model_folder(output_dir, pruned, self.outputs.card(metrics), pruning_report=report)
        report, metrics = broadcast_from_first_process((report, metrics))
        if trainer.args.should_save:  # the process that wrote it says so, once
            logger.warning(
                f"Sparsity ladder: rung {target} at step {step} ({settled_by}): sparsity {report['sparsity']:.4f}, "
                f"{report['parameters_before']:,} -> {report['parameters_after']:,} parameters; saved to {output_dir}."
            )
        saved = LadderRung(rung, target, step, settled_by, output_dir, report, metrics)
        self.rungs.append(saved)
        return saved


def ladder_table(
    reference: nn.Module,
    rungs: Sequence[LadderRung],
    metric: str | None = None,
    batch_size: int = 8,
    text_length: int = 16,
    repeats: int = 5,
    rounds: int = 2,
) -> list[dict[str, Any]]:
    """One row per rung (and a first one for the unpruned `reference`): target, achieved sparsity, `metric` (when
    the rung was evaluated), parameters, encoder GFLOPs, median latency and speedup against the reference, from
    `trainers.benchmark.run_benchmark` (the encoders workload on random inputs, as `efficientvlm benchmark` and
    the demo time them). Each rung's model is reloaded from its folder with `from_pretrained` of the reference's
    class: the saved models are what is timed."""
    from trainers.benchmark import BenchmarkSettings, prebuilt_models, run_benchmark

    if not rungs:
        raise ValueError("No rungs were saved: nothing to tabulate.")
    models = {"unpruned": reference}
    for rung in rungs:
        models[rung_folder_name(rung.target)] = type(reference).from_pretrained(rung.output_dir)
    settings = BenchmarkSettings(batch_sizes=(batch_size,), text_length=text_length, repeats=repeats, rounds=rounds)
    benchmarks = run_benchmark(prebuilt_models(models), settings).results
    rows = []
    for benchmark, rung in zip(benchmarks, [None, *rungs]):
        row: dict[str, Any] = {
            "name": benchmark.name,
            "rung": None if rung is None else rung.rung,
            "target_sparsity": 0.0 if rung is None else rung.target,
            "sparsity": 0.0 if rung is None else rung.report["sparsity"],
            "step": None if rung is None else rung.step,
            "settled_by": None if rung is None else rung.settled_by,
            "metric": metric,
            "metric_value": None if rung is None or metric is None else rung.metrics.get(metric),
            "parameters": benchmark.parameters,
            "encoder_parameters": benchmark.encoder_parameters,
            "gflops": benchmark.gflops,
            "median_ms": benchmark.median_ms,
            "flops_reduction": benchmark.flops_reduction,
            "speedup": benchmark.speedup,
            "output_dir": None if rung is None else rung.output_dir,
        }
        rows.append(row)
    return rows


def format_ladder_table(rows: Sequence[dict[str, Any]]) -> str:
    """The Markdown table of [`ladder_table`]'s rows."""
    metric = next((row["metric"] for row in rows if row["metric"]), None)
    lines = [
        f"| model | target | achieved sparsity | step | settled by | {metric or 'metric'} | params (M) "
        "| encoder GFLOPs | median latency (ms) | FLOPs reduction | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        value = "-" if row["metric_value"] is None else f"{row['metric_value']:.4f}"
        lines.append(
            f"| {row['name']} | {row['target_sparsity']:.2f} | {row['sparsity']:.4f} | {row['step'] or '-'} "
            f"| {row['settled_by'] or '-'} | {value} | {row['parameters'] / 1e6:.3f} | {row['gflops']:.4f} "
            f"| {row['median_ms']:.2f} | {row['flops_reduction']:.2f}x | {row['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def write_ladder_table(rows: Sequence[dict[str, Any]], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes `ladder.md`, `ladder.json` and `ladder.png` (the rungs' metric, or their achieved sparsity when none
    was evaluated, against their speedup) to `output_dir`; returns the three paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: output_dir / f"{LADDER_TABLE_NAME}.{kind}" for kind in ("md", "json", "png")}
    paths["md"].write_text(format_ladder_table(rows))
    paths["json"].write_text(json.dumps({"rows": list(rows)}, indent=2))
    evaluated = all(row["metric_value"] is not None for row in rows[1:])
    metric = rows[0]["metric"] if evaluated else None
    figure, axis = plt.subplots(figsize=(5.5, 4))
    points = [(row["speedup"], row["metric_value"] if metric else row["sparsity"]) for row in rows[1:]]
    axis.plot(*zip(*points), marker="o")
    for row, (x, y) in zip(rows[1:], points):
        axis.annotate(f"{row['target_sparsity']:.2f}", (x, y), textcoords="offset points", xytext=(4, 4))
    axis.set(
        xlabel="speedup over the unpruned student (encoders)",
        ylabel=metric or "achieved sparsity (no evaluation set)",
        title="Sparsity ladder: one pruning run",
    )
    figure.tight_layout()
    figure.savefig(paths["png"], dpi=120)
    plt.close(figure)
    return paths


__all__ = [
    "LADDER_TABLE_NAME",
    "LadderOutputs",
    "LadderRung",
    "SparsityLadder",
    "format_ladder_table",
    "ladder_table",
    "parse_sparsity_ladder",
    "rung_folder_name",
    "write_ladder_table",
]
