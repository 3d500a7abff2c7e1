"""Pruning VQA's answer decoder (`decoder_*` structures, the `decoder` modality): masked == physically pruned
(including a decoder layer pruned to nothing), uneven sizes through save / `from_pretrained`, the masker's
accounting (the official 120.4M prunable parameters at base size), `efficientvlm prune --prune_decoder`, and
models without an answer decoder."""

from __future__ import annotations

import json

import pytest
import torch

from modeling_efficientvlm import (
    EfficientVLMConfig,
    EfficientVLMForConditionalGeneration,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForQuestionAnswering,
    EfficientVLMModel,
)
from modeling_efficientvlm.loading_efficientvlm import PRUNING_REPORT_FILE
from modeling_efficientvlm.modeling_efficientvlm import (
    DECODER_MASK_KEYS,
    attention_head_parameters,
    ffn_neuron_parameters,
)
from trainers.pruning.hard_concrete import StructureMasker
from trainers.pruning.trainer import ModalAdaptivePruningTrainer, PruningConfig

from .test_vqa import _batch, _candidates, _config, _questions


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _masks_with_an_empty_decoder_layer(model: EfficientVLMForQuestionAnswering, seed: int = 0) -> dict:
    """Soft masks with some zeros over every structure, decoder included; decoder layer 0 loses every
    self-attention head, every cross-attention head and every FFN neuron."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for key, sizes in model.structure_sizes(include_decoder=True).items():
        masks[key] = []
        for layer, size in enumerate(sizes):
            values = torch.rand(size, generator=generator) + 0.5
            values[torch.rand(size, generator=generator) < 0.4] = 0
            if key in DECODER_MASK_KEYS and layer == 0:
                values.zero_()
            masks[key].append(values)
    return masks


def test_masked_decoder_equals_pruned_decoder_and_reloads_at_its_uneven_sizes(tmp_path) -> None:
    torch.manual_seed(0)
    model = EfficientVLMForQuestionAnswering(_config()).eval()
    model.generation_config.eos_token_id = None  # run the full length
    masks = _masks_with_an_empty_decoder_layer(model)
    batch, questions = _batch(), _questions()
    candidates, _ = _candidates()
    with torch.no_grad():
        masked = model(**batch, structure_masks=masks)
        unmasked_decoder = model(**batch, structure_masks={k: v for k, v in masks.items() if "decoder" not in k})
    # The decoder masks take effect (the check below would otherwise hold trivially).
    assert not torch.allclose(masked.logits, unmasked_decoder.logits, atol=1e-3)
    masked_ranking = model.rank_answers(**questions, answer_candidates_ids=candidates, k=4, structure_masks=masks)
    masked_free = model.generate(**questions, structure_masks=masks, max_new_tokens=3)
    masked_beams = model.generate(**questions, structure_masks=masks, max_new_tokens=3, num_beams=2)

    sizes_before = model.structure_sizes(include_decoder=True)
    units = model.structure_unit_parameters(include_decoder=True)
    removed = sum(
        (size - int(torch.count_nonzero(mask))) * units[key][layer]
        for key, layer_masks in masks.items()
        for layer, (mask, size) in enumerate(zip(layer_masks, sizes_before[key]))
    )
    before = sum(p.numel() for p in model.parameters())
    model.prune(masks)
    assert sum(p.numel() for p in model.parameters()) == before - removed
    kept = model.structure_sizes(include_decoder=True)
    assert kept["decoder_heads"][0] == kept["decoder_cross_heads"][0] == kept["decoder_ffn"][0] == 0
    assert kept["decoder_ffn"] == [int(torch.count_nonzero(mask)) for mask in masks["decoder_ffn"]]
    assert model.config.answer_decoder_num_attention_heads_per_layer == kept["decoder_heads"]
    assert model.config.answer_decoder_num_cross_attention_heads_per_layer == kept["decoder_cross_heads"]
    assert model.config.answer_decoder_intermediate_size_per_layer == kept["decoder_ffn"]

    with torch.no_grad():
        pruned = model(**batch)
    torch.testing.assert_close(pruned.logits, masked.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(pruned.loss, masked.loss, atol=1e-5, rtol=0)
    ranking = model.rank_answers(**questions, answer_candidates_ids=candidates, k=4)
    assert ranking.topk_indices.tolist() == masked_ranking.topk_indices.tolist()
    torch.testing.assert_close(ranking.topk_scores, masked_ranking.topk_scores, atol=1e-5, rtol=0)
    assert model.generate(**questions, max_new_tokens=3).tolist() == masked_free.tolist()
    assert model.generate(**questions, max_new_tokens=3, num_beams=2).tolist() == masked_beams.tolist()

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["answer_decoder_intermediate_size_per_layer"] == kept["decoder_ffn"]
    reloaded = EfficientVLMForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert reloaded.structure_sizes(include_decoder=True) == kept
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, pruned.logits, atol=1e-6, rtol=0)
    again = reloaded.rank_answers(**questions, answer_candidates_ids=candidates, k=4)
    torch.testing.assert_close(again.topk_scores, ranking.topk_scores, atol=1e-6, rtol=0)


def test_the_masker_counts_the_decoder_as_its_own_modality() -> None:
    # At base size (built on the meta device: only shapes are read) the official prunable totals.
    with torch.device("meta"):
        small = EfficientVLMForQuestionAnswering(EfficientVLMConfig.from_preset("efficientvlm-small"))
    encoders, whole = StructureMasker.from_model(small), StructureMasker.from_model(small, include_decoder=True)
    assert round(encoders.total_parameters() / 1e6, 1) == 92.1 and round(whole.total_parameters() / 1e6, 1) == 120.4
    assert encoders.modalities == ["vision", "text", "fusion"] and not encoders.includes_decoder
    assert whole.modalities == ["vision", "text", "fusion", "decoder"] and whole.includes_decoder
    # Three decoder layers of 12 self + 12 cross heads (keys and values read the 768-wide question states) and
    # 3072 neurons.
    per_layer = 24 * attention_head_parameters(64, 768, 768) + 3072 * ffn_neuron_parameters(768)
    assert whole.total_parameters("decoder") == 3 * per_layer == whole.total_parameters() - encoders.total_parameters()
    # The global sparsity counts the decoder: dropping half of its FFN neurons alone shows up overall.
    masks = {key: [torch.ones(n) for n in sizes] for key, sizes in whole.structure_sizes.items()}
    for mask in masks["decoder_ffn"]:
        mask[: mask.numel() // 2] = 0
    removed = 3 * 1536 * ffn_neuron_parameters(768)
    assert whole.sparsity_of(masks) == pytest.approx(removed / whole.total_parameters())
    assert whole.sparsity_of(masks, "decoder") == pytest.approx(removed / (3 * per_layer))
    assert whole.sparsity_of(masks, "vision") == 0


def test_models_without_an_answer_decoder_refuse_to_prune_one(tmp_path) -> None:
    config = EfficientVLMConfig.from_preset("tiny")
    captioning = EfficientVLMForConditionalGeneration(config)
    assert not any("decoder" in key for key in captioning.structure_sizes())  # its text stack is its decoder
    for model in (captioning, EfficientVLMForImageTextRetrieval(config)):
        with pytest.raises(ValueError, match="no separate decoder"):
            model.structure_sizes(include_decoder=True)
        with pytest.raises(ValueError, match="no separate decoder"):
            StructureMasker.from_model(model, include_decoder=True)
    with pytest.raises(ValueError, match="EfficientVLMModel has no decoder"):
        StructureMasker.from_model(EfficientVLMModel(config), include_decoder=True)
    with pytest.raises(ValueError, match="no separate decoder"):
        ModalAdaptivePruningTrainer(
            model=EfficientVLMForImageTextRetrieval(config),
            args=_training_args(tmp_path),
            pruning_config=PruningConfig(target_sparsity=0.3, prune_decoder=True),
        )
    # A masker and a setting that disagree, and decoder sizes that do not fit the decoder, are named errors.
    vqa = EfficientVLMForQuestionAnswering(config)
    with pytest.raises(ValueError, match="prune_decoder"):
        ModalAdaptivePruningTrainer(
            model=vqa,
            args=_training_args(tmp_path),
            pruning_config=PruningConfig(target_sparsity=0.3),
            masker=StructureMasker.from_model(vqa, include_decoder=True),
        )
    with pytest.raises(ValueError, match="3 entries but the answer decoder has 2 layers"):
        EfficientVLMConfig.from_preset("tiny", answer_decoder_intermediate_size_per_layer=[1, 2, 3])
    with pytest.raises(ValueError, match=r"answer_decoder_num_cross_attention_heads_per_layer\[1\]"):
        EfficientVLMConfig.from_preset("tiny", answer_decoder_num_cross_attention_heads_per_layer=[4, 5])


def _training_args(tmp_path):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, max_steps=1)


def test_prune_command_with_prune_decoder_prunes_and_reports_the_decoder(tmp_path) -> None:
    from trainers import commands as cli

    from .data_utils import COLOURS, write_vocab, write_vqa_json

    records, image_root = write_vqa_json(tmp_path, n=6)
    answer_list = tmp_path / "answer_list.json"
    answer_list.write_text(json.dumps(COLOURS))
    output = tmp_path / "pruned"
    argv = ["prune", "--task", "vqa", "--preset", "tiny", "--vocab_file", str(write_vocab(tmp_path))]
    argv += ["--train_file", str(records), "--eval_file", str(records), "--image_root", str(image_root)]
    argv += ["--answer_list", str(answer_list), "--target_sparsity", "0.3", "--prune_decoder"]
    argv += ["--mask_learning_rate", "0.5", "--output_dir", str(output), "--max_steps", "3"]
    argv += ["--per_device_train_batch_size", "3", "--report_to", "none", "--use_cpu", "--save_strategy", "no"]
    assert cli.main(argv) == 0

    report = json.loads((output / PRUNING_REPORT_FILE).read_text())
    assert report["pruning_config"]["prune_decoder"] is True
    assert set(report["sparsity_per_modality"]) == {"vision", "text", "fusion", "decoder"}
    assert set(report["kept_per_modality"]["decoder"]) == set(DECODER_MASK_KEYS)
    # The accounting includes the decoder's parameters, exactly as the masker of a fresh tiny VQA model counts them.
    fresh = StructureMasker.from_model(
        EfficientVLMForQuestionAnswering(EfficientVLMConfig.from_preset("tiny")), include_decoder=True
    )
    per_modality = report["prunable_parameters_per_modality"]
    assert per_modality["decoder"] == fresh.total_parameters("decoder") > 0
    assert report["prunable_parameters"] == sum(per_modality.values()) == fresh.total_parameters()
    assert 0 < report["sparsity_per_modality"]["decoder"] < 1  # at the masks' start some FFN neurons already go
    reloaded = EfficientVLMForQuestionAnswering.from_pretrained(output)
    assert reloaded.structure_sizes(include_decoder=True) == report["padding"]["structures_after"]
    assert sum(p.numel() for p in reloaded.parameters()) == report["parameters_after"]
    assert sum(reloaded.config.answer_decoder_intermediate_size_per_layer) < sum(fresh.structure_sizes["decoder_ffn"])
    card = (output / "README.md").read_text()
    assert f"- decoder: {report['sparsity_per_modality']['decoder']:.3f} of its prunable parameters removed" in card
    assert 0 <= json.loads((output / "eval_results.json").read_text())["vqa_accuracy"] <= 1
