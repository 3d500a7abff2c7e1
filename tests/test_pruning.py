"""ModalAdaptivePruningTrainer: masks trained with the model under a Lagrangian, checkpoints, physical pruning."""

from __future__ import annotations

import json
import math
import os
import re
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import TrainerCallback, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput

from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForPreTraining, EfficientVLMModel
from modeling_efficientvlm.loading_efficientvlm import MASK_STATE_FILE, PRUNING_REPORT_FILE
from modeling_efficientvlm.modeling_efficientvlm import EfficientVLMPreTrainedModel
from trainers.pruning.hard_concrete import StructureMasker
from trainers.pruning.trainer import ModalAdaptivePruningTrainer, PruningConfig

from .conftest import make_inputs
from .data_utils import make_processor


class TinyImageTextClassifier(EfficientVLMPreTrainedModel):
    """A two-tower classifier (ITC style): a linear head on the image [CLS] and the text [CLS]. An image-only
    label needs the vision layers to carry patch information to the [CLS]; a text-only label the text layers."""

    def __init__(self, config: EfficientVLMConfig) -> None:
        super().__init__(config)
        self.efficientvlm = EfficientVLMModel(config)
        self.head = nn.Linear(config.vision_config.hidden_size + config.text_config.hidden_size, 2)
        self.post_init()

    def forward(self, pixel_values, input_ids, attention_mask=None, labels=None, structure_masks=None, **kwargs):
        model = self.efficientvlm
        image = model.encode_image(pixel_values, structure_masks).last_hidden_state
        text = model.encode_text(input_ids, attention_mask, structure_masks).last_hidden_state
        logits = self.head(torch.cat([image[:, 0], text[:, 0]], dim=-1))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class ModalityTask(torch.utils.data.Dataset):
    """Binary labels carried only by the image (global brightness) or only by the text (token range)."""

    def __init__(self, modality: str, size: int = 256, seed: int = 0, with_labels: bool = True) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (size,), generator=generator)
        self.pixel_values = torch.randn(size, 3, 32, 32, generator=generator)
        self.input_ids = torch.randint(5, 128, (size, 8), generator=generator)
        self.input_ids[:, 0] = 2
        if modality == "image":
            self.pixel_values += (self.labels.float() * 2 - 1).view(-1, 1, 1, 1)
        else:
            high = torch.randint(70, 128, (size, 7), generator=generator)
            low = torch.randint(5, 64, (size, 7), generator=generator)
            self.input_ids[:, 1:] = torch.where(self.labels.bool().view(-1, 1), high, low)
        self.with_labels = with_labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {
            "pixel_values": self.pixel_values[index],
            "input_ids": self.input_ids[index],
            "attention_mask": torch.ones(8, dtype=torch.long),
        }
        if self.with_labels:
            item["labels"] = self.labels[index]
        return item


def _args(output_dir, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        max_steps=10,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _trainer(
    output_dir, modality="text", preset="tiny-student", pruning=None, args=None, seed=0, train_dataset=None, **kwargs
):
    torch.manual_seed(seed)
    model = TinyImageTextClassifier(EfficientVLMConfig.from_preset(preset))
    pruning = pruning or PruningConfig(target_sparsity=0.5, sparsity_warmup_steps=5, mask_learning_rate=0.3)
    return ModalAdaptivePruningTrainer(
        model=model,
        args=args or _args(output_dir),
        train_dataset=train_dataset if train_dataset is not None else ModalityTask(modality),
        pruning_config=pruning,
        **kwargs,
    )


# -- what pruning learns ---------------------------------------------------------------------------------------


def test_pruning_reaches_the_target_and_spares_the_modality_the_task_needs(tmp_path) -> None:
    """One global target, two tasks: each reaches the target, and each prunes the modality it does not need
    more than the one it needs (the split is learned, not given)."""
    pruning = PruningConfig(target_sparsity=0.5, sparsity_warmup_steps=100, mask_learning_rate=0.3)
    split = {}
    for modality in ("text", "image"):
        trainer = _trainer(tmp_path / modality, modality, pruning=pruning, args=_args(tmp_path, max_steps=240))
        trainer.train()
        masker = trainer.masker
        assert abs(masker.expected_sparsity().item() - 0.5) < 0.02
        split[modality] = {m: masker.expected_sparsity(m).item() for m in ("vision", "text")}
        logged = trainer.state.log_history[-2]
        assert {
            "expected_sparsity",
            "expected_sparsity_vision",
            "target_sparsity",
            "lambda_1",
            "loss_lagrangian",
        } <= set(logged)
        assert logged["target_sparsity"] == 0.5 and logged["loss_task"] < 0.2  # the task was learned
        settling = trainer.settling()  # the saved sparsity held still over the last 5% of the steps
        assert settling["settled"] and settling["steps"] == [229, 240]
    assert split["text"]["vision"] > split["text"]["text"] + 0.1
    assert split["image"]["text"] > split["image"]["vision"] + 0.1


def test_a_run_that_ends_while_the_sparsity_still_moves_says_so_in_its_report(tmp_path) -> None:
    """Stopped mid-warm-up the masks' sparsity is still climbing: the report's `settling` says so and a warning
    names what to change (a shorter warm-up), instead of presenting that moment as the run's result."""
    from transformers.testing_utils import CaptureLogger

    from trainers.pruning import trainer as pruning_trainer

    pruning = PruningConfig(target_sparsity=0.5, sparsity_warmup_steps=100, mask_learning_rate=0.3)
    trainer = _trainer(tmp_path, pruning=pruning, args=_args(tmp_path, max_steps=50))
    trainer.train()
    with CaptureLogger(pruning_trainer.logger) as captured:
        report = trainer.prune_with_final_masks(trainer.model)
    settling = report["settling"]
    assert settling["steps"] == [48, 50]  # the last 5% of 50 steps, at least `ladder_patience` (3)
    low, high = settling["sparsity_range"]
    assert not settling["settled"] and high - low > 0.01 and settling["final_sparsity"] == pytest.approx(high, abs=1e-4)
    assert report["sparsity"] == pytest.approx(settling["final_sparsity"], abs=1e-4)
    # The warm-up outlasted the run: said so (the warning used to advise warming up over more steps).
    assert "warm-up (100 steps) outlasted the run (50 steps): the target had grown to 0.2500 of 0.5" in captured.out
    trainer.lagrangian.warmup_steps = 10  # the same moving trace after a finished warm-up: train longer
    with CaptureLogger(pruning_trainer.logger) as captured:
        trainer.settling()
    assert "had not settled" in captured.out and "--max_steps" in captured.out and "outlasted" not in captured.out


def test_snap_to_target_brings_a_run_that_missed_the_target_to_it(tmp_path) -> None:
    """Masks that could not learn the target in a short run (a tiny mask learning rate) reach it with
    `snap_to_target` by one common log-alpha offset, and the report says from where."""
    pruning = PruningConfig(target_sparsity=0.5, sparsity_warmup_steps=5, mask_learning_rate=1e-3, snap_to_target=True)
    trainer = _trainer(tmp_path, pruning=pruning, args=_args(tmp_path, max_steps=40))
    trainer.train()
    unsnapped = trainer.masker.sparsity_of(trainer.masker.deterministic_masks())
    report = trainer.prune_with_final_masks(trainer.model)
    snap = report["snap_to_target"]
    assert unsnapped < 0.2 and snap["sparsity_before"] == pytest.approx(unsnapped, abs=1e-4)
    assert report["sparsity"] == pytest.approx(0.5, abs=0.03) and snap["sparsity_after"] == pytest.approx(
        report["sparsity"], abs=1e-4
    )
    assert snap["offset"] < 0 and snap["step"] == 40  # shifted down: more units go
    # The report still says how the run itself ended.
    assert report["settling"]["final_sparsity"] == pytest.approx(unsnapped, abs=1e-4)
    assert not report["settling"]["on_target"]


def test_snap_to_target_fixes_the_masks_the_fixed_mask_phase_trains_with(tmp_path) -> None:
    pruning = PruningConfig(
        target_sparsity=0.5,
        sparsity_warmup_steps=20,
        mask_learning_rate=0.3,
        mask_freeze_fraction=0.4,
        snap_to_target=True,
    )
    args = _args(tmp_path, max_steps=10, save_strategy="steps", save_steps=10)
    trainer = _trainer(tmp_path, pruning=pruning, args=args)
    masks_seen: list[tuple[int, dict]] = []

    def record(module, args, kwargs):
        if module.training:
            masks_seen.append((trainer.state.global_step, kwargs["structure_masks"]))

    trainer.model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    assert trainer.snap["step"] == 6 and trainer.snap["sparsity_before"] < 0.45  # snapped when the masks froze
    final = trainer.final_masks()
    assert trainer.masker.sparsity_of(final) == pytest.approx(0.5, abs=0.03)
    frozen = [masks for step, masks in masks_seen if step >= 6]
    assert len(frozen) == 4 and all(
        all(torch.equal(a, b) for key in final for a, b in zip(masks[key], final[key]) if a is not None)
        for masks in frozen
    )
    # The checkpoint keeps the offset: a resumed run prunes with the masks it trained with.
    resumed = _trainer(tmp_path / "resumed", pruning=pruning, args=args)
    resumed.load_pruning_checkpoint(str(tmp_path / "checkpoint-10"))
    assert resumed.snap == trainer.snap
    # Resumed for more steps, the masks learn on past the old snap (its offset was for other masks): they snap
    # again when this run fixes them, and the report's sparsity is the target's.
    longer = _args(tmp_path / "longer", max_steps=20, save_strategy="no")
    resumed = _trainer(tmp_path / "longer", pruning=pruning, args=longer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-10"))
    assert resumed.snap["step"] == 12
    report = resumed.prune_with_final_masks(resumed.model)
    assert report["sparsity"] == pytest.approx(0.5, abs=0.03) == report["snap_to_target"]["sparsity_after"]
    with pytest.raises(ValueError, match="would not be kept: give one"):
        PruningConfig(target_sparsity=0.5, target_sparsity_per_modality={"vision": 0.1}, snap_to_target=True)


# -- optimisation details --------------------------------------------------------------------------------------


def test_masks_and_multipliers_have_their_own_constant_learning_rate(tmp_path) -> None:
    pruning = PruningConfig(
        target_sparsity=0.3, sparsity_warmup_steps=2, mask_learning_rate=0.05, lagrangian_learning_rate=0.2
    )
    args = _args(tmp_path, lr_scheduler_type="linear", warmup_steps=2, max_steps=6, weight_decay=0.1)
    trainer = _trainer(tmp_path, pruning=pruning, args=args)
    trainer.train()
    groups = {group.get("name"): group for group in trainer.pruning_optimizer.param_groups}
    masks, multipliers = groups["structure_masks"], groups["lagrange_multipliers"]
    assert masks["lr"] == 0.05 and multipliers["lr"] == 0.2  # not decayed with the model's schedule
    assert masks["weight_decay"] == multipliers["weight_decay"] == 0.0
    assert {id(p) for p in masks["params"]} == {id(p) for p in trainer.masker.parameters()}
    assert {id(p) for p in multipliers["params"]} == {id(p) for p in trainer.lagrangian.parameters()}
    assert all(trainer.pruning_optimizer.state[p]["step"] == 6 for p in masks["params"])  # one step per model step
    assert trainer.pruning_optimizer.defaults["fused"]  # as the Trainer's AdamW (`adamw_torch_fused`)
    assert trainer.optimizer.param_groups[0]["lr"] < 2e-3  # the model's learning rate did decay
    # Nothing of them in the Trainer's optimizer, which DeepSpeed / FSDP wrap (a ZeRO optimizer refuses them).
    in_trainer_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not in_trainer_optimizer & {id(p) for p in trainer.pruning_parameters()}
    # The masker is not part of the model: nothing of it in the model's parameters or state dict.
    model_parameters = {id(p) for p in trainer.model.parameters()}
    assert not model_parameters & {id(p) for p in trainer.pruning_parameters()}
    assert not [name for name in trainer.model.state_dict() if "log_alpha" in name or "lambda" in name]
    # Log-alphas were clamped into CoFi's range after each step; gradients were cleared.
    values = torch.cat([p.detach() for _, _, p in trainer.masker.layers()])
    assert values.max() <= 4.6052 and all(p.grad is None for p in trainer.pruning_parameters())
    # Multipliers ascend: with the expected sparsity below its target, lambda_1 went negative.
    assert trainer.lagrangian.lambda_1["overall"].item() < 0 < trainer.lagrangian.lambda_2["overall"].item()


def test_evaluation_uses_the_deterministic_masks(tmp_path) -> None:
    trainer = _trainer(tmp_path)
    trainer.train()
    masks = trainer.masker.deterministic_masks()
    batch = torch.utils.data.default_collate([ModalityTask("text")[i] for i in range(16)])
    model = trainer.model.eval()
    with torch.no_grad():
        expected = model(**batch, structure_masks=masks)
    for with_labels in (True, False):  # with labels through compute_loss, without through a plain forward
        dataset = torch.utils.data.Subset(ModalityTask("text", with_labels=with_labels), range(16))
        predictions = trainer.predict(dataset)
        torch.testing.assert_close(torch.as_tensor(predictions.predictions), expected.logits, atol=1e-5, rtol=0)
    metrics = trainer.evaluate(torch.utils.data.Subset(ModalityTask("text"), range(16)))
    assert metrics["eval_loss"] == pytest.approx(expected.loss.item(), abs=1e-5)


def test_distillation_from_a_teacher_with_masks_on_the_student_only(tmp_path) -> None:
    torch.manual_seed(0)
    student = EfficientVLMForPreTraining(EfficientVLMConfig.from_preset("tiny-student"))
    teacher = EfficientVLMForPreTraining(EfficientVLMConfig.from_preset("tiny"))  # other depths: masks would fail
    inputs = make_inputs(student.config, batch_size=4)
    inputs["mlm_labels"] = torch.full_like(inputs["input_ids"], -100)
    inputs["mlm_labels"][:, 1] = inputs["input_ids"][:, 1]
    inputs["mlm_input_ids"] = inputs["input_ids"].clone()
    inputs["mlm_input_ids"][:, 1] = 4
    dataset = [{key: value[i] for key, value in inputs.items()} for i in range(4)] * 2
    teacher_state = {name: value.clone() for name, value in teacher.state_dict().items()}
    trainer = ModalAdaptivePruningTrainer(
        model=student,
        args=_args(tmp_path, max_steps=2, logging_steps=1, per_device_train_batch_size=4),
        train_dataset=dataset,
        teacher_model=teacher,
        pruning_config=PruningConfig(target_sparsity=0.4, sparsity_warmup_steps=1),
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss_task", "loss_kd", "kd_itm_logit", "expected_sparsity", "loss_lagrangian"} <= set(logged)
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_state[name])


# -- checkpoints -----------------------------------------------------------------------------------------------


def _pruning_state(trainer) -> dict[str, torch.Tensor]:
    return {**trainer.masker.state_dict(), **trainer.lagrangian.state_dict()}


def test_resuming_from_a_checkpoint_continues_exactly(tmp_path) -> None:
    pruning = PruningConfig(target_sparsity=0.5, sparsity_warmup_steps=4, mask_learning_rate=0.1)
    full = _trainer(
        tmp_path, pruning=pruning, args=_args(tmp_path / "full", max_steps=8, save_strategy="steps", save_steps=4)
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / MASK_STATE_FILE).is_file()
    saved = load_file(checkpoint / "model.safetensors")
    assert not [name for name in saved if "log_alpha" in name or "lambda" in name]

    resumed = _trainer(tmp_path, pruning=pruning, args=_args(tmp_path / "resumed", max_steps=8), seed=123)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in _pruning_state(full).items():
        torch.testing.assert_close(_pruning_state(resumed)[name], value, rtol=0, atol=1e-6)
    full_masks, resumed_masks = full.masker.deterministic_masks(), resumed.masker.deterministic_masks()
    for key in full_masks:
        for a, b in zip(full_masks[key], resumed_masks[key]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)

    # A checkpoint without the mask state cannot resume a pruning run.
    os.remove(checkpoint / MASK_STATE_FILE)
    with pytest.raises(ValueError, match="masker.pt"):
        _trainer(tmp_path, pruning=pruning, args=_args(tmp_path / "again", max_steps=8)).train(
            resume_from_checkpoint=str(checkpoint)
        )


@pytest.mark.parametrize("batch_settings", [{"per_device_train_batch_size": 4}, {"gradient_accumulation_steps": 2}])
def test_a_resume_with_other_batch_settings_keeps_the_sparsity_warmup(tmp_path, caplog, batch_settings) -> None:
    """The default warm-up is one epoch's optimizer steps, which the processes, per-device batch and gradient
    accumulation set: a resume recomputed it, so the target dropped back mid-run (0.3 -> 0.225 in an audit)."""
    pruning = PruningConfig(target_sparsity=0.5, mask_learning_rate=0.1)
    data = torch.utils.data.Subset(ModalityTask("text"), range(32))  # 4 batches of 8: a warm-up over 4 steps
    args = _args(tmp_path / "run", max_steps=6, save_strategy="steps", save_steps=6)
    _trainer(tmp_path, pruning=pruning, args=args, train_dataset=data).train()
    assert torch.load(tmp_path / "run" / "checkpoint-6" / MASK_STATE_FILE)["warmup_steps"] == 4

    args = _args(tmp_path / "resumed", max_steps=8, **batch_settings)
    resumed = _trainer(tmp_path, pruning=pruning, args=args, train_dataset=data)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert resumed.lagrangian.warmup_steps == 4 and resumed.lagrangian.target(7) == 0.5
    recomputed = 8 if "per_device_train_batch_size" in batch_settings else 2
    assert (
        f"Resumed with the checkpoint's sparsity warm-up over 4 optimizer steps, the schedule it was on; this run's "
        f"settings would make it {recomputed} (one epoch)" in caplog.text
    )
    # An explicit warm-up that differs from the checkpoint's is still refused.
    other = PruningConfig(target_sparsity=0.5, sparsity_warmup_steps=8, mask_learning_rate=0.1)
    with pytest.raises(ValueError, match="sparsity warm-up over 4 steps, this run 8: resume with the flags"):
        _trainer(tmp_path, pruning=other, args=args, train_dataset=data).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6")
        )


def test_a_resume_with_other_batch_settings_keeps_the_fixed_mask_phase(tmp_path, caplog) -> None:
    """--mask_freeze_fraction fixes the masks for the last share of the steps; under --num_train_epochs the steps
    follow the batch settings, and a resume in the fixed-mask phase with a smaller batch moved its start past the
    checkpoint: the masks learned again."""
    pruning = PruningConfig(
        target_sparsity=0.5, sparsity_warmup_steps=2, mask_learning_rate=0.3, mask_freeze_fraction=0.5
    )
    data = torch.utils.data.Subset(ModalityTask("text"), range(32))

    def args(output_dir, **overrides):  # 2 epochs: 8 steps of 8 records, the masks fixed from step 4
        return _args(output_dir, max_steps=-1, num_train_epochs=2, **overrides)

    run_args = args(tmp_path / "run", save_strategy="steps", save_steps=5)
    run = _trainer(tmp_path, pruning=pruning, args=run_args, train_dataset=data)
    run.train()
    assert run.mask_freeze_step == 4
    checkpoint = tmp_path / "run" / "checkpoint-5"
    saved = torch.load(checkpoint / MASK_STATE_FILE)

    small = args(tmp_path / "small", per_device_train_batch_size=4)
    resumed = _trainer(tmp_path, pruning=pruning, args=small, train_dataset=data)
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 16 and resumed.mask_freeze_step == 4
    for name, value in resumed.masker.state_dict().items():  # the masks stayed fixed
        torch.testing.assert_close(value, saved["masker"][name], rtol=0, atol=0)
    assert (
        "Resumed on the checkpoint's pruning schedule, the masks fixed from step 4 (--mask_freeze_fraction 0.5) of "
        "its 8 optimizer steps (--num_train_epochs 2); this run's batch settings make 16 steps" in caplog.text
    )
    # A batch that ends the run (4 steps) before the schedule it resumes cannot keep it.
    large = args(tmp_path / "large", per_device_train_batch_size=16)
    shorter = _trainer(tmp_path, pruning=pruning, args=large, train_dataset=data)
    with pytest.raises(ValueError, match=r"make 4, so it would end before that schedule does.*--max_steps 8\."):
        shorter.train(resume_from_checkpoint=str(checkpoint))


def test_a_sigterm_checkpoint_resumes_exactly(tmp_path) -> None:
    """--enable_jit_checkpoint: transformers' callback saved mid-step (labelled step 2, with an RNG state that had
    drawn step 3's mask noise), so a resume redid step 3 with other masks. The checkpoint is now taken at the end of
    the step under way, after the pruning callbacks: the resumed run ends where an uninterrupted one does."""
    pruning = PruningConfig(target_sparsity=0.5, sparsity_warmup_steps=4, mask_learning_rate=0.1)
    full = _trainer(tmp_path, pruning=pruning, args=_args(tmp_path / "full", max_steps=6))
    full.train()

    class SigtermDuringStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    try:
        args = _args(tmp_path / "stopped", max_steps=6, enable_jit_checkpoint=True)
        stopped = _trainer(tmp_path, pruning=pruning, args=args, callbacks=[SigtermDuringStep3()])
        stopped.train()
        assert signal.getsignal(signal.SIGTERM) == handler  # the training's handler is gone with it
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert stopped.state.global_step == 3
    assert sorted(os.listdir(tmp_path / "stopped")) == ["checkpoint-3"]
    checkpoint = tmp_path / "stopped" / "checkpoint-3"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 3

    resumed = _trainer(tmp_path, pruning=pruning, args=_args(tmp_path / "resumed", max_steps=6), seed=123)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in _pruning_state(full).items():
        torch.testing.assert_close(_pruning_state(resumed)[name], value, rtol=0, atol=1e-6, msg=name)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("when", "step"),
    [("mid-epoch", 1), ("during the epoch's last step", 2), ("after the epoch's last step end", 2)],
)
def test_one_sigterm_saves_one_checkpoint(tmp_path, request, when: str, step: int) -> None:
    """The request stayed set once answered at a step end, so the epoch's end asked for the same checkpoint folder
    again: written twice in place (twice the time in the grace period; a kill in the second write damaged the only
    new checkpoint). Epochs of 2 steps here; the last case signals after the step end that would have answered it."""

    class Sigterm(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if when != "after the epoch's last step end" and state.global_step == step - 1:
                os.kill(os.getpid(), signal.SIGTERM)

        def on_step_end(self, args, state, control, **kwargs):
            if when == "after the epoch's last step end" and state.global_step == step:
                os.kill(os.getpid(), signal.SIGTERM)

    class CountSaves(TrainerCallback):
        def __init__(self) -> None:
            self.saves: list[int] = []

        def on_save(self, args, state, control, **kwargs):
            self.saves.append(state.global_step)

    handler = signal.getsignal(signal.SIGTERM)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, handler))
    args = _args(tmp_path, max_steps=6, per_device_train_batch_size=8, enable_jit_checkpoint=True)
    data = torch.utils.data.Subset(ModalityTask("text"), range(16))
    trainer = _trainer(tmp_path, args=args, train_dataset=data)
    trainer.add_callback(Sigterm())  # after the SIGTERM callback: its step end runs after the one that answers
    trainer.add_callback(counter := CountSaves())
    trainer.train()
    assert counter.saves == [step] and trainer.state.global_step == step
    assert sorted(os.listdir(tmp_path)) == [f"checkpoint-{step}"]


def test_last_and_best_checkpoints_restore_their_own_masks(tmp_path) -> None:
    """`resume_from_checkpoint=True` takes the last checkpoint's masks; `load_best_model_at_end` the best one's."""
    evaluations = []

    def first_evaluation_is_best(_) -> dict[str, float]:
        evaluations.append(len(evaluations))
        return {"score": -float(len(evaluations))}

    args = _args(
        tmp_path / "run",
        max_steps=8,
        save_strategy="steps",
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
    )
    trainer = _trainer(
        tmp_path,
        args=args,
        eval_dataset=torch.utils.data.Subset(ModalityTask("text"), range(16)),
        compute_metrics=first_evaluation_is_best,
    )
    trainer.train()
    best, last = (torch.load(tmp_path / "run" / f"checkpoint-{step}" / MASK_STATE_FILE) for step in (4, 8))
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    assert not torch.equal(best["masker"]["log_alpha.vision_ffn.0"], last["masker"]["log_alpha.vision_ffn.0"])
    for name, value in trainer.masker.state_dict().items():
        torch.testing.assert_close(value, best["masker"][name], rtol=0, atol=0)

    class RecordPruningState(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.state = {name: value.clone() for name, value in _pruning_state(resumed).items()}

    resumed = _trainer(tmp_path, args=_args(tmp_path / "run", max_steps=12), seed=123)
    resumed.add_callback(record := RecordPruningState())
    resumed.train(resume_from_checkpoint=True)
    for name, value in record.state.items():
        torch.testing.assert_close(value, {**last["masker"], **last["lagrangian"]}[name], rtol=0, atol=0)

    # `save_model` keeps the masks next to the unpruned weights; the pruned model has none to keep.
    resumed.save_model(tmp_path / "unpruned")
    assert (tmp_path / "unpruned" / MASK_STATE_FILE).is_file()


def test_pruning_state_that_does_not_fit_raises(tmp_path) -> None:
    trainer = _trainer(tmp_path)
    state = trainer.pruning_state_dict()
    other = _trainer(tmp_path, preset="tiny")
    with pytest.raises(ValueError, match="structure sizes"):
        other.load_pruning_state_dict(state)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_pruning_state_dict({**state, "structure_sizes": None})
    per_modality = _trainer(
        tmp_path, pruning=PruningConfig(target_sparsity=0.5, target_sparsity_per_modality={"vision": 0.3})
    )
    with pytest.raises(ValueError, match=r"targets \{'overall': 0.5\}, this run \{'overall': 0.5, 'vision': 0.3\}"):
        per_modality.load_pruning_state_dict(state)
    with pytest.raises(ValueError, match="multipliers"):  # a checkpoint of an older version, without its targets
        per_modality.load_pruning_state_dict({k: v for k, v in state.items() if k != "targets"})
    with pytest.raises(ValueError, match="masker"):
        trainer.load_pruning_state_dict({"log_alpha": 1})
    # A resume with other targets or an explicit other warm-up: the saved masks and schedule belong to the first.
    resumed_as = {
        "targets {'overall': 0.5}, this run {'overall': 0.3}": PruningConfig(
            target_sparsity=0.3, sparsity_warmup_steps=5
        ),
        "sparsity ladder None, this run (0.2, 0.4)": PruningConfig(sparsity_ladder="0.2,0.4", sparsity_warmup_steps=5),
        "sparsity warm-up over 5 steps, this run 9": PruningConfig(target_sparsity=0.5, sparsity_warmup_steps=9),
    }
    for mismatch, pruning in resumed_as.items():
        with pytest.raises(ValueError, match=re.escape(f"saved by a pruning run with {mismatch}: resume with")):
            _trainer(tmp_path, pruning=pruning).load_pruning_state_dict(state)
    _trainer(tmp_path, pruning=PruningConfig(target_sparsity=0.5)).load_pruning_state_dict(state)  # warm-up not given
    with pytest.raises(ValueError, match="do not fit"):
        _trainer(tmp_path, masker=StructureMasker.from_model(other.model))


# -- the end: a physically smaller model -----------------------------------------------------------------------


def test_prune_and_save_writes_the_smaller_model_and_its_report(tmp_path) -> None:
    trainer = _trainer(tmp_path, args=_args(tmp_path, max_steps=20))
    trainer.train()
    masker, model = trainer.masker, trainer.model.eval()
    masks = masker.deterministic_masks()
    batch = torch.utils.data.default_collate([ModalityTask("text")[i] for i in range(8)])
    with torch.no_grad():
        masked = model(**batch, structure_masks=masks).logits
    with pytest.raises(ValueError, match="processor"):
        trainer.prune_and_save(tmp_path / "pruned")  # a folder without its processor cannot be used
    processor = make_processor(tmp_path)
    report = trainer.prune_and_save(tmp_path / "pruned", processor=processor)
    assert (tmp_path / "pruned" / "processor_config.json").is_file()
    assert (tmp_path / "pruned" / "tokenizer.json").is_file()

    removed = masker.total_parameters() - masker.remaining_parameters(masks)
    # The FFNs are padded with zero neurons (`trainers/pruning/padding.py`), counted as parameters kept.
    assert report["parameters_before"] - report["parameters_after"] == removed - report["padding"]["padded_parameters"]
    assert report["sparsity"] == masker.sparsity_of(masks) == removed / masker.total_parameters()
    assert set(report["sparsity_per_modality"]) == {"vision", "text", "fusion"}
    assert report["structures_kept"] == masker.kept_structures(masks)
    assert report["padding"]["structures_after"] == model.structure_sizes()
    assert report["kept_per_modality"]["vision"] == {
        "vision_heads": report["structures_kept"]["vision_heads"],
        "vision_ffn": report["structures_kept"]["vision_ffn"],
    }
    assert json.loads((tmp_path / "pruned" / PRUNING_REPORT_FILE).read_text()) == json.loads(json.dumps(report))
    assert not (tmp_path / "pruned" / MASK_STATE_FILE).exists()

    reloaded = TinyImageTextClassifier.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.structure_sizes() == report["padding"]["structures_after"]
    assert sum(p.numel() for p in reloaded.parameters()) == report["parameters_after"]
    assert not [name for name in reloaded.state_dict() if "log_alpha" in name]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, masked, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="already pruned"):
        trainer.finalize_pruning()


@pytest.mark.parametrize("binary_masks", [False, True])
def test_the_evaluated_model_is_the_saved_model(tmp_path, binary_masks: bool) -> None:
    pruning = PruningConfig(
        target_sparsity=0.5, sparsity_warmup_steps=5, mask_learning_rate=0.3, binary_masks=binary_masks
    )
    trainer = _trainer(tmp_path, pruning=pruning, args=_args(tmp_path, max_steps=20))
    trainer.train()
    dataset = torch.utils.data.Subset(ModalityTask("text", with_labels=False), range(16))
    evaluated = torch.as_tensor(trainer.predict(dataset).predictions)
    trainer.prune_and_save(tmp_path / "pruned", processor=make_processor(tmp_path))
    saved = TinyImageTextClassifier.from_pretrained(tmp_path / "pruned").eval()
    batch = torch.utils.data.default_collate([dataset[i] for i in range(16)])
    with torch.no_grad():
        torch.testing.assert_close(saved(**batch).logits, evaluated, atol=1e-5, rtol=0)


def test_fixed_mask_phase_trains_the_model_with_its_final_masks(tmp_path) -> None:
    pruning = PruningConfig(
        target_sparsity=0.5, sparsity_warmup_steps=4, mask_learning_rate=0.3, mask_freeze_fraction=0.4
    )
    trainer = _trainer(tmp_path, pruning=pruning, args=_args(tmp_path, max_steps=10))
    snapshots: dict[int, dict] = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots[state.global_step] = {
                "log_alpha": {k: v.detach().clone() for k, v in trainer.masker.state_dict().items()},
                "lagrangian": {k: v.detach().clone() for k, v in trainer.lagrangian.state_dict().items()},
                "model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            }

    masks_seen: list[tuple[int, dict]] = []

    def record(module, args, kwargs):
        if module.training:
            masks_seen.append((trainer.state.global_step, kwargs["structure_masks"]))

    trainer.add_callback(Snapshot())
    trainer.model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()

    assert trainer.mask_freeze_step == 6  # the last 4 of 10 steps
    for step in range(7, 11):  # no mask or multiplier moves once frozen, while the model keeps training
        for part in ("log_alpha", "lagrangian"):
            for name, value in snapshots[step][part].items():
                torch.testing.assert_close(value, snapshots[6][part][name], rtol=0, atol=0)
    assert any(not torch.equal(snapshots[10]["model"][k], v) for k, v in snapshots[6]["model"].items())
    assert any(not torch.equal(snapshots[6]["log_alpha"][k], v) for k, v in snapshots[1]["log_alpha"].items())
    # Frozen steps see exactly the masks the model is pruned with; learning steps see samples.
    final = trainer.final_masks()
    for step, masks in masks_seen:
        same = all(
            (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for key in final
            for a, b in zip(masks[key], final[key])
        )
        assert same == (step >= 6), f"step {step}"


def test_prune_and_save_of_a_task_model_writes_a_complete_carded_folder(tmp_path) -> None:
    """With the processor as the Trainer's `processing_class`, the folder has everything `from_pretrained`,
    `efficientvlm evaluate` and the Hub need: weights, config with `auto_map`, code, processor, report, card."""
    from huggingface_hub import ModelCard

    from trainers.tasks import build_dataset, task_model_class
    from trainers.training import train

    from .data_utils import write_vqa_json

    config = EfficientVLMConfig.from_preset("tiny")
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    records, image_root = write_vqa_json(tmp_path, n=4)
    trainer = train(
        "vqa",
        task_model_class("vqa")(config),
        processor,
        build_dataset("vqa", records, image_root, processor),
        _args(tmp_path / "run", max_steps=2, per_device_train_batch_size=2),
        ModalAdaptivePruningTrainer,
        processing_class=processor,
        pruning_config=PruningConfig(target_sparsity=0.3),
    )
    report = trainer.prune_and_save(tmp_path / "pruned")
    folder = tmp_path / "pruned"
    for name in ("model.safetensors", "config.json", "modeling_efficientvlm_vqa.py", "processor_config.json"):
        assert (folder / name).is_file(), name
    assert not (folder / "training_args.bin").exists()
    assert json.loads((folder / "config.json").read_text())["auto_map"]
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0" and "pruning" in card.data.tags
    assert f"**{report['sparsity']:.3f}**" in card.text
    reloaded = task_model_class("vqa").from_pretrained(folder)
    assert sum(p.numel() for p in reloaded.parameters()) == report["parameters_after"]


# -- bad settings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "target_sparsity"),
        ({"target_sparsity": 1.0}, r"\[0, 1\)"),
        ({"target_sparsity": 0.5, "sparsity_warmup_steps": -1}, "sparsity_warmup_steps"),
        ({"target_sparsity": 0.5, "mask_learning_rate": 0.0}, "mask_learning_rate"),
        ({"target_sparsity_per_modality": {"audio": 0.5}}, "Unknown modality"),
        ({"target_sparsity": 0.5, "mask_freeze_fraction": 1.0}, "mask_freeze_fraction"),
        ({"target_sparsity_per_modality": {"text": 0.5}, "snap_to_target": True}, "snap_to_target"),
    ],
)
def test_bad_pruning_configs_raise(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


def test_bad_trainer_arguments_raise(tmp_path) -> None:
    with pytest.raises(ValueError, match="PruningConfig"):
        _trainer(tmp_path, pruning={"target_sparsity": 0.5})
    with pytest.raises(ValueError, match="teacher_model"):
        _trainer(tmp_path, distillation_config={"kd_weight": 0.4})
    with pytest.raises(ValueError, match="hard_concrete_temperature"):
        _trainer(tmp_path, pruning=PruningConfig(target_sparsity=0.5, hard_concrete_temperature=0.0))
    masker = _trainer(tmp_path, pruning=PruningConfig(target_sparsity=0.5, hard_concrete_temperature=0.5)).masker
    assert masker.hard_concrete_temperature == 0.5


# -- the command line ------------------------------------------------------------------------------------------


def test_prune_command_distils_prunes_and_saves(tmp_path, capsys) -> None:
    from modeling_efficientvlm import EfficientVLMForVisualReasoning
    from trainers import commands as cli

    from .data_utils import write_nlvr2_json, write_vocab

    train_file, image_root = write_nlvr2_json(tmp_path, n=8)
    torch.manual_seed(0)
    EfficientVLMForVisualReasoning(EfficientVLMConfig.from_preset("tiny")).save_pretrained(tmp_path / "teacher")
    output_dir = tmp_path / "pruned"
    argv = [
        "prune",
        "--task", "nlvr2",
        "--preset", "tiny-student",
        "--vocab_file", str(write_vocab(tmp_path)),
        "--teacher_model_name_or_path", str(tmp_path / "teacher"),
        "--train_file", str(train_file),
        "--image_root", str(image_root),
        "--eval_file", str(train_file),
        "--target_sparsity", "0.4",
        "--sparsity_warmup_steps", "2",
        "--mask_learning_rate", "0.5",
        "--kd_term_weights", '{"vision_attn": 0.0}',
        "--mask_freeze_fraction", "0.25",
        "--output_dir", str(output_dir),
        "--max_steps", "4",
        "--per_device_train_batch_size", "4",
        "--report_to", "none",
        "--use_cpu",
        "--save_strategy", "no",
    ]  # fmt: skip
    capsys.readouterr()
    assert cli.main(argv) == 0
    # --eval_file's metrics are printed last, as finetune prints them (they were computed and saved, never shown).
    printed = capsys.readouterr().out
    metrics = json.loads((output_dir / "eval_results.json").read_text())
    assert set(metrics) == {"nlvr2_accuracy"} and printed.endswith(json.dumps(metrics, indent=2) + "\n")
    report = json.loads((output_dir / PRUNING_REPORT_FILE).read_text())
    assert 0 < report["sparsity"] < 1 and report["parameters_after"] < report["parameters_before"]
    assert report["pruning_config"]["mask_freeze_fraction"] == 0.25
    assert (output_dir / "vocab.txt").is_file() or (output_dir / "tokenizer.json").is_file()  # the processor
    pruned = EfficientVLMForVisualReasoning.from_pretrained(output_dir)
    assert pruned.structure_sizes() == report["padding"]["structures_after"]
    assert sum(p.numel() for p in pruned.parameters()) == report["parameters_after"]
    assert report["padding"]["pad_to_multiple_of"] == 8  # the default: FFN widths padded with zero neurons
    ffn_widths = [w for key, ws in report["padding"]["structures_after"].items() if key.endswith("_ffn") for w in ws]
    assert all(w % 8 == 0 or w == 64 for w in ffn_widths)
    out = str(tmp_path / "unused")
    with pytest.raises(ValueError, match="--prune_pad_multiple 0: `pad_to_multiple_of` must be an integer >= 1"):
        cli.main(
            ["prune", "--task", "vqa", "--preset", "tiny", "--target_sparsity", "0.3", "--prune_pad_multiple", "0"]
            + ["--output_dir", out]
        )
    with pytest.raises(ValueError, match="--task"):
        cli.main(
            ["prune", "--task", "pretraining", "--preset", "tiny", "--target_sparsity", "0.3", "--output_dir", out]
        )
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        cli.main(["prune", "--task", "vqa", "--preset", "tiny", "--target_sparsity", "1.5", "--output_dir", out])


def test_activation_checkpointing_trains_the_masks_and_its_reentrant_form_is_refused(tmp_path) -> None:
    """Non-reentrant checkpointing (transformers' default) trains the masks of a task model; the reentrant form
    failed in the first backward with "Trying to backward through the graph a second time"."""
    from trainers.tasks import build_dataset, task_model_class
    from trainers.training import train

    from .data_utils import write_vqa_json

    config = EfficientVLMConfig.from_preset("tiny")
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    records, image_root = write_vqa_json(tmp_path, n=4)
    dataset = build_dataset("vqa", records, image_root, processor)
    args = _args(tmp_path / "run", max_steps=2, per_device_train_batch_size=2, activation_checkpointing=True)
    trainer = train(
        "vqa", task_model_class("vqa")(config), processor, dataset, args, ModalAdaptivePruningTrainer,
        pruning_config=PruningConfig(target_sparsity=0.3),
    )  # fmt: skip
    assert trainer.state.global_step == 2 and math.isfinite(trainer.state.log_history[-1]["train_loss"])
    reentrant = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": True}}
    reentrant = _args(tmp_path / "r", **reentrant)
    message = r"use_reentrant=True cannot train the structure masks.*\(--activation_checkpointing_kwargs '\{"
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path / "r", args=reentrant)
