"""Executes the notebooks in `notebooks/` with nbclient (tiny settings, offline, one thread) in a temporary working
directory, and checks what they computed: the summary each one prints last, and the files it wrote."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nbformat
import pytest
import torch

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 120


def _kernel_env() -> dict[str, str]:
    """The test's environment, offline and single-threaded, with the repository importable from any directory."""
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": python_path,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _execute(name: str, workdir: Path, parameters: str) -> nbformat.NotebookNode:
    """Runs notebook `name` in `workdir`; `parameters` is appended to its first code cell (the parameter cell)."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", []), f"{name}: the first code cell must hold the parameters"
    first.source += "\n\n# Injected by tests/test_notebooks.py\n" + parameters
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute(env=_kernel_env())  # raises CellExecutionError (with the traceback) if a cell fails
    return notebook


def _run_code_cells_here(name: str, count: int, parameters: str) -> dict:
    """Runs the first `count` code cells of notebook `name` in this process, in the current directory (no kernel:
    fast, for cells that only prepare), `parameters` appended to the parameter cell; returns their namespace."""
    from transformers.utils import logging as hf_logging

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = [cell.source for cell in notebook.cells if cell.cell_type == "code"][:count]
    cells[0] += "\n" + parameters
    namespace, progress_bar, rng = {}, hf_logging.is_progress_bar_enabled(), torch.get_rng_state()
    try:
        for source in cells:
            exec(compile(source, f"{name} cell", "exec"), namespace)
    finally:  # the cells seed torch and turn progress bars off: not for the rest of the session
        torch.set_rng_state(rng)
        (hf_logging.enable_progress_bar if progress_bar else hf_logging.disable_progress_bar)()
    return namespace


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(output.text for output in cell.outputs if output.output_type == "stream" and output.name == "stdout")


def _summary(notebook: nbformat.NotebookNode) -> dict:
    """The JSON object the last code cell prints."""
    last = [cell for cell in notebook.cells if cell.cell_type == "code"][-1]
    return json.loads(_stdout(last).strip().splitlines()[-1])


def test_notebooks_are_committed_clean() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert notebook.nbformat == 4
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"
        assert "2210.07795" in notebook.cells[0].source, f"{path.name}: cite the paper at the top"


def test_quickstart_loads_saved_models_and_runs_every_task(tmp_path: Path) -> None:
    import numpy as np
    import PIL.Image
    import PIL.ImageOps
    from transformers import BertTokenizer

    from modeling_efficientvlm import (
        EfficientVLMConfig,
        EfficientVLMForImageTextRetrieval,
        EfficientVLMForQuestionAnswering,
        EfficientVLMImageProcessor,
        EfficientVLMProcessor,
    )
    from trainers.demo.corpus import write_demo_vocab
    from trainers.saving import save_model_folder

    # "Your own" VQA checkpoint, distinguishable from the notebook's stand-ins (one answer-decoder layer, 48 px).
    torch.manual_seed(0)
    tokenizer = BertTokenizer(vocab=str(write_demo_vocab(tmp_path / "vocab.txt")), do_lower_case=True)
    sizes = {"vision_config": {"image_size": 48}, "text_config": {"vocab_size": len(tokenizer)}}
    config = EfficientVLMConfig.from_preset("tiny", num_answer_decoder_layers=1, **sizes)
    own_vqa = EfficientVLMForQuestionAnswering(config)
    # Saved with answer candidates (as the demo and `efficientvlm prune` save VQA models): `generate` must still
    # decode freely where the notebook says it does.
    own_vqa.set_answer_candidates(["red", "blue", "circle"], tokenizer)
    processor = EfficientVLMProcessor(EfficientVLMImageProcessor(size={"height": 48, "width": 48}), tokenizer)
    save_model_folder(own_vqa, processor, tmp_path / "my_vqa")
    # "Your own" image: 16-bit grayscale, lying on its side with an EXIF orientation tag (6: turn it upright).
    exif = PIL.Image.Exif()
    exif[274] = 6
    pixels = (np.arange(24 * 40).reshape(24, 40) * 60).astype(np.uint16)
    PIL.Image.fromarray(pixels).save(tmp_path / "photo16.png", exif=exif)

    parameters = {
        "VQA_DIR": str(tmp_path / "my_vqa"),
        "IMAGE_PATH": str(tmp_path / "photo16.png"),
        "CAPTIONS": ["a red circle", "a blue square in the bottom right", "two shapes"],
        "QUESTION": "what color is the circle ?",
        "NUM_THREADS": 1,
        "MAX_NEW_TOKENS": 4,
    }
    notebook = _execute("quickstart.ipynb", tmp_path, "\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    summary = _summary(notebook)
    work = tmp_path / "quickstart_work"

    # The missing folders were built and saved, the given one was used as is.
    for task in ("retrieval", "captioning"):
        assert (work / "models" / task / "config.json").is_file()
        assert (work / "models" / task / "processor_config.json").is_file()
    assert not (work / "models" / "vqa").exists()
    assert summary["parameters"]["vqa"] == own_vqa.num_parameters()
    assert summary["parameters"]["retrieval"] < summary["parameters"]["vqa"]  # no answer decoder

    # Retrieval: one ITC similarity and one ITM probability per caption.
    assert summary["pixel_values"] == [1, 3, 32, 32]  # the tiny preset's image size
    itc, itm = summary["retrieval_scores"]["itc"], summary["retrieval_scores"]["itm"]
    assert len(itc) == len(itm) == 3
    assert all(-1.0 <= s <= 1.0 for s in itc) and all(0.0 <= p <= 1.0 for p in itm)
    # The model saw the image upright and in its own mode (16 bits scaled by the processor), not one converted to
    # RGB first (every value above 255 clipped to white).
    retrieval = EfficientVLMForImageTextRetrieval.from_pretrained(work / "models" / "retrieval").eval()
    retrieval_processor = EfficientVLMProcessor.from_pretrained(work / "models" / "retrieval")
    upright = PIL.ImageOps.exif_transpose(PIL.Image.open(tmp_path / "photo16.png"))
    assert upright.mode == "I;16" and upright.size == (24, 40)
    with torch.no_grad():
        _, image_embeds = retrieval.embed_images(retrieval_processor(images=upright)["pixel_values"])
        captions = retrieval_processor(text=parameters["CAPTIONS"])
        _, text_embeds = retrieval.embed_texts(captions["input_ids"], captions["attention_mask"])
    assert itc == pytest.approx(retrieval.itc_scores(image_embeds, text_embeds)[0].tolist(), abs=1e-5)

    # VQA: three distinct answers from the demo answer list, and a generated string.
    answer_list = json.loads((work / "data" / "answer_list.json").read_text())
    assert len(set(summary["ranked_answers"])) == 3 and set(summary["ranked_answers"]) <= set(answer_list)
    # `generate` decoded freely (use_answer_candidates=False), though the folder holds answer candidates.
    with torch.no_grad():
        vqa = EfficientVLMForQuestionAnswering.from_pretrained(tmp_path / "my_vqa").eval()
        question = EfficientVLMProcessor.from_pretrained(tmp_path / "my_vqa")(
            images=[upright], text=[parameters["QUESTION"]]
        )
        free = vqa.generate(**question, use_answer_candidates=False, max_new_tokens=4)[0]
    assert summary["generated_answer"] == tokenizer.decode(free, skip_special_tokens=True)

    # Captioning continues the prompt.
    assert summary["caption"].startswith("a picture of ")
    displayed = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in displayed)  # the image is shown


def test_quickstart_builds_tiny_stand_ins_only_under_its_work_folder(tmp_path: Path, monkeypatch) -> None:
    """A VQA_DIR set to a folder that does not exist (here: the demo's, relative to another working folder) got a
    random tiny model built into it, which every later run then loaded as the user's model."""
    monkeypatch.chdir(tmp_path)
    given = "efficientvlm_demo/models/pruned_vqa"
    named = re.escape(f"VQA_DIR = '{given}' (relative paths start at {Path.cwd()})")
    with pytest.raises(FileNotFoundError, match=named):
        _run_code_cells_here("quickstart.ipynb", 3, f"VQA_DIR = {given!r}")
    assert not (tmp_path / "efficientvlm_demo").exists()
    assert not (tmp_path / "quickstart_work" / "models").exists()  # nothing built before the error either


def test_compress_your_own_model_prunes_and_reloads_a_smaller_model(tmp_path: Path) -> None:
    from modeling_efficientvlm import EfficientVLMConfig

    parameters = "\n".join(
        [
            "NUM_TRAIN_IMAGES = 16",
            "NUM_EVAL_IMAGES = 4",
            "PRETRAIN_STEPS = 2",
            "DISTILL_STEPS = 2",
            "FINETUNE_STEPS = 2",
            "PRUNE_STEPS = 40",
            "BENCHMARK_REPEATS = 1",
            "NUM_THREADS = 1",
        ]
    )
    notebook = _execute("compress_your_own_model.ipynb", tmp_path, parameters)
    summary = _summary(notebook)
    pruned_dir = tmp_path / "compress_work" / "models" / "pruned_vqa"

    # Teacher > half-depth student > pruned student, and the pruned model predicts what the masked one did.
    counts = summary["parameters"]
    assert counts["teacher"] > counts["student"] > counts["pruned"]
    assert summary["same_predictions"] is True
    assert summary["metrics"]["pruned"] == summary["metrics"]["masked"]
    assert 0.0 <= summary["metrics"]["pruned"]["vqa_accuracy"] <= 1.0

    # The sparsity is reported overall and per modality, and agrees with the saved report.
    report = json.loads((pruned_dir / "pruning_report.json").read_text())
    assert set(summary["sparsity_per_modality"]) == {"vision", "text", "fusion"}
    assert summary["sparsity"] == pytest.approx(report["sparsity"]) and 0.0 < report["sparsity"] < 1.0
    assert report["parameters_after"] == counts["pruned"] < report["parameters_before"] == counts["student"]

    # The saved config carries the uneven per-layer sizes that were kept, FFNs padded with zero neurons.
    config = EfficientVLMConfig.from_pretrained(pruned_dir)
    assert summary["structures_kept"] == report["structures_kept"]
    # The VQA answer list is saved with the model (without it the folder decodes freely: empty answers in the app).
    answer_list = json.loads((tmp_path / "compress_work" / "data" / "answer_list.json").read_text())
    assert config.answer_candidates == answer_list
    kept = report["padding"]["structures_after"]
    text_ffn = kept["text_ffn"] + kept["fusion_ffn"]
    assert config.text_config.intermediate_size_per_layer == text_ffn
    assert config.vision_config.intermediate_size_per_layer == kept["vision_ffn"]
    assert sum(text_ffn) + sum(kept["vision_ffn"]) < 3 * config.text_config.intermediate_size
    assert (pruned_dir / "processor_config.json").is_file()

    # The heat map of kept structures was drawn.
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in outputs)
