"""ONNX export: every task's inference graphs from pruned tiny models (uneven layers, layers with no head or no FFN
neuron left) match PyTorch in onnxruntime at other batch / sequence sizes than traced, the onnxruntime-backed models
give the PyTorch models' task outputs, int8 graphs run, a mismatch raises naming the graph, and the command exports,
compares latency and scores an eval file for PyTorch, ONNX fp32 and int8."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoProcessor

from modeling_efficientvlm import (
    EfficientVLMConfig,
    EfficientVLMForConditionalGeneration,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForPreTraining,
    EfficientVLMForQuestionAnswering,
    EfficientVLMForVisualReasoning,
    EfficientVLMModel,
)
from trainers import commands as cli
from trainers.deployment import OnnxParityError, export_onnx, load_onnx_model, read_manifest
from trainers.deployment.comparison import format_accuracy
from trainers.deployment.graphs import GraphSpec, TensorSpec, task_graphs
from trainers.deployment.onnx_export import MANIFEST_NAME, OPSET, _export_graph, check_export_folder, check_parity
from trainers.tasks import build_dataset, evaluate_task

from .data_utils import CLS_ID, PAD_ID, SEP_ID, make_image, make_processor, write_image_text_json, write_vqa_json
from .model_utils import prune_unevenly

EXPECTED_GRAPHS = {
    EfficientVLMForImageTextRetrieval: ("retrieval", ["image_features", "text_features", "itm_scores"]),
    EfficientVLMForQuestionAnswering: ("vqa", ["vqa_encoder", "vqa_decoder"]),
    EfficientVLMForVisualReasoning: ("nlvr2", ["nlvr2"]),
    EfficientVLMForConditionalGeneration: ("captioning", ["caption_image_encoder", "caption_decoder"]),
}


def _config() -> EfficientVLMConfig:
    text = {"bos_token_id": CLS_ID, "eos_token_id": SEP_ID, "pad_token_id": PAD_ID}
    return EfficientVLMConfig.from_preset("tiny", text_config=text)


def _pruned(model_class: type, seed: int = 0) -> torch.nn.Module:
    """A tiny model pruned unevenly: the first layer of every stack loses all its heads and FFN neurons (empty
    blocks), the others lose about half, at random."""
    torch.manual_seed(seed)
    return prune_unevenly(model_class(_config()).eval(), seed)


def _inputs(batch: int = 3, seq: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (batch, seq), generator=generator)
    ids[:, 0] = CLS_ID
    mask = torch.ones_like(ids)
    mask[-1, seq - 2 :] = 0
    return {
        "pixel_values": torch.randn(batch, 3, 32, 32, generator=generator),
        "input_ids": ids,
        "attention_mask": mask,
    }


@torch.no_grad()
def _task_outputs(task: str, model, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The task-level inference of `model` (PyTorch or onnxruntime-backed) through its public inference methods."""
    if task == "retrieval":
        image_states, image_embeds = model.embed_images(inputs["pixel_values"])
        text_states, text_embeds = model.embed_texts(inputs["input_ids"], inputs["attention_mask"])
        itc = model.itc_scores(image_embeds, text_embeds)
        rerank = [model.itm_rerank_scores(image_states, text_states, inputs["attention_mask"], itc, k=2)]
        # With the ITC logit added: the manifest carries the learned temperature.
        rerank.append(
            model.itm_rerank_scores(image_states, text_states, inputs["attention_mask"], itc, k=2, score="log_odds+itc")
        )
        return [itc, *(scores for pair in rerank for scores in pair)]
    if task == "vqa":
        candidates = torch.tensor([[CLS_ID, 7, SEP_ID, PAD_ID], [CLS_ID, 9, 12, SEP_ID], [CLS_ID, 30, SEP_ID, PAD_ID]])
        ranking = model.rank_answers(**inputs, answer_candidates_ids=candidates, answer_candidates_mask=None, k=2)
        return [ranking.topk_indices.float(), ranking.topk_scores]
    if task == "nlvr2":
        pixel_values = torch.stack([inputs["pixel_values"], inputs["pixel_values"].flip(0)], dim=1)
        return [model(pixel_values, inputs["input_ids"], inputs["attention_mask"]).logits]
    prompt = inputs["input_ids"][:, :3]
    return [model.generate(pixel_values=inputs["pixel_values"], input_ids=prompt, max_new_tokens=5).float()]


@pytest.mark.parametrize("model_class", list(EXPECTED_GRAPHS), ids=lambda cls: EXPECTED_GRAPHS[cls][0])
def test_pruned_task_model_exports_every_graph_and_matches_pytorch(model_class, tmp_path) -> None:
    task, names = EXPECTED_GRAPHS[model_class]
    model = _pruned(model_class)
    sizes = model.structure_sizes()
    assert 0 in sizes["vision_heads"] and 0 in sizes["text_ffn"] and len(set(sizes["fusion_heads"])) > 1

    result = export_onnx(model, tmp_path, int8=True)

    manifest = read_manifest(tmp_path)
    assert manifest["task"] == task and list(manifest["graphs"]) == names
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == manifest
    for name in names:
        entry = manifest["graphs"][name]
        assert (tmp_path / entry["file"]).is_file() and (tmp_path / entry["int8_file"]).is_file()
        assert entry["inputs"] and entry["outputs"] and all("batch" in spec["shape"] for spec in entry["inputs"])
        assert result.max_errors[name] <= 1e-4
    assert manifest["chaining"] and (tmp_path / "config.json").is_file()

    # Task-level inference on the onnxruntime graphs gives PyTorch's results.
    inputs = _inputs()
    expected = _task_outputs(task, model, inputs)
    for got, want in zip(_task_outputs(task, load_onnx_model(tmp_path), inputs), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # int8 graphs run and give outputs of the same shapes.
    for got, want in zip(_task_outputs(task, load_onnx_model(tmp_path, int8=True), inputs), expected):
        assert got.shape == want.shape and torch.isfinite(got).all()


def test_unpruned_nlvr2_graph_runs_at_every_batch_size(tmp_path) -> None:
    # The image pair is split by slicing at the traced batch size; unbinding it kept the traced batch as a constant
    # in the fusion layers' cross-attention, and the graph failed at any other batch.
    torch.manual_seed(0)
    model = EfficientVLMForVisualReasoning(_config()).eval()
    export_onnx(model, tmp_path)
    onnx_model = load_onnx_model(tmp_path)
    for batch in (1, 2, 4):
        inputs = _inputs(batch=batch, seed=batch)
        torch.testing.assert_close(
            _task_outputs("nlvr2", onnx_model, inputs)[0], _task_outputs("nlvr2", model, inputs)[0], rtol=0, atol=1e-4
        )


def test_a_graph_that_differs_from_pytorch_raises_naming_it(tmp_path) -> None:
    model = _pruned(EfficientVLMForVisualReasoning)
    export_onnx(model, tmp_path)
    _, (graph,) = task_graphs(model)
    with torch.no_grad():
        model.cls_head[-1].bias += 0.01  # PyTorch now disagrees with the exported file
    with pytest.raises(OnnxParityError, match=r"'nlvr2' differs from PyTorch: max \|difference\| 0\.01"):
        check_parity(graph, tmp_path / "nlvr2.onnx")


def test_an_export_over_an_earlier_one_leaves_none_of_its_graphs(tmp_path) -> None:
    """Exporting again without --int8 (or another task) left the earlier `*.int8.onnx` graphs beside the new ones,
    and `load_onnx_model(int8=True)` then said 'no int8 graphs' with the files in plain sight."""
    from transformers.testing_utils import CaptureLogger

    from trainers.deployment import onnx_export

    export_onnx(_pruned(EfficientVLMForVisualReasoning), tmp_path, int8=True)
    assert (tmp_path / "nlvr2.int8.onnx").is_file()
    with CaptureLogger(onnx_export.logger) as logged:
        export_onnx(_pruned(EfficientVLMForVisualReasoning, seed=1), tmp_path)
    assert "Removed from" in logged.out and "nlvr2.int8.onnx" in logged.out
    assert sorted(path.name for path in tmp_path.glob("*.onnx")) == ["nlvr2.onnx"]
    export_onnx(_pruned(EfficientVLMForImageTextRetrieval), tmp_path)  # another task's graphs replace these
    assert sorted(path.name for path in tmp_path.glob("*.onnx")) == [
        "image_features.onnx",
        "itm_scores.onnx",
        "text_features.onnx",
    ]


def test_missing_export_files_are_named_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="no onnx_manifest.json"):
        load_onnx_model(tmp_path)
    export_onnx(_pruned(EfficientVLMForVisualReasoning), tmp_path)
    with pytest.raises(ValueError, match="no int8 graphs; export with --int8"):
        load_onnx_model(tmp_path, int8=True)
    with pytest.raises(ValueError, match="takes no structure masks"):
        load_onnx_model(tmp_path)(torch.zeros(1, 2, 3, 32, 32), torch.ones(1, 3, dtype=torch.long), structure_masks={})


def test_an_unknown_itm_score_is_refused_before_the_session_runs(tmp_path, monkeypatch) -> None:
    export_onnx(_pruned(EfficientVLMForImageTextRetrieval), tmp_path)
    model = load_onnx_model(tmp_path)
    image_states, _ = model.embed_images(_inputs()["pixel_values"])
    text_states, _ = model.embed_texts(_inputs()["input_ids"])
    monkeypatch.setattr(model, "run", lambda *args: pytest.fail("the ITM graph ran"))
    with pytest.raises(ValueError, match=r"`score` must be one of .*'log_odds'.*; got 'logits'"):
        model.itm_scores(image_states, text_states, None, score="logits")
    # An export without the ITC temperature (made before it was written) names the folder and what to do.
    del model.manifest["itc_logit_scale"]
    with pytest.raises(ValueError, match=f"{tmp_path} holds no ITC temperature.*export the model again"):
        model.itc_logit_scale()


def test_onnx_nlvr2_predicts_from_images_and_sentences_as_pytorch_does(tmp_path) -> None:
    processor = make_processor(tmp_path)
    model = _pruned(EfficientVLMForVisualReasoning)
    export_onnx(model, tmp_path / "nlvr2")
    onnx_model = load_onnx_model(tmp_path / "nlvr2")
    lefts, rights = [make_image("red"), make_image("blue")], [make_image("green"), make_image("red", size=40)]
    sentences = ["both are red", "one circle"]
    with torch.no_grad():
        expected = model.predict(lefts, rights, sentences, processor)
    got = onnx_model.predict(lefts, rights, sentences, processor)
    assert [row["label"] for row in got] == [row["label"] for row in expected]
    for row, reference in zip(got, expected):
        assert row["probabilities"].keys() == reference["probabilities"].keys() == {"False", "True"}
        for name, probability in reference["probabilities"].items():
            assert row["probabilities"][name] == pytest.approx(probability, abs=1e-4)
    with pytest.raises(ValueError, match="Got 2 left images, 1 right images and 2 sentences"):
        onnx_model.predict(lefts, rights[:1], sentences, processor)


def test_onnx_captioning_scores_its_eval_split_as_pytorch_does(tmp_path) -> None:
    """`export --eval_file` scores captioning through `evaluate_task`, which passes the decoding options at their
    greedy defaults (num_beams 1, min_new_tokens 0): the ONNX model takes those, and the same captions come out."""
    processor = make_processor(tmp_path)
    model = _pruned(EfficientVLMForConditionalGeneration)
    export_onnx(model, tmp_path / "onnx")
    data, image_root = write_image_text_json(tmp_path, n=3)
    dataset = build_dataset("captioning", str(data), image_root, processor)
    expected = evaluate_task("captioning", model, dataset, processor, max_new_tokens=4).predictions
    got = evaluate_task("captioning", load_onnx_model(tmp_path / "onnx"), dataset, processor, max_new_tokens=4)
    assert got.predictions == expected
    with pytest.raises(ValueError, match=r"cannot honour \['min_new_tokens'\]"):
        evaluate_task("captioning", load_onnx_model(tmp_path / "onnx"), dataset, processor, min_new_tokens=2)


def test_onnx_captioning_refuses_padded_prompts_as_pytorch_does(tmp_path) -> None:
    """onnxruntime captioning took a batch of prompts of different lengths and generated after their [SEP] / [PAD];
    it now checks the prompt with PyTorch's own function, so both raise the same error."""
    model = _pruned(EfficientVLMForConditionalGeneration)
    export_onnx(model, tmp_path / "onnx")
    onnx_model = load_onnx_model(tmp_path / "onnx")
    processor = make_processor(tmp_path)
    prompts = processor(text=["a picture of", "a picture of a red square"], padding="longest", return_tensors="pt")
    assert (prompts["attention_mask"] == 0).any()
    pixel_values = _inputs(batch=2)["pixel_values"]
    for generator in (model, onnx_model):
        with pytest.raises(ValueError, match=r"^Prompts must not be padded: give every image the same prompt"):
            generator.generate(pixel_values=pixel_values, **prompts, max_new_tokens=3)
    three = _inputs(batch=3)["pixel_values"]
    with pytest.raises(ValueError, match=r"^2 prompts for 3 images; pass one prompt or one per image\.$"):
        onnx_model.generate(pixel_values=three, input_ids=prompts["input_ids"][:, :3], max_new_tokens=3)
    # One prompt from the processor (its [SEP] dropped) still captions every image as PyTorch does.
    prompt = processor(text=["a picture of"], return_tensors="pt")
    want = model.generate(pixel_values=pixel_values, **prompt, max_new_tokens=4)
    torch.testing.assert_close(onnx_model.generate(pixel_values=pixel_values, **prompt, max_new_tokens=4), want)


def test_onnx_captioning_defaults_and_lengths_are_pytorchs_and_other_options_are_refused(tmp_path) -> None:
    """ONNX `generate` stopped 20 new tokens after the prompt where PyTorch's default is `config.max_text_length`
    tokens in all, ignored `max_length`, and ignored `num_beams` / `min_new_tokens` silently."""
    model = _pruned(EfficientVLMForConditionalGeneration).eval()
    export_onnx(model, tmp_path / "onnx")
    onnx_model = load_onnx_model(tmp_path / "onnx")
    pixel_values = _inputs(batch=2)["pixel_values"]
    prompt = make_processor(tmp_path)(text=["a picture of"], return_tensors="pt")
    for lengths in ({}, {"max_length": 6}, {"max_new_tokens": 2}):
        with torch.no_grad():
            want = model.generate(pixel_values=pixel_values, **prompt, **lengths)
        torch.testing.assert_close(onnx_model.generate(pixel_values=pixel_values, **prompt, **lengths), want)
    assert want.shape[1] <= 2 + prompt["input_ids"].shape[1] - 1
    for option in ({"num_beams": 3}, {"min_new_tokens": 8}, {"do_sample": True}):
        with pytest.raises(ValueError, match=r"decodes greedily .* cannot honour \['\w+'\]: use the PyTorch"):
            onnx_model.generate(pixel_values=pixel_values, **prompt, **option)
    onnx_model.generate(pixel_values=pixel_values, num_beams=1, do_sample=False, max_new_tokens=1)  # greedy: fine
    # The images may come first unnamed, as PyTorch's `generate(inputs)` takes them; nothing else by position (the
    # PyTorch model's second one is a generation config: a prompt there was read as something else).
    with torch.no_grad():
        want = model.generate(pixel_values, max_new_tokens=2)
    torch.testing.assert_close(onnx_model.generate(pixel_values, max_new_tokens=2), want)
    with pytest.raises(TypeError, match="positional"):
        onnx_model.generate(pixel_values, prompt["input_ids"])


def test_onnx_models_refuse_text_past_the_position_table_before_running_as_pytorch_does(tmp_path) -> None:
    """70 tokens for a 64-position model failed in onnxruntime with a broadcast error (and ONNX captioning with
    max_new_tokens=70 ran about 60 steps first); PyTorch names the position table. Now both say the same, before
    any graph runs, from the manifest's max_position_embeddings (or, in an older export, the config's)."""
    nlvr2, captioning = _pruned(EfficientVLMForVisualReasoning), _pruned(EfficientVLMForConditionalGeneration)
    export_onnx(nlvr2, tmp_path / "nlvr2")
    export_onnx(captioning, tmp_path / "captioning")
    assert read_manifest(tmp_path / "nlvr2")["max_position_embeddings"] == 64
    long = _inputs(batch=2, seq=70)
    pixel_pairs = torch.stack([long["pixel_values"]] * 2, dim=1)
    onnx_nlvr2 = load_onnx_model(tmp_path / "nlvr2")
    for model in (nlvr2, onnx_nlvr2):
        with pytest.raises(ValueError, match=r"^The text has 70 tokens but the model's position table holds 64; "):
            model(pixel_pairs, long["input_ids"], long["attention_mask"])
    onnx_captioning = load_onnx_model(tmp_path / "captioning")
    onnx_captioning.run = lambda *args: pytest.fail("a graph ran")
    prompt = long["input_ids"][:, :3]
    message = (
        "`max_new_tokens`=70 after the 3 tokens it starts from allows sequences of 73 tokens, but the model's "
        "position table holds 64: pass "
    )
    for model in (captioning, onnx_captioning):
        with pytest.raises(ValueError, match=re.escape(message)):
            model.generate(pixel_values=long["pixel_values"], input_ids=prompt, max_new_tokens=70)
    with pytest.raises(ValueError, match=r"^The prompt has 64 tokens but the model's position table holds 64: it "):
        onnx_captioning.generate(pixel_values=long["pixel_values"], input_ids=long["input_ids"][:, :64])
    # An export from before the manifest held it: the config's table is checked.
    del onnx_nlvr2.manifest["max_position_embeddings"]
    (tmp_path / "nlvr2" / MANIFEST_NAME).write_text(json.dumps(onnx_nlvr2.manifest))
    with pytest.raises(ValueError, match="The text has 70 tokens but the model's position table holds 64"):
        load_onnx_model(tmp_path / "nlvr2")(pixel_pairs, long["input_ids"], long["attention_mask"])


def test_export_command_compares_latency_and_accuracy_of_pytorch_onnx_and_int8(tmp_path, capsys) -> None:
    processor = make_processor(tmp_path)
    model = _pruned(EfficientVLMForQuestionAnswering)
    model.set_answer_candidates(["red", "green", "blue", "yellow"], processor)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    eval_file, image_root = write_vqa_json(tmp_path, n=4)

    exit_code = cli.main(
        ["export", "--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "onnx"), "--int8",
         "--eval_file", str(eval_file), "--image_root", str(image_root), "--benchmark_batch_size", "2",
         "--benchmark_text_length", "6", "--repeats", "1", "--rounds", "1"]
    )  # fmt: skip
    assert exit_code == 0
    out = capsys.readouterr().out
    assert "vqa_encoder: parity with PyTorch OK" in out and "| ONNX int8 |" in out
    saved = json.loads((tmp_path / "onnx" / "export_report.json").read_text())
    metrics = saved["metrics"]
    assert list(metrics) == ["PyTorch", "PyTorch int8", "ONNX fp32", "ONNX int8"]
    assert metrics["ONNX fp32"]["vqa_accuracy"] == metrics["PyTorch"]["vqa_accuracy"]
    assert all(0.0 <= metrics[name]["vqa_accuracy"] <= 1.0 for name in ("PyTorch int8", "ONNX int8"))
    latency = {row["backend"]: row for row in saved["latency"]}
    assert list(latency) == ["PyTorch", "PyTorch int8", "ONNX fp32", "ONNX int8"]
    assert latency["PyTorch"]["speedup"] == 1.0 and latency["ONNX fp32"]["max_abs_difference"] <= 1e-4
    assert 0 < latency["ONNX int8"]["max_abs_difference"] < 1.0  # int8 is close, not equal
    assert "vqa_accuracy" in out and "(change +0.0000)" in out
    # The folder is self-contained: the processor travels with the graphs.
    assert (tmp_path / "onnx" / "tokenizer_config.json").is_file() or (tmp_path / "onnx" / "vocab.txt").is_file()
    # Its config and processor name only code the folder holds (no PyTorch model class: it has graphs, not weights),
    # so both load as remote code from it alone.
    for name in ("config.json", "processor_config.json"):
        auto_map = json.loads((tmp_path / "onnx" / name).read_text())["auto_map"]
        assert not [key for key in auto_map if key.startswith("AutoModel")]
        assert all((tmp_path / "onnx" / f"{entry.split('.')[0]}.py").is_file() for entry in auto_map.values())
    config = AutoConfig.from_pretrained(tmp_path / "onnx", trust_remote_code=True)
    assert config.answer_candidates == ["red", "green", "blue", "yellow"]
    processor = AutoProcessor.from_pretrained(tmp_path / "onnx", trust_remote_code=True)
    assert type(processor).__name__ == "EfficientVLMProcessor"


def _saved_with_processor(model, tmp_path) -> tuple:
    processor = make_processor(tmp_path)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return processor, str(tmp_path / "model")


def test_export_ranks_retrieval_by_the_given_itm_score_as_evaluate_does_and_says_which(tmp_path, capsys) -> None:
    """`export --eval_file` ranked retrieval by the raw ITM logit whatever was asked, and did not say so: a demo
    model reported by `evaluate --itm_score log_odds+itc` scored lower here. Now it takes evaluate's flag."""
    model = _pruned(EfficientVLMForImageTextRetrieval)
    processor, folder = _saved_with_processor(model, tmp_path)
    eval_file, image_root = write_image_text_json(tmp_path, n=4)
    cli.main(
        ["export", "--model_name_or_path", folder, "--output_dir", str(tmp_path / "onnx"), "--eval_file",
         str(eval_file), "--image_root", str(image_root), "--benchmark_batch_size", "0", "--k", "3",
         "--itm_score", "log_odds+itc"]
    )  # fmt: skip
    dataset = build_dataset("retrieval", str(eval_file), image_root, processor)
    expected = evaluate_task("retrieval", model, dataset, processor, k=3, itm_score="log_odds+itc").metrics
    assert "itm_r_mean" in expected  # only "log_odds+itc" reports the log-odds alone beside it
    saved = json.loads((tmp_path / "onnx" / "export_report.json").read_text())
    assert saved["itm_score"] == "log_odds+itc"
    assert saved["metrics"]["PyTorch"] == pytest.approx(expected, abs=1e-9)
    assert saved["metrics"]["ONNX fp32"] == pytest.approx(expected, abs=1e-9)
    out = capsys.readouterr().out
    assert (
        "(4 images, 8 texts; the top 3 ITC candidates of each query re-ranked by the ITM head's match log-odds plus "
        "the pair's ITC logit (cosine / temperature), --itm_score log_odds+itc):"
    ) in out


def test_export_scores_vqa_on_the_given_answer_list(tmp_path) -> None:
    """A VQA model without saved candidates failed after exporting, asking for `--answer_list`, which export did not
    accept; now it takes the flag (a JSON list file) and ranks those answers. The export has no candidates to rank
    by default (it exported silently): a warning says so and how to add them, and its `rank_answers` without
    candidates says what to do with an ONNX model (it advised the PyTorch model's `set_answer_candidates`)."""
    model = _pruned(EfficientVLMForQuestionAnswering)
    processor, folder = _saved_with_processor(model, tmp_path)
    eval_file, image_root = write_vqa_json(tmp_path, n=3)
    answers = ["red", "green", "blue", "yellow"]
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    no_candidates = (
        r"This VQA model has no answer candidates \(`config\.answer_candidates`\), so its export has none either: .*"
        r"set them on the PyTorch model \(`model\.set_answer_candidates\(answers, processor\)`.* and export again; "
        r"`efficientvlm export --answer_list` only scores `--eval_file`\."
    )
    with pytest.warns(UserWarning, match=no_candidates):
        cli.main(
            ["export", "--model_name_or_path", folder, "--output_dir", str(tmp_path / "onnx"), "--eval_file",
             str(eval_file), "--image_root", str(image_root), "--benchmark_batch_size", "0", "--answer_list",
             str(tmp_path / "answers.json")]
        )  # fmt: skip
    dataset = build_dataset("vqa", str(eval_file), image_root, processor)
    expected = evaluate_task("vqa", model, dataset, processor, answer_list=answers).metrics
    metrics = json.loads((tmp_path / "onnx" / "export_report.json").read_text())["metrics"]
    assert metrics == {"PyTorch": expected, "ONNX fp32": expected}
    assert "itm_score" not in json.loads((tmp_path / "onnx" / "export_report.json").read_text())

    onnx_vqa = load_onnx_model(tmp_path / "onnx")
    assert not hasattr(onnx_vqa, "generate")  # captioning's (the README lists it so)
    inputs = _inputs(batch=1)
    with pytest.raises(ValueError) as refused:
        onnx_vqa.rank_answers(**inputs)
    assert str(refused.value).startswith(f"{tmp_path / 'onnx'} holds no answer candidates (its model had none when ")
    assert "pass `answer_candidates_ids` (and `answer_candidates_mask`) to `rank_answers`" in str(refused.value)
    candidates = processor.tokenizer(answers, padding="longest", return_tensors="pt")
    ranking = onnx_vqa.rank_answers(**inputs, answer_candidates_ids=candidates["input_ids"], k=2)
    assert 0 <= int(ranking.topk_indices[0, 0]) < len(answers)


def test_export_refuses_a_bad_itm_score_or_an_answer_list_outside_vqa_before_exporting(tmp_path) -> None:
    torch.manual_seed(0)
    EfficientVLMForVisualReasoning(_config()).save_pretrained(tmp_path / "model")
    base = ["export", "--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "onnx")]
    with pytest.raises(ValueError, match=r"--itm_score must be one of \('probability', .*'log_odds\+itc'\); got 'lgt'"):
        cli.main([*base, "--itm_score", "lgt"])
    (tmp_path / "answers.json").write_text(json.dumps(["yes", "no"]))
    with pytest.raises(ValueError, match="--answer_list is the candidate answers of VQA; the nlvr2 task has none"):
        cli.main([*base, "--answer_list", str(tmp_path / "answers.json")])
    assert not (tmp_path / "onnx").exists()


def test_export_refuses_what_it_cannot_do_before_exporting_anything(tmp_path, monkeypatch) -> None:
    """Each of these failed only after every graph was exported and timed (or, for a bare EfficientVLMModel, asked
    for a TaskSpec "to distil it"); now each is a named error before the first graph."""
    monkeypatch.setattr("trainers.deployment.onnx_export.export_onnx", lambda *a, **k: pytest.fail("it exported"))
    torch.manual_seed(0)
    processor = make_processor(tmp_path)
    folders = {}
    for name, model in {
        "vqa": EfficientVLMForQuestionAnswering(_config()),  # no answer candidates saved
        "pretraining": EfficientVLMForPreTraining(_config()),
        "bare": EfficientVLMModel(_config()),
    }.items():
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    vqa_file, vqa_images = write_vqa_json(tmp_path, n=2)
    retrieval_file, retrieval_images = write_image_text_json(tmp_path, n=2)
    cases = [
        ("pretraining", ["--eval_file", str(retrieval_file), "--image_root", str(retrieval_images)],
         r"^--eval_file scores a task model, but .*pretraining is a pretraining model \(EfficientVLMForPreTraining\), "
         r"which has no task metric: export it without --eval_file"),
        ("vqa", ["--eval_file", str(retrieval_file), "--image_root", str(retrieval_images)],
         r"Record 0 in .*image_text\.json has none of the fields \['question', 'text'\]"),
        ("vqa", ["--eval_file", str(vqa_file)],
         r"Record 0 in .*vqa\.json: image file q0\.png not found \(no image root: the path is read from the working "),
        ("vqa", ["--eval_file", str(vqa_file), "--image_root", str(vqa_images)],
         r"^--eval_file: VQA ranks candidate answers, and .*vqa has none saved \(`config\.answer_candidates`\); give "
         r"--answer_list"),
        ("vqa", ["--rounds", "0"],
         r"^--rounds must be at least 1 for the latency comparison; got 0 \(skip the comparison with "
         r"--benchmark_batch_size 0\)\.$"),
        ("vqa", ["--repeats", "0"], r"^--repeats must be at least 1 for the latency comparison; got 0"),
        ("vqa", ["--benchmark_text_length", "65"], r"^--benchmark_text_length 65 is longer than the model's position "
         r"table \(64\); give at most 64\.$"),
        ("bare", [],
         r"^--model_name_or_path .*bare: EfficientVLMModel has no inference graphs to export: export a task model, "
         r"one of EfficientVLMForPreTraining, EfficientVLMForImageTextRetrieval, .*fine-tune it for a task"),
    ]  # fmt: skip
    for folder, flags, message in cases:
        with pytest.raises((ValueError, OSError), match=message):
            cli.main(
                ["export", "--model_name_or_path", folders[folder], "--output_dir", str(tmp_path / "onnx"), *flags]
            )
    assert not (tmp_path / "onnx").exists()
    monkeypatch.undo()  # the Python API too: a named error, no folder made
    with pytest.raises(ValueError, match=r"^EfficientVLMModel has no inference graphs to export"):
        export_onnx(EfficientVLMModel(_config()), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_export_refuses_an_output_dir_that_holds_a_saved_model_not_an_earlier_export(tmp_path) -> None:
    """`--output_dir` a model folder: the export wrote its config.json and processor over that model's, which no
    longer loaded (another task's config over its weights). Now refused before anything is written; an earlier
    export folder is still written over."""
    torch.manual_seed(0)
    _, folder = _saved_with_processor(EfficientVLMForVisualReasoning(_config()), tmp_path)
    EfficientVLMForVisualReasoning(_config()).save_pretrained(tmp_path / "other")
    saved = {path.name: path.read_bytes() for path in (tmp_path / "model").iterdir() if path.is_file()}
    export = ["export", "--model_name_or_path", str(tmp_path / "other"), "--benchmark_batch_size", "0"]
    message = (
        rf"^--output_dir {re.escape(folder)} holds a saved model \(config\.json, model\.safetensors\): an export "
        r"there would write its own config\.json and processor over that model's, and the model would no longer "
        r"load\. Export to a folder of its own \(or to an earlier export folder, one with onnx_manifest\.json\)\.$"
    )
    with pytest.raises(ValueError, match=message):
        cli.main([*export, "--output_dir", folder])
    with pytest.raises(ValueError, match=rf"^{re.escape(folder)} holds a saved model"):
        export_onnx(EfficientVLMForImageTextRetrieval(_config()), folder)
    assert {path.name: path.read_bytes() for path in (tmp_path / "model").iterdir() if path.is_file()} == saved

    # An export folder (config.json, processor, graphs) is no saved model: another export may replace it.
    cli.main(["export", "--model_name_or_path", folder, "--output_dir", str(tmp_path / "onnx"), *export[3:]])
    assert (tmp_path / "onnx" / "config.json").is_file() and (tmp_path / "onnx" / "tokenizer.json").is_file()
    check_export_folder(tmp_path / "onnx", "--output_dir")


def test_export_of_a_folder_without_a_processor_says_the_graphs_have_none(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    EfficientVLMForVisualReasoning(_config()).save_pretrained(tmp_path / "model")  # weights and config only
    exit_code = cli.main(
        ["export", "--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "onnx"),
         "--benchmark_batch_size", "0"]
    )  # fmt: skip
    assert exit_code == 0 and (tmp_path / "onnx" / "nlvr2.onnx").is_file()
    assert f"Note: {tmp_path / 'model'} has no processor" in capsys.readouterr().out
    assert not (tmp_path / "onnx" / "preprocessor_config.json").exists()


def test_an_input_pruning_cut_off_is_left_out_of_the_graph_and_the_manifest_says_so(tmp_path) -> None:
    """With every fusion cross-attention head pruned, ITM no longer reads the image: the exporter drops that input,
    the manifest names it, and the onnxruntime model still scores (it feeds only what the graph takes)."""
    torch.manual_seed(0)
    model = EfficientVLMForImageTextRetrieval(_config()).eval()
    model.prune({"fusion_cross_heads": [torch.zeros(n) for n in model.structure_sizes()["fusion_cross_heads"]]})
    export_onnx(model, tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["graphs"]["itm_scores"]["unused_inputs"] == ["image_states"]
    assert "unused_inputs" not in manifest["graphs"]["image_features"]
    inputs = _inputs()
    for got, want in zip(
        _task_outputs("retrieval", load_onnx_model(tmp_path), inputs), _task_outputs("retrieval", model, inputs)
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_the_readme_onnxruntime_snippet_runs_on_an_export_whose_graph_dropped_the_image(tmp_path, monkeypatch) -> None:
    """The README fed pixel_values, input_ids and attention_mask to the VQA encoder session; a heavily pruned export
    leaves out the image (no cross-attention head left), and onnxruntime said "Invalid input name: pixel_values".
    The snippet now feeds the names the session takes."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    [snippet] = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "ort.InferenceSession" in block]
    torch.manual_seed(0)
    model = EfficientVLMForQuestionAnswering(_config()).eval()
    model.prune({"fusion_cross_heads": [torch.zeros(n) for n in model.structure_sizes()["fusion_cross_heads"]]})
    processor = make_processor(tmp_path)
    model.set_answer_candidates(["red", "green", "blue"], processor)
    monkeypatch.chdir(tmp_path)
    export_onnx(model, "pruned_vqa_onnx", int8=True, processor=processor)
    assert read_manifest("pruned_vqa_onnx")["graphs"]["vqa_encoder"]["unused_inputs"] == ["pixel_values"]
    namespace = {"image": make_image("red")}
    exec(snippet, namespace)
    inputs = namespace["inputs"]
    with torch.no_grad():
        _, _, expected, _ = model.encode_question(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(
        torch.from_numpy(namespace["question_states"]), expected.last_hidden_state, rtol=0, atol=1e-4
    )


def test_export_command_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: efficientvlm export ") and "--int8" in out and "--eval_file" in out


def test_a_graph_that_kept_a_traced_size_fails_parity_naming_it(tmp_path) -> None:
    """A batch size baked in at trace time (as `.split(batch)` did in NLVR2) breaks the graph at other sizes."""

    class BakedBatch(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            first, second = x.split(x.shape[0] // 2)
            return first + second

    graph = GraphSpec(
        "halves",
        BakedBatch(),
        (TensorSpec("x", "float32", ("batch", 3)),),
        (TensorSpec("y", "float32", ("batch", 3)),),
        "sums the two halves of a batch",
        lambda b, s, g: (torch.randn(2 * b, 3, generator=g),),
    )
    _export_graph(graph, tmp_path / "halves.onnx", OPSET)
    check_parity(graph, tmp_path / "halves.onnx", sizes=((2, 8),))  # the traced size works
    with pytest.raises(OnnxParityError, match="'halves' fails in onnxruntime at batch 3"):
        check_parity(graph, tmp_path / "halves.onnx", sizes=((3, 4),))


def test_accuracy_report_gives_each_backends_change_of_the_primary_metric() -> None:
    metrics = {"PyTorch": {"cider": 0.5, "bleu_4": 0.1}, "ONNX int8": {"cider": 0.375, "bleu_4": 0.125}}
    lines = format_accuracy("captioning", metrics).splitlines()
    assert lines == [
        "PyTorch: cider 0.5000 (change +0.0000); bleu_4 0.1000",
        "ONNX int8: cider 0.3750 (change -0.1250); bleu_4 0.1250",
    ]
