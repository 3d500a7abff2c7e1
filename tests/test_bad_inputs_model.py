"""Bad input reaching the model, the masks or a checkpoint folder: a named error, and nothing changed or lost.

Issue 11's catalogue, model side (the data side is in test_data.py): atomic `prune`, checkpoints that do not fit
their config, NaN / inf pixels, masks and log-alphas, a batch with nothing to mask, corrupt safetensors files.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_efficientvlm import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    EfficientVLMConfig,
    EfficientVLMForConditionalGeneration,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForPreTraining,
    EfficientVLMForQuestionAnswering,
    EfficientVLMForVisualReasoning,
    EfficientVLMModel,
    EfficientVLMTextModel,
    EfficientVLMVisionModel,
)
from trainers.pruning.hard_concrete import StructureMasker

from .conftest import make_inputs


def _keep_first(units: int, kept: int) -> torch.Tensor:
    mask = torch.zeros(units)
    mask[:kept] = 1.0
    return mask


def _snapshot(model: torch.nn.Module) -> tuple:
    return (
        {name: tensor.clone() for name, tensor in model.state_dict().items()},
        copy.deepcopy(model.config.to_dict()),
        model.structure_sizes(),
        repr(model),
    )


def _assert_unchanged(model: torch.nn.Module, before: tuple) -> None:
    state, config, sizes, structure = before
    now = model.state_dict()
    assert list(now) == list(state)
    for name, tensor in state.items():
        assert torch.equal(now[name], tensor), name
    assert model.config.to_dict() == config
    assert model.structure_sizes() == sizes
    assert repr(model) == structure


# ------------------------------------------------------------------------------------------------------------
# prune(masks) is atomic
# ------------------------------------------------------------------------------------------------------------


def _nan_at(units: int, index: int) -> torch.Tensor:
    mask = torch.ones(units)
    mask[index] = float("nan")
    return mask


# Each case comes after valid masks for the vision layers, so a non-atomic prune would have changed those.
BAD_MASKS = [
    (
        {"text_ffn": [torch.ones(64), torch.ones(5)]},
        ValueError,
        r"The mask for `text_ffn` layer 1 has shape \(5,\); expected \(64,\)",
    ),
    (
        {"fusion_heads": [torch.ones(4, 1), None]},
        ValueError,
        r"`fusion_heads` layer 0 has shape \(4, 1\); expected \(4,\)",
    ),
    ({"text_heads": [torch.ones(4)] * 3}, ValueError, "`text_heads` has 3 masks but the model has 2 such layers"),
    ({"audio_heads": [None]}, ValueError, r"Unknown structure-mask keys \['audio_heads'\]"),
    (
        {"fusion_ffn": [None, _nan_at(64, 7)]},
        ValueError,
        r"`fusion_ffn` layer 1 has 1 NaN or inf value\(s\) \(units \[7\]\)",
    ),
    (
        {"fusion_cross_heads": [torch.full((4,), float("inf")), None]},
        ValueError,
        "`fusion_cross_heads` layer 0 has 4 NaN or inf",
    ),
    ({"text_ffn": [[1.0] * 64, None]}, TypeError, "The mask for `text_ffn` layer 0 is a list, not a tensor"),
]


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    BAD_MASKS,
    ids=["wrong-shape", "2d-mask", "layer-that-does-not-exist", "unknown-key", "nan", "inf", "not-a-tensor"],
)
def test_prune_with_a_bad_mask_changes_nothing(tiny_config, bad: dict, error: type, message: str) -> None:
    model = EfficientVLMForPreTraining(tiny_config)
    before = _snapshot(model)
    masks = {"vision_heads": [_keep_first(4, 2), _keep_first(4, 0)], "vision_ffn": [_keep_first(64, 8), None], **bad}
    with pytest.raises(error, match=message):
        model.prune(masks)
    _assert_unchanged(model, before)
    # The model is still whole and prunes fine afterwards.
    model.prune({"vision_ffn": [_keep_first(64, 8), None]})
    assert model.config.vision_config.intermediate_size_per_layer == [8, 64]


@pytest.mark.parametrize(
    ("build", "bad", "message"),
    [
        (
            lambda config: EfficientVLMVisionModel(config.vision_config),
            {"vision_heads": [_keep_first(4, 1), torch.ones(3)]},
            r"`vision_heads` layer 1 has shape \(3,\); expected \(4,\)",
        ),
        (
            lambda config: EfficientVLMVisionModel(config.vision_config),
            {"vision_ffn": [_keep_first(64, 1), None], "text_ffn": [None, None]},
            "EfficientVLMVisionModel has no layers for the structure-mask key 'text_ffn'",
        ),
        (
            lambda config: EfficientVLMTextModel(config.text_config),
            {"text_ffn": [_keep_first(64, 1), _nan_at(64, 0)]},
            r"`text_ffn` layer 1 has 1 NaN or inf value\(s\) \(units \[0\]\)",
        ),
        (
            lambda config: EfficientVLMForVisualReasoning(config),
            {"fusion_ffn": [_keep_first(64, 3), None, None, None], "fusion_cross_heads": [torch.ones(4)] * 3},
            "`fusion_cross_heads` has 3 masks but the model has 2 twin pairs",
        ),
        (
            lambda config: EfficientVLMForQuestionAnswering(config),
            {"text_heads": [_keep_first(4, 1), None], "vision_ffn": [None, None, None]},
            "`vision_ffn` has 3 masks but the model has 2 such layers",
        ),
        (
            lambda config: EfficientVLMForQuestionAnswering(config),
            {"vision_ffn": [_keep_first(64, 2), None], "decoder_heads": [_keep_first(4, 1), None]}
            | {"decoder_ffn": [None, _nan_at(64, 5)]},
            r"`decoder_ffn` layer 1 has 1 NaN or inf value\(s\) \(units \[5\]\)",
        ),
    ],
    ids=["vision-shape", "vision-other-modality", "text-nan", "nlvr2-pairs", "vqa-extra-layer", "vqa-decoder-nan"],
)
def test_every_model_prunes_atomically(tiny_config, build, bad: dict, message: str) -> None:
    model = build(tiny_config)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.prune(bad)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("task_model", [EfficientVLMModel, EfficientVLMForQuestionAnswering])
def test_an_error_while_building_the_pruned_modules_changes_nothing(tiny_config, monkeypatch, task_model) -> None:
    """Masks that pass the checks but fail while the smaller modules are built (say, out of memory) still leave
    the model whole: every pruned module is built before any is swapped in (VQA: encoders and answer decoder)."""
    model = task_model(tiny_config)
    before = _snapshot(model)
    if task_model is EfficientVLMModel:
        last_mlp = model.text_model.encoder.layer[-1].mlp
        sizes = model.structure_sizes()
    else:
        last_mlp = model.answer_decoder.encoder.layer[-1].mlp
        sizes = model.structure_sizes(include_decoder=True)

    def fail(mask: torch.Tensor, pad_to_multiple_of: int = 1) -> None:
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(last_mlp, "prune", fail)
    masks = {key: [_keep_first(n, n // 2) for n in per_layer] for key, per_layer in sizes.items()}
    with pytest.raises(RuntimeError, match="simulated"):
        model.prune(masks)
    _assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------------------
# NaN / inf reaching the model: pixels, masks, log-alphas; a batch with nothing to mask
# ------------------------------------------------------------------------------------------------------------


def test_non_finite_pixel_values_raise(tiny_config) -> None:
    inputs = make_inputs(tiny_config)
    pixel_values = inputs["pixel_values"].clone()
    pixel_values[2, 1, 5, 5] = float("nan")
    pixel_values[3, 0, 0, 0] = float("inf")
    message = r"`pixel_values` contains NaN or inf values \(images \[2, 3\] of the batch of 4\)"
    with pytest.raises(ValueError, match=message):
        EfficientVLMForPreTraining(tiny_config)(**{**inputs, "pixel_values": pixel_values})
    with pytest.raises(ValueError, match=message):
        EfficientVLMVisionModel(tiny_config.vision_config)(pixel_values)
    with pytest.raises(ValueError, match=r"`pixel_values` contains NaN or inf values \(images \[0\]"):
        EfficientVLMModel(tiny_config).get_image_features(pixel_values[2:3])


def test_token_ids_past_the_embedding_tables_are_named(tiny_config) -> None:
    """A tokenizer larger than the model (the `tiny` preset with a 187-token vocabulary) failed in the embedding with
    torch's bare "index out of range in self"."""
    inputs = make_inputs(tiny_config)
    vocab = tiny_config.text_config.vocab_size
    model = EfficientVLMForPreTraining(tiny_config)
    too_large = inputs["input_ids"].clone()
    too_large[1, 2] = vocab + 59
    message = rf"`input_ids` hold ids from \d+ to {vocab + 59}, but the model's table has {vocab} rows \(text_config"
    with pytest.raises(IndexError, match=message):
        model(**{**inputs, "input_ids": too_large})
    with pytest.raises(IndexError, match=r"`token_type_ids` hold ids from 2 to 2, but the model's table has 2 rows"):
        EfficientVLMTextModel(tiny_config.text_config)(
            inputs["input_ids"], token_type_ids=torch.full_like(inputs["input_ids"], 2)
        )


def test_non_finite_masks_in_forward_raise(tiny_config) -> None:
    model = EfficientVLMForPreTraining(tiny_config).eval()
    inputs = make_inputs(tiny_config)
    ffn = [torch.ones(64), _nan_at(64, 3)]
    with pytest.raises(
        ValueError, match=r"The mask for `fusion_ffn` layer 1 has 1 NaN or inf value\(s\) \(units \[3\]\)"
    ):
        model(**inputs, structure_masks={"fusion_ffn": ffn})
    heads = [torch.tensor([1.0, float("-inf"), 1.0, 1.0]), None]
    with pytest.raises(
        ValueError, match=r"The mask for `vision_heads` layer 0 has 1 NaN or inf value\(s\) \(units \[1\]\)"
    ):
        model(**inputs, structure_masks={"vision_heads": heads})
    # VQA's answer decoder: its masks are named as the model's `decoder_*` keys.
    vqa = EfficientVLMForQuestionAnswering(tiny_config).eval()
    answers = torch.full((4, 3), 7)
    answers[:, 0] = tiny_config.text_config.bos_token_id
    vqa_inputs = {**inputs, "answer_input_ids": answers, "answer_attention_mask": torch.ones_like(answers)}
    with pytest.raises(ValueError, match=r"The mask for `decoder_ffn` layer 0 has 1 NaN or inf value\(s\)"):
        vqa(**vqa_inputs, structure_masks={"decoder_ffn": [_nan_at(64, 0), None]})
    # Finite masks, including ones that require grad (sampled while training), pass.
    masks = {"fusion_ffn": [torch.ones(64, requires_grad=True), None], "vision_heads": [torch.ones(4), None]}
    assert torch.isfinite(model(**inputs, structure_masks=masks).itm_logits).all()


def test_non_finite_log_alphas_raise_naming_key_modality_and_layer(tiny_config) -> None:
    masker = StructureMasker.from_model(EfficientVLMModel(tiny_config))
    state = {name: tensor.clone() for name, tensor in masker.state_dict().items()}
    with torch.no_grad():
        masker.log_alpha["fusion_ffn"]["1"][[4, 9]] = float("nan")
    message = (
        r"The log-alphas of `fusion_ffn` \(fusion modality\) layer 1 have 2 NaN or inf value\(s\) \(units \[4, 9\]\)"
    )
    with pytest.raises(ValueError, match=message):
        masker.train()()
    with pytest.raises(ValueError, match=message):
        masker.eval()()
    with pytest.raises(ValueError, match=message):
        masker.deterministic_masks(binary=True)
    # A saved mask state with NaN is refused and the masker keeps its values.
    fresh = StructureMasker.from_model(EfficientVLMModel(tiny_config))
    kept = {name: tensor.clone() for name, tensor in fresh.state_dict().items()}
    bad = {**state, "log_alpha.vision_heads.0": torch.full((4,), float("nan"))}
    with pytest.raises(ValueError, match=r"NaN or inf log-alphas in `log_alpha.vision_heads.0`; nothing was loaded"):
        fresh.load_state_dict(bad)
    assert all(torch.equal(fresh.state_dict()[name], tensor) for name, tensor in kept.items())


def test_a_batch_with_nothing_to_mask_raises_instead_of_a_nan_loss(tiny_config) -> None:
    """Cross-entropy over no target is NaN; Trainer's NaN filter would then log the step's loss as 0. The
    pre-training collator refuses such a batch (test_data.py); a batch built by other code is refused here."""
    model = EfficientVLMForPreTraining(tiny_config)
    inputs = make_inputs(tiny_config)
    mlm_labels = torch.full_like(inputs["input_ids"], -100)
    with pytest.raises(ValueError, match=r"`mlm_labels` has no masked position \(all -100\) in this batch of 4"):
        model(**inputs, mlm_input_ids=inputs["input_ids"], mlm_labels=mlm_labels)
    mlm_labels[1, 2] = inputs["input_ids"][1, 2]
    output = model(**inputs, mlm_input_ids=inputs["input_ids"], mlm_labels=mlm_labels)
    assert torch.isfinite(output.loss_mlm) and torch.isfinite(output.loss)


# ------------------------------------------------------------------------------------------------------------
# Checkpoints whose weights do not fit config.json
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny pre-training checkpoint, the same pruned (vision FFN 0: 24 of 64 neurons; text layer 1: no head
    left), and folders that pair one's weights with the other's config."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = EfficientVLMForPreTraining(EfficientVLMConfig.from_preset("tiny"))
    model.save_pretrained(root / "full")
    model.prune({"vision_ffn": [_keep_first(64, 24), None], "text_heads": [None, _keep_first(4, 0)]})
    model.save_pretrained(root / "pruned")
    for weights, config in (("pruned", "full"), ("full", "pruned")):
        folder = root / f"{weights}_weights_{config}_config"
        shutil.copytree(root / weights, folder)
        shutil.copy(root / config / "config.json", folder / "config.json")
    return {path.name: path for path in root.iterdir()}


def _message(error: pytest.ExceptionInfo) -> str:
    return str(error.value)


def test_pruned_weights_with_an_unpruned_config_raise(checkpoints) -> None:
    folder = checkpoints["pruned_weights_full_config"]
    with pytest.raises(CheckpointMismatchError) as error:
        EfficientVLMForPreTraining.from_pretrained(folder)
    text = _message(error)
    assert f"the weights in {folder} do not fit the model described by {folder / 'config.json'}" in text
    assert "efficientvlm.vision_model.layers.0.mlp.fc1.weight: (24, 32) in the checkpoint, (64, 32) expected" in text
    # Text layer 1 has no head left: the checkpoint holds only its output bias, the config wants four heads.
    assert "missing from the checkpoint: efficientvlm.text_model.encoder.layer.1.attention.k_proj.bias" in text
    assert "no place for: efficientvlm.text_model.encoder.layer.1.attention.bias" in text
    # The backbone alone, and a task model built from the same folder, fail the same way.
    with pytest.raises(CheckpointMismatchError, match=r"vision_model\.layers\.0\.mlp\.fc1\.weight: \(24, 32\)"):
        EfficientVLMModel.from_pretrained(folder)
    with pytest.raises(CheckpointMismatchError, match=r"vision_model\.layers\.0\.mlp\.fc1\.weight: \(24, 32\)"):
        EfficientVLMForQuestionAnswering.from_pretrained(folder)


def test_unpruned_weights_with_a_pruned_config_raise(checkpoints) -> None:
    folder = checkpoints["full_weights_pruned_config"]
    with pytest.raises(CheckpointMismatchError) as error:
        EfficientVLMForPreTraining.from_pretrained(folder)
    text = _message(error)
    assert "efficientvlm.vision_model.layers.0.mlp.fc1.weight: (64, 32) in the checkpoint, (24, 32) expected" in text
    assert "missing from the checkpoint: efficientvlm.text_model.encoder.layer.1.attention.bias" in text
    assert "no place for: efficientvlm.text_model.encoder.layer.1.attention.k_proj.bias" in text
    # Re-initialising shapes on purpose is still possible; the layers the config removed still do not fit.
    with pytest.raises(CheckpointMismatchError) as error:
        EfficientVLMForPreTraining.from_pretrained(folder, ignore_mismatched_sizes=True)
    assert "parameter(s) of another shape" not in _message(error) and "layer.1.attention.bias" in _message(error)


def test_a_missing_block_raises(checkpoints, tmp_path) -> None:
    folder = tmp_path / "missing_block"
    shutil.copytree(checkpoints["full"], folder)
    state = load_file(folder / "model.safetensors")
    save_file(
        {name: tensor for name, tensor in state.items() if ".vision_model.layers.1." not in name},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(
        CheckpointMismatchError,
        match=r"16 parameter\(s\) missing from the checkpoint: efficientvlm\.vision_model\.layers\.1\.layer_norm1\.",
    ):
        EfficientVLMForPreTraining.from_pretrained(folder)
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint: vision_model\.layers\.1\."):
        EfficientVLMModel.from_pretrained(folder)
    # A checkpoint saved by the same class must be complete: its heads too.
    head = tmp_path / "missing_head"
    shutil.copytree(checkpoints["full"], head)
    save_file(
        {name: tensor for name, tensor in state.items() if not name.startswith("itm_head.")},
        head / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint: itm_head\.0\.bias"):
        EfficientVLMForPreTraining.from_pretrained(head)
    # Nothing of a bad folder reaches another model: the complete one still loads.
    assert isinstance(EfficientVLMForPreTraining.from_pretrained(checkpoints["full"]), EfficientVLMForPreTraining)


@pytest.mark.parametrize(
    "model_class",
    [
        EfficientVLMModel,
        EfficientVLMForPreTraining,
        EfficientVLMForImageTextRetrieval,
        EfficientVLMForQuestionAnswering,
        EfficientVLMForConditionalGeneration,
        EfficientVLMForVisualReasoning,
    ],
)
@pytest.mark.parametrize("folder", ["full", "pruned"])
def test_task_models_load_from_a_pretraining_checkpoint(checkpoints, model_class: type, folder: str) -> None:
    """New task heads (answer decoder, LM head, NLVR2 classifier) and heads the task drops are not errors."""
    model, info = model_class.from_pretrained(checkpoints[folder], output_loading_info=True)
    assert isinstance(model, model_class) and not info["mismatched_keys"]
    source = json.loads((checkpoints[folder] / "config.json").read_text())
    assert (
        model.config.vision_config.intermediate_size_per_layer == source["vision_config"]["intermediate_size_per_layer"]
    )


def test_single_encoder_checkpoint_with_a_missing_layer_raises(tiny_config, tmp_path) -> None:
    EfficientVLMTextModel(tiny_config.text_config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["encoder.layer.3.mlp.fc2.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointMismatchError,
        match=r"1 parameter\(s\) missing from the checkpoint: encoder\.layer\.3\.mlp\.fc2\.weight",
    ):
        EfficientVLMTextModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------------------
# Corrupt safetensors files
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[: len(data) // 2], "file not fully covered"),
        (lambda data: b"\x00garbage" * 64, "header"),
        (lambda data: b"", "header too small"),
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_a_corrupt_safetensors_file_is_named(checkpoints, tmp_path, damage, reason: str) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(checkpoints["full"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    message = rf"Cannot read the weights: {re.escape(str(weights))} \(.*{reason}.*\)\. The file is truncated"
    with pytest.raises(CorruptCheckpointError, match=message):
        EfficientVLMForPreTraining.from_pretrained(folder)
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(weights))):
        EfficientVLMForVisualReasoning.from_pretrained(folder)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(lambda data: data[: len(data) // 2], "central directory"), (lambda data: b"\x00garbage" * 64, "Weights only")],
    ids=["truncated", "garbage"],
)
def test_a_corrupt_pytorch_bin_file_is_named(checkpoints, tmp_path, damage, reason: str) -> None:
    # Folders saved by older tools (or FSDP) hold `pytorch_model.bin`; torch.load's own error names no file and
    # suggests weights_only=False.
    folder = tmp_path / "bin"
    shutil.copytree(checkpoints["full"], folder)
    weights = folder / "pytorch_model.bin"
    torch.save(load_file(folder / "model.safetensors"), weights)
    (folder / "model.safetensors").unlink()
    torch.manual_seed(0)
    assert EfficientVLMForPreTraining.from_pretrained(folder).config.text_config.num_hidden_layers == 2
    weights.write_bytes(damage(weights.read_bytes()))
    message = rf"Cannot read the weights: {re.escape(str(weights))} \(.*{reason}.*\)\. The file is truncated"
    with pytest.raises(CorruptCheckpointError, match=message):
        EfficientVLMForPreTraining.from_pretrained(folder)


def test_official_checkpoint_files_fail_with_the_file_named(tmp_path) -> None:
    from modeling_efficientvlm.convert_efficientvlm_checkpoints import read_official_state_dict

    state_dict = {"vision_encoder.cls_token": torch.zeros(1, 1, 4)}
    torch.save({"model": state_dict, "epoch": 3}, tmp_path / "official.pth")
    assert read_official_state_dict(tmp_path / "official.pth").keys() == state_dict.keys()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.pth"))):
        read_official_state_dict(tmp_path / "missing.pth")
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes((tmp_path / "official.pth").read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match=rf"Cannot read {re.escape(str(damaged))} \(.*\)\. The file is"):
        read_official_state_dict(damaged)
    torch.save({"model": [1, 2]}, tmp_path / "not_a_state_dict.pth")
    with pytest.raises(ValueError, match="not_a_state_dict.pth holds no state dict"):
        read_official_state_dict(tmp_path / "not_a_state_dict.pth")
    # Text and CSV files failed deep in torch's unpickler (KeyError: 101, IndexError: pop from empty list).
    for name, text in (("notes.pth", "hello world\n"), ("table.pth", "a,b\n1,2\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(CorruptCheckpointError, match=rf"Cannot read .*{name} \(\w+: .*\)\. The file is"):
            read_official_state_dict(tmp_path / name)
    # Saved from a DDP-wrapped model: every name under `module.`.
    torch.save({"model": {f"module.{k}": v for k, v in state_dict.items()}}, tmp_path / "ddp.pth")
    assert read_official_state_dict(tmp_path / "ddp.pth").keys() == state_dict.keys()
