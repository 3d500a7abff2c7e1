"""Official EfficientVLM pruning-stage checkpoints (`l0_module.*` log-alphas) -> physically pruned models.

The state dicts are synthetic: the official parameter names and layouts (tests/reference/), at a reduced width
(768 -> 128, 12 heads -> 2) so the test is fast. Expected masks are computed here from the official formulas,
independently of the masker under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from modeling_efficientvlm import (
    CorruptCheckpointError,
    EfficientVLMForConditionalGeneration,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForQuestionAnswering,
)
from modeling_efficientvlm.convert_efficientvlm_checkpoints import model_from_official_state_dict
from trainers.pruning.official import L0_PREFIX, load_official_pruning_checkpoint, prune_official_state_dict

from .conftest import make_inputs

REFERENCE = Path(__file__).resolve().parent / "reference"
SHRINK = {768: 128, 1536: 256, 3072: 256, 30522: 120, 12: 2}  # width, ITM hidden, FFN, vocab, heads
# Eff_Captioning saves an XVLML0Module: retrieval's log-alphas.
L0_LISTING = {"retrieval": "retrieval (", "vqa": "vqa and captioning (", "captioning": "retrieval ("}
WEIGHTS_LISTING = {
    "retrieval": "ref_student_retrieval_keys.json",
    "vqa": "ref_student_vqa_keys.json",
    "captioning": "ref_student_captioning_keys.json",
}
BETA, LEFT, RIGHT = 2 / 3, -0.1, 1.1


def _official_state(task: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = json.loads((REFERENCE / WEIGHTS_LISTING[task]).read_text())
    l0_listings = json.loads((REFERENCE / "ref_student_pruning_l0_keys.json").read_text())
    l0_shapes = next(v for k, v in l0_listings.items() if k.startswith(L0_LISTING[task]))
    state = {}
    for name, shape in {**shapes, **l0_shapes}.items():
        shape = [SHRINK.get(n, n) for n in shape]
        if name.endswith("position_ids"):
            state[name] = torch.arange(shape[-1]).unsqueeze(0)
        elif "loga" in name:
            state[name] = torch.randn(shape, generator=generator) * 3.0
        else:
            state[name] = torch.randn(shape, generator=generator) * 0.05
    decoder = "text_decoder.cls.predictions.decoder.weight"
    if decoder in state:  # tied to the decoder's word embeddings, as officially
        state[decoder] = state["text_decoder.bert.embeddings.word_embeddings.weight"]
        state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"]
    # Fusion layer 0: every self-attention head kept (row 0), every cross-attention head dropped (row 1);
    # vision layer 2's whole FFN dropped.
    state["l0_module.cross_head_loga"][0] = 10.0
    state["l0_module.cross_head_loga"][1] = -10.0
    if task in ("vqa", "captioning"):  # their official forward masks fusion layer 0 with text rows 0 and 1
        state["l0_module.text_head_loga"][0] = 10.0
        state["l0_module.text_head_loga"][1] = -10.0
    state["l0_module.vision_int_loga"][2] = -10.0
    if "l0_module.decoder_head_loga" in state:
        # Answer-decoder layer 0: every cross-attention head dropped (row 1) and its whole FFN.
        state["l0_module.decoder_head_loga"][1] = -10.0
        state["l0_module.decoder_int_loga"][0] = -10.0
    return state


def _official_mask(log_alpha: torch.Tensor) -> torch.Tensor:
    """The official deterministic mask: keep the round(n - sum P(z=0)) units with the highest log-alpha, at 1."""
    shift = BETA * math.log(-LEFT / RIGHT)
    p_zero = torch.sigmoid(shift - log_alpha.double())
    kept = log_alpha.numel() - round(p_zero.sum().item())
    mask = torch.zeros(log_alpha.numel())
    if kept > 0:
        mask[torch.topk(log_alpha, kept).indices] = 1.0
    return mask


def _official_masks(state: dict[str, torch.Tensor], task: str) -> dict[str, list[torch.Tensor]]:
    """The masks the official forward applies. Its BERT encoder gives fusion layer k (k counted from the first
    fusion layer) rows 2k and 2k + 1 of the `head_z` it is passed and row k of `mlp_z`; retrieval passes the cross
    rows (`fusion` mode), VQA `cat(text rows, cross rows)` (`multi_modal` mode, Eff_VQA / model_generation.py)."""
    rows = {name[len("l0_module.") :]: tensor for name, tensor in state.items() if name.endswith("_loga")}
    head_z, mlp_z = rows["cross_head_loga"], rows["cross_int_loga"]
    if task in ("vqa", "captioning"):  # Eff_Captioning's decoder is called the same way
        head_z = torch.cat([rows["text_head_loga"], head_z])
        mlp_z = torch.cat([rows["text_int_loga"], mlp_z])
    fusion_layers = rows["cross_int_loga"].shape[0]
    masks = {
        "vision_heads": rows["vision_head_loga"],
        "vision_ffn": rows["vision_int_loga"],
        "text_heads": rows["text_head_loga"],
        "text_ffn": rows["text_int_loga"],
        "fusion_heads": [head_z[2 * k] for k in range(fusion_layers)],
        "fusion_cross_heads": [head_z[2 * k + 1] for k in range(fusion_layers)],
        "fusion_ffn": [mlp_z[k] for k in range(fusion_layers)],
    }
    if "decoder_head_loga" in rows:
        masks["decoder_heads"] = rows["decoder_head_loga"][0::2]
        masks["decoder_cross_heads"] = rows["decoder_head_loga"][1::2]
        masks["decoder_ffn"] = rows["decoder_int_loga"]
    return {key: [_official_mask(row) for row in value] for key, value in masks.items()}


@pytest.mark.parametrize("task", ["retrieval", "vqa", "captioning"])
def test_pruning_stage_checkpoint_prunes_as_the_official_masks_say(task: str, tmp_path: Path) -> None:
    state = _official_state(task)
    torch.save({"model": state}, tmp_path / "pruning_stage.pth")
    pruned, report = load_official_pruning_checkpoint(str(tmp_path / "pruning_stage.pth"), task)
    expected = _official_masks(state, task)

    kept = {key: [int(mask.sum()) for mask in masks] for key, masks in expected.items()}
    assert report["structures_kept"] == kept
    # FFN widths padded with zero neurons (`trainers/pruning/padding.py`), heads as kept, empty layers empty.
    after = report["padding"]["structures_after"]
    assert pruned.structure_sizes(include_decoder=task == "vqa") == after
    assert all(
        a == k if "heads" in key else (a == 0) == (k == 0) and k <= a and (a % 8 == 0 or a == k)
        for key in kept
        for a, k in zip(after[key], kept[key])
    )
    assert kept["fusion_heads"][0] == 2 and kept["fusion_cross_heads"][0] == 0 and kept["vision_ffn"][2] == 0
    modalities = {"vision", "text", "fusion"} | ({"decoder"} if task == "vqa" else set())
    assert 0 < report["sparsity"] < 1 and set(report["sparsity_per_modality"]) == modalities
    if task == "vqa":  # the answer decoder is physically pruned, a layer of it to nothing
        assert kept["decoder_cross_heads"][0] == 0 and kept["decoder_ffn"][0] == 0
        assert pruned.config.answer_decoder_intermediate_size_per_layer == after["decoder_ffn"]
        assert 0 < report["sparsity_per_modality"]["decoder"] < 1
    assert report["parameters_after"] == sum(p.numel() for p in pruned.parameters()) < report["parameters_before"]
    assert set(report["lagrange_multipliers"]) == {"lambda_1", "lambda_2"}
    if task in ("vqa", "captioning"):  # text and fusion layers share rows: the same units kept
        assert kept["fusion_ffn"] == kept["text_ffn"] and kept["fusion_heads"][1] == kept["text_heads"][2]

    # The pruned model computes what the unpruned one computes under the official masks.
    weights = {name: tensor for name, tensor in state.items() if not name.startswith("l0_module.")}
    unpruned = model_from_official_state_dict(weights, task).eval()
    inputs = make_inputs(pruned.config, batch_size=2, seq_len=9, seed=1)
    pruned.eval()
    with torch.no_grad():
        ours = pruned.efficientvlm(**inputs)
        reference = unpruned.efficientvlm(**inputs, structure_masks=expected)
    torch.testing.assert_close(ours.last_hidden_state, reference.last_hidden_state, atol=1e-5, rtol=1e-5)
    # (Not the ITC embeddings: generative checkpoints have no ITC projections, so VQA's are freshly initialised.)
    for name in ("vision_output", "text_output"):
        torch.testing.assert_close(
            getattr(ours, name).last_hidden_state, getattr(reference, name).last_hidden_state, atol=1e-5, rtol=1e-5
        )
    if task == "vqa":
        question_states = torch.randn(2, 9, pruned.config.text_config.hidden_size)
        answer = (inputs["input_ids"][:, :4], None, question_states, None)
        with torch.no_grad():
            masked, _ = unpruned.decode(*answer, structure_masks=expected)
            decoded, _ = pruned.decode(*answer)
        torch.testing.assert_close(decoded, masked, atol=1e-5, rtol=1e-5)

    # The folder reloads at its uneven sizes with `from_pretrained`.
    pruned.save_pretrained(tmp_path / "pruned")
    model_class = {
        "retrieval": EfficientVLMForImageTextRetrieval,
        "vqa": EfficientVLMForQuestionAnswering,
        "captioning": EfficientVLMForConditionalGeneration,
    }[task]
    reloaded = model_class.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        again = reloaded.efficientvlm(**inputs)
    torch.testing.assert_close(again.last_hidden_state, ours.last_hidden_state)
    if task == "vqa":
        assert reloaded.structure_sizes(include_decoder=True) == after
        with torch.no_grad():
            torch.testing.assert_close(reloaded.decode(*answer)[0], decoded)


def test_non_pruning_checkpoints_and_mismatched_log_alphas_raise() -> None:
    state = _official_state("retrieval")
    weights = {name: tensor for name, tensor in state.items() if not name.startswith("l0_module.")}
    with pytest.raises(ValueError, match="not a pruning-stage checkpoint"):
        prune_official_state_dict(weights, "retrieval")
    bad = dict(state)
    bad["l0_module.cross_head_loga"] = bad["l0_module.cross_head_loga"][:3]  # 3 rows for 3 fusion layers x 2
    with pytest.raises(ValueError, match=r"l0_module\.cross_head_loga.*6 rows"):
        prune_official_state_dict(bad, "retrieval")
    unknown = {**state, "l0_module.mystery_loga": torch.zeros(1)}
    with pytest.raises(ValueError, match="mystery_loga"):
        prune_official_state_dict(unknown, "retrieval")
    with pytest.raises(ValueError, match="convert for"):
        prune_official_state_dict(state, "nlvr2")


def test_convert_command_writes_a_pruned_carded_folder(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard
    from transformers.testing_utils import CaptureLogger

    from trainers import commands as cli
    from trainers.commands import convert as convert_command

    from .data_utils import make_processor, write_vocab

    torch.save(_official_state("retrieval"), tmp_path / "pruning_stage.pth")
    output_dir = tmp_path / "converted"
    argv = ["convert", "--checkpoint", str(tmp_path / "pruning_stage.pth"), "--task", "retrieval"]
    with pytest.raises(ValueError, match="no tokenizer"):
        cli.main([*argv, "--output_dir", str(output_dir)])
    # A vocabulary larger than the checkpoint's embedding table, or a processor for another image size: refused.
    big = tmp_path / "big" / "vocab.txt"
    big.parent.mkdir()
    big.write_text(write_vocab(tmp_path).read_text() + "".join(f"extra{i}\n" for i in range(200)))
    with pytest.raises(ValueError, match=r"the tokenizer has \d+ tokens but the model's vocab_size is 120"):
        cli.main([*argv, "--output_dir", str(output_dir), "--vocab_file", str(big)])
    # Another task's checkpoint (the architecture is read from the tensors the task needs), a file cut short.
    unpruned = {k: v for k, v in _official_state("retrieval").items() if not k.startswith(L0_PREFIX)}
    torch.save(unpruned, tmp_path / "retrieval.pth")
    with pytest.raises(ValueError, match=r"has no tensor .* which an official captioning checkpoint holds"):
        cli.main(["convert", "--checkpoint", str(tmp_path / "retrieval.pth"), "--task", "captioning",
                  "--output_dir", str(output_dir), "--vocab_file", str(write_vocab(tmp_path))])  # fmt: skip
    whole = (tmp_path / "pruning_stage.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 50])
    with pytest.raises(CorruptCheckpointError, match="cut.pth"):
        cli.main(["convert", "--checkpoint", str(tmp_path / "cut.pth"), "--task", "retrieval",
                  "--output_dir", str(output_dir), "--vocab_file", str(write_vocab(tmp_path))])  # fmt: skip
    other_size = make_processor(tmp_path / "p64", image_size=64)
    other_size.save_pretrained(tmp_path / "p64")
    with pytest.raises(ValueError, match=r"resizes images to 64x64 but .*: give a processor for \d+x\d+ images, or"):
        cli.main([*argv, "--output_dir", str(output_dir), "--processor_name_or_path", str(tmp_path / "p64")])
    # A smaller vocabulary than the table converts (it may be the checkpoint's own), with a warning naming both.
    with CaptureLogger(convert_command.logger) as logged:
        assert cli.main([*argv, "--output_dir", str(output_dir), "--vocab_file", str(write_vocab(tmp_path))]) == 0
    assert "tokens but the checkpoint's embedding table has 120 rows" in logged.out
    report = json.loads((output_dir / "pruning_report.json").read_text())
    reloaded = EfficientVLMForImageTextRetrieval.from_pretrained(output_dir)
    assert reloaded.structure_sizes() == report["padding"]["structures_after"]
    assert (output_dir / "tokenizer.json").is_file() or (output_dir / "vocab.txt").is_file()
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.license == "apache-2.0" and "converted" in card.text
    # The checkpoint is named in the text; the Hub reads `base_model` as a model id, which a file name is not.
    assert card.data.base_model is None and "It was converted from `pruning_stage.pth`." in card.text


def test_generative_checkpoints_get_seeded_named_itc_projections() -> None:
    """The official VQA / captioning models have no ITC projections: ours are drawn from a fixed seed (two
    conversions differed by 0.12) and the conversion says the model's image / text features are untrained."""
    from transformers.testing_utils import CaptureLogger

    from modeling_efficientvlm import convert_efficientvlm_checkpoints as convert

    weights = {k: v for k, v in _official_state("vqa").items() if not k.startswith(L0_PREFIX)}
    with CaptureLogger(convert.logger) as logged:
        first = model_from_official_state_dict(weights, "vqa")
    torch.manual_seed(123)  # the caller's RNG plays no part, and is left as it was
    state = torch.random.get_rng_state()
    second = model_from_official_state_dict(weights, "vqa")
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("vision_proj.weight", "text_proj.weight"):
        assert torch.equal(first.efficientvlm.get_parameter(name), second.efficientvlm.get_parameter(name)), name
    assert "no contrastive (ITC) projections" in logged.out and "get_image_features" in logged.out


def test_convert_saves_vqa_answer_candidates_and_the_card_says_whether_it_has_them(tmp_path: Path) -> None:
    """Official VQA checkpoints hold no answer list: `--answer_list` saves one with the converted model (its card
    then shows `rank_answers`); without it the card says answers are decoded freely, not that it ranks saved ones."""
    from trainers import commands as cli

    from .data_utils import write_vocab

    weights = {k: v for k, v in _official_state("vqa").items() if not k.startswith(L0_PREFIX)}
    torch.save({"model": weights}, tmp_path / "vqa.pth")
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["red", "blue", "circle"]))
    argv = ["convert", "--checkpoint", str(tmp_path / "vqa.pth"), "--vocab_file", str(write_vocab(tmp_path))]
    with pytest.raises(ValueError, match="--answer_list"):
        cli.main([*argv, "--task", "retrieval", "--answer_list", str(answers), "--output_dir", str(tmp_path / "r")])
    cli.main([*argv, "--task", "vqa", "--answer_list", str(answers), "--output_dir", str(tmp_path / "ranked")])
    model = EfficientVLMForQuestionAnswering.from_pretrained(tmp_path / "ranked")
    assert model.config.answer_candidates == ["red", "blue", "circle"]
    card = (tmp_path / "ranked" / "README.md").read_text()
    assert "model.rank_answers(**inputs, k=128).answers" in card and "3 answer candidates" in card
    cli.main([*argv, "--task", "vqa", "--output_dir", str(tmp_path / "free")])
    card = (tmp_path / "free" / "README.md").read_text()
    assert "saves no answer candidates" in card and "rank_answers(**inputs" not in card


def test_layer_gaps_in_an_official_checkpoint_are_named() -> None:
    """A missing layer shifted every later one into its place and was blamed on another layer ("no place"); a
    layer missing only its cross-attention silently became a text layer."""
    from transformers.testing_utils import CaptureLogger

    from modeling_efficientvlm import convert_efficientvlm_checkpoints as convert

    weights = {k: v for k, v in _official_state("retrieval").items() if not k.startswith(L0_PREFIX)}

    def without(prefix: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in weights.items() if not k.startswith(prefix)}

    with pytest.raises(ValueError, match=r"no tensors of vision_encoder\.encoder\.layers\.3 but has later layers"):
        model_from_official_state_dict(without("vision_encoder.encoder.layers.3."), "retrieval")
    with pytest.raises(ValueError, match=r"layers \[3, 5\] have cross-attention but \[4\] after the first"):
        model_from_official_state_dict(without("text_encoder.encoder.layer.4.crossattention."), "retrieval")
    with CaptureLogger(convert.logger) as logged:
        model = model_from_official_state_dict(without("text_encoder.encoder.layer.3.crossattention."), "retrieval")
    assert model.config.text_config.num_fusion_layers == 2
    assert "has 4 text and 2 fusion layers; official X-VLM / EfficientVLM models split it in half" in logged.out


def test_an_untied_lm_decoder_is_named_and_the_word_embeddings_kept() -> None:
    """The model ties its LM decoder to the word embeddings; a checkpoint whose two differ had one of them dropped
    silently (the decoder won for VQA and captioning, the embeddings for pre-training)."""
    from transformers.testing_utils import CaptureLogger

    from modeling_efficientvlm import convert_efficientvlm_checkpoints as convert

    weights = {k: v for k, v in _official_state("vqa").items() if not k.startswith(L0_PREFIX)}
    embeddings = weights["text_decoder.bert.embeddings.word_embeddings.weight"]
    weights["text_decoder.cls.predictions.decoder.weight"] = embeddings + 0.5
    with CaptureLogger(convert.logger) as logged:
        model = model_from_official_state_dict(weights, "vqa")
    named = "differs from its word embeddings (answer_decoder.embeddings.word_embeddings.weight) by up to 0.5"
    assert named in logged.out
    assert torch.equal(model.answer_decoder.embeddings.word_embeddings.weight, embeddings)
    assert model.answer_head.decoder.weight is model.answer_decoder.embeddings.word_embeddings.weight


def test_official_checkpoint_mistakes_get_messages_that_name_them(tmp_path: Path) -> None:
    from modeling_efficientvlm.convert_efficientvlm_checkpoints import read_official_state_dict

    with pytest.raises(ValueError, match=r"'l0_module\.\w+': this is a pruning-stage checkpoint"):
        model_from_official_state_dict(_official_state("retrieval"), "retrieval")  # was "not part of an official"
    with pytest.raises(IsADirectoryError, match="is a folder: give the checkpoint file in it"):
        read_official_state_dict(tmp_path)  # was "no such checkpoint file"
    state = _official_state("retrieval")
    state["l0_module.vision_int_loga"][1, 3] = float("nan")  # was "cannot convert float NaN to integer"
    with pytest.raises(ValueError, match=r"`l0_module\.vision_int_loga` holds NaN or inf log-alphas"):
        prune_official_state_dict(state, "retrieval")
    weights = {k: v for k, v in _official_state("retrieval").items() if not k.startswith(L0_PREFIX)}
    # was "`num_answer_decoder_layers` must be at least 1, got 0"
    message = r"no tensor 'text_decoder\.bert\.encoder\.layer\.0\.\*', which an official vqa checkpoint holds"
    with pytest.raises(ValueError, match=message):
        model_from_official_state_dict(weights, "vqa")
