"""The sparsity ladder: one pruning run saves a physically pruned, carded model at each rung."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from transformers import TrainerCallback

from modeling_efficientvlm import EfficientVLMConfig
from modeling_efficientvlm.loading_efficientvlm import PRUNING_REPORT_FILE
from trainers.pruning import PruningConfig, SparsityLagrangian, parse_sparsity_ladder
from trainers.pruning.ladder import ladder_table, rung_folder_name, write_ladder_table

from .data_utils import make_processor
from .test_pruning import ModalityTask, TinyImageTextClassifier, _args, _trainer

LADDER = (0.2, 0.35, 0.5)


def test_one_run_saves_every_rung_at_its_own_sparsity(tmp_path) -> None:
    # Fast mask learning on the tiny student: the expected sparsity climbs ~0.01 per step through the rungs.
    pruning = PruningConfig(
        sparsity_ladder=LADDER,
        sparsity_warmup_steps=3,
        mask_learning_rate=0.1,
        lagrangian_learning_rate=0.1,
        ladder_tolerance=0.015,
        ladder_patience=2,
    )
    args = _args(tmp_path, max_steps=90, logging_steps=1000)
    trainer = _trainer(tmp_path, pruning=pruning, args=args, processing_class=make_processor(tmp_path))
    trainer.train()
    rungs = trainer.ladder.rungs
    assert [rung.target for rung in rungs] == list(LADDER)
    assert [rung.settled_by for rung in rungs] == ["tolerance"] * 3
    assert rungs[0].step < rungs[1].step < rungs[2].step
    assert not trainer.pruned  # training went on with the unpruned, masked student ...
    assert trainer.state.global_step == rungs[-1].step < 90  # ... and stopped once the last rung was saved
    batch = torch.utils.data.default_collate([ModalityTask("text")[i] for i in range(4)])
    sizes = []
    for rung in rungs:
        folder = tmp_path / rung_folder_name(rung.target)
        report = json.loads((folder / PRUNING_REPORT_FILE).read_text())
        assert report["target_sparsity"] == rung.target
        assert report["ladder"]["rung"] == rung.rung and report["ladder"]["settled_by"] == "tolerance"
        assert abs(report["sparsity"] - rung.target) <= 0.015  # the settle tolerance is on the saved sparsity
        reloaded = TinyImageTextClassifier.from_pretrained(folder).eval()
        assert reloaded.structure_sizes() == report["padding"]["structures_after"]
        assert sum(p.numel() for p in reloaded.parameters()) == report["parameters_after"]
        with torch.no_grad():
            logits = reloaded(**batch).logits
        assert logits.shape == (4, 2) and torch.isfinite(logits).all()
        sizes.append(report["parameters_after"])
    assert sizes[0] > sizes[1] > sizes[2]

    rows = ladder_table(trainer.model, rungs, repeats=1, rounds=1)
    assert [row["name"] for row in rows] == ["unpruned", *(rung_folder_name(t) for t in LADDER)]
    assert [row["parameters"] for row in rows[1:]] == sizes
    assert rows[0]["flops_reduction"] == 1.0 and all(row["flops_reduction"] > 1.0 for row in rows[1:])
    paths = write_ladder_table(rows, tmp_path)
    table = paths["md"].read_text()
    assert all(f"| {rung_folder_name(t)} | {t:.2f} |" in table for t in LADDER)
    assert [row["target_sparsity"] for row in json.loads(paths["json"].read_text())["rows"]] == [0.0, *LADDER]
    assert paths["png"].stat().st_size > 0


def test_resuming_keeps_the_rung_and_the_rungs_already_saved(tmp_path, caplog) -> None:
    def run(resume=None):
        pruning = PruningConfig(
            sparsity_ladder=LADDER, sparsity_warmup_steps=3, mask_learning_rate=0.1, lagrangian_learning_rate=0.1
        )
        args = _args(tmp_path, max_steps=60, logging_steps=1000, save_strategy="steps", save_steps=30)
        trainer = _trainer(tmp_path, pruning=pruning, args=args, processing_class=make_processor(tmp_path))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    first = run()
    saved = [(rung.target, rung.step) for rung in first.ladder.rungs]
    # Resumed from a checkpoint taken after the last rung was saved, the run stops at once (it trained on to the
    # last step for nothing).
    from transformers import TrainerControl

    control = TrainerControl()
    first.ladder.on_step_end(first.args, first.state, control)
    assert first.ladder.finished and control.should_training_stop
    before_checkpoint = [item for item in saved if item[1] <= 30]
    assert before_checkpoint and len(saved) > len(before_checkpoint)
    resumed = run(str(tmp_path / "checkpoint-30"))
    assert resumed.lagrangian.rung == first.lagrangian.rung
    assert [(rung.target, rung.step) for rung in resumed.ladder.rungs][: len(before_checkpoint)] == before_checkpoint
    assert [rung.target for rung in resumed.ladder.rungs] == [rung.target for rung in first.ladder.rungs]
    # The count of steps within tolerance travels in the checkpoint: the rungs settle at the same steps.
    assert [(rung.target, rung.step) for rung in resumed.ladder.rungs] == saved
    state = resumed.pruning_state_dict()
    assert state["ladder"] == LADDER and state["steps_in_tolerance"] == resumed.lagrangian.steps_in_tolerance
    # A rung saved before the checkpoint but missing from the output folder is named, not silently left out.
    shutil.rmtree(tmp_path / rung_folder_name(before_checkpoint[0][0]))
    with caplog.at_level("WARNING"):
        again = run(str(tmp_path / "checkpoint-30"))
    assert f"rung {before_checkpoint[0][0]} has no" in caplog.text and "the ladder's table will lack it" in caplog.text
    assert [rung.target for rung in again.ladder.rungs] == [target for target, _ in saved[1:]]


def test_a_ladder_without_steps_for_every_rung_is_refused(tmp_path) -> None:
    """3 rungs in 2 steps: two rungs shared step 1's budget and the last was never saved, silently (exit 0)."""
    pruning = PruningConfig(sparsity_ladder=(0.1, 0.2, 0.3))
    trainer = _trainer(
        tmp_path, pruning=pruning, args=_args(tmp_path, max_steps=2), processing_class=make_processor(tmp_path)
    )
    message = (
        "--sparsity_ladder 0.1,0.2,0.3 has 3 rungs, and 2 training steps (--max_steps, or the epochs' steps) leave "
        "rung 0.2 0 step(s) of its own, fewer than the 1 step it needs at least to reach its target and be saved"
    )
    with pytest.raises(ValueError, match=re.escape(message) + r".*Give at least 3 steps"):
        trainer.train()
    assert trainer.state.global_step == 0 and not list(tmp_path.glob("rung_*"))
    # A warm-up longer than a rung's share: the rung would be saved before it reached its target.
    pruning = PruningConfig(sparsity_ladder=LADDER, sparsity_warmup_steps=5)
    trainer = _trainer(
        tmp_path, pruning=pruning, args=_args(tmp_path, max_steps=12), processing_class=make_processor(tmp_path)
    )
    message = "leave rung 0.2 4 step(s) of its own, fewer than the 5 steps of its warm-up to its target"
    with pytest.raises(ValueError, match=re.escape(message) + r".*--sparsity_warmup_steps 5.*at least 15 steps"):
        trainer.train()
    # One step per rung is enough (the default warm-up is then 1 step).
    trainer = _trainer(
        tmp_path,
        pruning=PruningConfig(sparsity_ladder=LADDER),
        args=_args(tmp_path, max_steps=3),
        processing_class=make_processor(tmp_path),
    )
    trainer.train()
    assert [rung.target for rung in trainer.ladder.rungs] == list(LADDER) and trainer.ladder.finished


def test_a_ladder_stopped_before_its_last_rung_says_which_rungs_are_missing(tmp_path, caplog) -> None:
    class StopAfterTheFirstRung(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = bool(trainer.ladder.rungs)

    pruning = PruningConfig(sparsity_ladder=LADDER)
    args = _args(tmp_path, max_steps=6)
    trainer = _trainer(
        tmp_path,
        pruning=pruning,
        args=args,
        processing_class=make_processor(tmp_path),
        callbacks=[StopAfterTheFirstRung()],
    )
    with caplog.at_level("WARNING"):
        trainer.train()
    assert [rung.target for rung in trainer.ladder.rungs] == [0.2] and not trainer.ladder.finished
    step = trainer.state.global_step  # the step after the rung's: the ladder's callback runs after this one
    assert 1 < step < 6
    assert f"ended at step {step} of 6 before the last rung was saved: rung_0.35, rung_0.50 not saved" in caplog.text


def test_the_count_of_settled_steps_is_saved_with_the_masks(tmp_path) -> None:
    def trainer():
        pruning = PruningConfig(sparsity_ladder=LADDER, sparsity_warmup_steps=3)
        return _trainer(tmp_path, pruning=pruning, args=_args(tmp_path, max_steps=10))

    saving = trainer()
    saving.lagrangian.advance_rung(4)
    saving.lagrangian.steps_in_tolerance = 2  # one step short of the default patience when the run stopped
    resumed = trainer()
    resumed.load_pruning_state_dict(saving.pruning_state_dict())
    assert (resumed.lagrangian.rung, resumed.lagrangian.rung_start_step, resumed.lagrangian.steps_in_tolerance) == (
        1,
        4,
        2,
    )


def test_the_rung_target_warms_up_from_the_previous_rung() -> None:
    lagrangian = SparsityLagrangian(warmup_steps=4, sparsity_ladder=LADDER)
    assert [lagrangian.target(step) for step in (0, 2, 4, 9)] == [0.0, 0.1, 0.2, 0.2]
    assert not lagrangian.warmed_up(3) and lagrangian.warmed_up(4)
    lagrangian.advance_rung(10)
    assert lagrangian.targets["overall"] == 0.35
    assert lagrangian.target(10) == 0.2 and lagrangian.target(12) == pytest.approx(0.275)
    assert lagrangian.target(14) == 0.35 and not lagrangian.warmed_up(13)
    lagrangian.advance_rung(20)
    with pytest.raises(ValueError, match="last rung"):
        lagrangian.advance_rung(30)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0.35,0.2,0.5", "strictly increasing"),
        ("0.2,0.2,0.5", "strictly increasing"),
        ("0.2,1.0", r"in \(0, 1\)"),
        ("0,0.5", r"in \(0, 1\)"),
        ("0.3", "at least two rungs"),
        ("0.2,abc", "comma-separated numbers"),
        ("0.2,,0.5", "empty rung"),
        ("0.301,0.304", "both be saved as rung_0.30/"),
    ],
)
def test_bad_ladders_are_named_errors(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"sparsity_ladder.*{message}|{message}.*sparsity_ladder"):
        parse_sparsity_ladder(value)


def test_ladder_conflicts_are_named_errors() -> None:
    with pytest.raises(ValueError, match="`sparsity_ladder` and `target_sparsity` conflict"):
        PruningConfig(target_sparsity=0.3, sparsity_ladder=LADDER)
    with pytest.raises(ValueError, match="`sparsity_ladder` and `mask_freeze_fraction` conflict"):
        PruningConfig(sparsity_ladder=LADDER, mask_freeze_fraction=0.2)
    assert PruningConfig(sparsity_ladder="0.2, 0.35,0.5").sparsity_ladder == LADDER


def test_prune_command_writes_a_folder_per_rung_and_the_table(tmp_path) -> None:
    from modeling_efficientvlm import EfficientVLMForVisualReasoning
    from trainers import commands as cli

    from .data_utils import write_nlvr2_json, write_vocab

    train_file, image_root = write_nlvr2_json(tmp_path, n=4)
    output_dir = tmp_path / "ladder"
    common = ["prune", "--task", "nlvr2", "--preset", "tiny-student", "--output_dir", str(output_dir)]
    argv = [
        *common,
        "--vocab_file", str(write_vocab(tmp_path)),
        "--train_file", str(train_file),
        "--eval_file", str(train_file),
        "--image_root", str(image_root),
        "--sparsity_ladder", "0.2,0.35,0.5",
        "--snap_to_target",  # 6 steps cannot settle three rungs: each folder is brought to its rung
        "--mask_learning_rate", "0.5",
        "--max_steps", "6",
        "--per_device_train_batch_size", "4",
        "--report_to", "none",
        "--use_cpu",
        "--save_strategy", "no",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    rows = json.loads((output_dir / "ladder.json").read_text())["rows"]
    assert [row["target_sparsity"] for row in rows] == [0.0, *LADDER]
    assert all(row["metric"] == "nlvr2_accuracy" and row["metric_value"] is not None for row in rows[1:])
    assert (output_dir / "ladder.md").is_file() and (output_dir / "ladder.png").is_file()
    for target in LADDER:
        folder = output_dir / rung_folder_name(target)
        report = json.loads((folder / PRUNING_REPORT_FILE).read_text())
        metrics = json.loads((folder / "eval_results.json").read_text())
        assert (folder / "README.md").is_file()
        model = EfficientVLMForVisualReasoning.from_pretrained(folder)
        assert sum(p.numel() for p in model.parameters()) == report["parameters_after"]
        assert report["sparsity"] == pytest.approx(target, abs=0.03) and "snap_to_target" in report
        assert (
            model.config.vision_config.hidden_size
            == EfficientVLMConfig.from_preset("tiny-student").vision_config.hidden_size
        )
        assert "nlvr2_accuracy" in metrics
    few_steps = {"--sparsity_ladder": "0.1,0.2,0.3", "--max_steps": "2"}  # what the audit ran: it exited 0
    with pytest.raises(ValueError, match=r"--sparsity_ladder 0.1,0.2,0.3 has 3 rungs, and 2 training steps"):
        cli.main([few_steps.get(previous, value) for previous, value in zip(["", *argv], argv)])
    assert not (output_dir / "rung_0.10").exists()  # refused before the first step
    with pytest.raises(ValueError, match="--sparsity_ladder and --target_sparsity conflict"):
        cli.main([*common, "--sparsity_ladder", "0.2,0.5", "--target_sparsity", "0.3"])
    with pytest.raises(ValueError, match="--sparsity_ladder '0.5,0.2'.*strictly increasing"):
        cli.main([*common, "--sparsity_ladder", "0.5,0.2"])
    with pytest.raises(ValueError, match=r"--sparsity_ladder '0.2,1.5'.*in \(0, 1\)"):
        # A recipe's target_sparsity gives way to the ladder: the flag is what gets checked.
        cli.main([*common, "--recipe", "small-cpu", "--sparsity_ladder", "0.2,1.5"])
    # So does a recipe's fixed-mask second half (paper-vqa's 0.5): the run gets as far as the push check.
    with pytest.raises(ValueError, match="--sparsity_ladder writes one folder per rung; --push_to_hub pushes one"):
        push = ["--push_to_hub", "--hub_model_id", "me/ladder"]
        cli.main([*common, "--recipe", "paper-vqa", "--sparsity_ladder", "0.2,0.5", *push])


def test_a_warmup_fraction_is_of_each_rungs_share_of_the_steps(tmp_path) -> None:
    # Of the whole run, 0.3 of 60 steps (18) would leave the first rung 2 of its 20 steps to settle.
    pruning = PruningConfig(sparsity_ladder=LADDER, sparsity_warmup_fraction=0.3, mask_learning_rate=0.1)
    args = _args(tmp_path, max_steps=60, logging_steps=1000)
    trainer = _trainer(tmp_path, pruning=pruning, args=args, processing_class=make_processor(tmp_path))
    trainer.train()
    assert trainer.lagrangian.warmup_steps == 6  # 0.3 of the rung's 20 steps
    assert len(trainer.ladder.rungs) == 3


def test_a_resume_with_other_batch_settings_keeps_the_rungs_warmup_and_step_budgets(tmp_path, caplog) -> None:
    """Under --num_train_epochs the steps follow the batch settings: a resume with a smaller batch laid the rungs'
    warm-up (--sparsity_warmup_fraction of a rung's share) and step budgets on twice the steps, mid-rung."""
    pruning = PruningConfig(sparsity_ladder=LADDER, sparsity_warmup_fraction=0.3, mask_learning_rate=0.1)
    data = torch.utils.data.Subset(ModalityTask("text"), range(32))  # 6 epochs of 4 batches: rungs of 8 steps

    class StopAt(TrainerCallback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= self.step

    def run(resume=None, stop=10, pruning=pruning, **batch_settings):
        args = _args(tmp_path, max_steps=-1, num_train_epochs=6, save_strategy="steps", save_steps=10, **batch_settings)
        trainer = _trainer(
            tmp_path,
            pruning=pruning,
            args=args,
            train_dataset=data,
            processing_class=make_processor(tmp_path),
            callbacks=[StopAt(stop)],
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    first = run()
    assert first.lagrangian.warmup_steps == 2 and first.ladder.step_budget(1) == 16  # int(0.3 * 8)
    with caplog.at_level("WARNING"):
        resumed = run(str(tmp_path / "checkpoint-10"), stop=11, per_device_train_batch_size=4)
    assert resumed.lagrangian.warmup_steps == 2 and resumed.ladder.step_budget(1) == 16  # not 4 and 32 of 48 steps
    assert "the rungs of --sparsity_ladder saved by steps 8, 16, 24 of its 24 optimizer steps" in caplog.text
    other = PruningConfig(sparsity_ladder=LADDER, sparsity_warmup_fraction=0.5, mask_learning_rate=0.1)
    with pytest.raises(ValueError, match=r"sparsity warm-up fraction 0.3, this run 0.5: resume with the flags"):
        run(str(tmp_path / "checkpoint-10"), pruning=other)
