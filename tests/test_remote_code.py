"""Saved folders load with `trust_remote_code=True` in a process that cannot import this repository."""

from __future__ import annotations

import re

import torch

from modeling_efficientvlm import EfficientVLMForPreTraining, EfficientVLMModel

from .conftest import make_inputs
from .remote_code_utils import load_in_clean_subprocess, run_in_clean_subprocess


def test_saved_folder_carries_code_and_auto_map(tiny_config, tmp_path) -> None:
    EfficientVLMForPreTraining(tiny_config).save_pretrained(tmp_path)
    names = {path.name for path in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_efficientvlm.py", "modeling_efficientvlm.py"} <= names
    assert "loss_efficientvlm.py" in names  # reached through `from .loss_efficientvlm import ...`
    config = tiny_config.from_pretrained(tmp_path)
    assert config.auto_map["AutoModelForPreTraining"] == "modeling_efficientvlm.EfficientVLMForPreTraining"


def test_shipped_files_define_classes_only(tiny_config, tmp_path) -> None:
    """Registration with the Auto classes happens in the installed package, never in the files a folder ships."""
    from modeling_efficientvlm import EfficientVLMForQuestionAnswering

    from .data_utils import make_processor

    EfficientVLMForQuestionAnswering(tiny_config).save_pretrained(tmp_path)
    make_processor(tmp_path / "vocab").save_pretrained(tmp_path)
    shipped = sorted(tmp_path.glob("*.py"))
    assert {path.name for path in shipped} >= {"processing_efficientvlm.py", "modeling_efficientvlm_vqa.py"}
    for path in shipped:
        text = path.read_text()
        assert re.search(r"Auto\w*\.register\(", text) is None and "register_for_auto_class(" not in text, path.name


def test_a_remote_code_folder_runs_on_the_cpu_attention_kernel(tiny_config, tmp_path) -> None:
    """The shipped code registers `attn_implementation="efficientvlm_cpu"` itself: a process without this repository
    loads a folder with it, runs on the kernel and gets the outputs of SDPA."""
    torch.manual_seed(0)
    inputs = make_inputs(tiny_config)
    model = EfficientVLMModel(tiny_config).eval()
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    code = """
    import sys, transformers
    model = transformers.AutoModel.from_pretrained(
        payload["folder"], trust_remote_code=True, attn_implementation="efficientvlm_cpu"
    ).eval()
    kernel_module = next(m for name, m in sys.modules.items() if name.endswith(".cpu_attention_efficientvlm"))
    with torch.no_grad():
        result["hidden"] = model(**payload["inputs"]).last_hidden_state
    result["implementation"] = model.config.vision_config._attn_implementation
    result["module"] = kernel_module.__name__
    result["built"] = kernel_module._state.get("module") is not None
    """
    result = run_in_clean_subprocess(code, tmp_path / "work", {"folder": str(tmp_path / "model"), "inputs": inputs})
    assert result["implementation"] == "efficientvlm_cpu" and result["built"]
    assert result["module"].startswith("transformers_modules.")
    torch.testing.assert_close(result["hidden"], expected, atol=1e-5, rtol=1e-5)


def test_trust_remote_code_load_gives_identical_outputs(tiny_config, tmp_path) -> None:
    torch.manual_seed(0)
    inputs = make_inputs(tiny_config)
    negatives = (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))

    pretraining = EfficientVLMForPreTraining(tiny_config).eval()
    pretraining.save_pretrained(tmp_path / "pretraining")
    with torch.no_grad():
        expected = pretraining(**inputs, itm_negatives=negatives)
    remote = load_in_clean_subprocess(
        tmp_path / "pretraining",
        "AutoModelForPreTraining",
        {**inputs, "itm_negatives": negatives},
        outputs=["itm_logits", "logits_per_image", "image_embeds"],
    )
    assert remote["class"] == "EfficientVLMForPreTraining"
    assert "transformers_modules" in remote["module"]  # the copied code, not this repository
    # Another process may use another thread count, hence another summation order: equal up to float rounding.
    for name in ("itm_logits", "logits_per_image", "image_embeds"):
        torch.testing.assert_close(remote[name], getattr(expected, name), atol=1e-6, rtol=0)

    backbone = EfficientVLMModel(tiny_config).eval()
    backbone.save_pretrained(tmp_path / "backbone")
    with torch.no_grad():
        expected = backbone(**inputs)
    remote = load_in_clean_subprocess(tmp_path / "backbone", "AutoModel", inputs, outputs=["last_hidden_state"])
    assert remote["class"] == "EfficientVLMModel"
    torch.testing.assert_close(remote["last_hidden_state"], expected.last_hidden_state, atol=1e-6, rtol=0)


def test_two_folders_with_different_code_each_load_their_own_classes(tiny_config, tmp_path) -> None:
    """The shipped files only define classes (registration lives in the installed package), so a second folder
    loaded in the same process gets its own processor and model classes, not the first folder's."""
    from modeling_efficientvlm import EfficientVLMForImageTextRetrieval

    from .data_utils import make_processor

    processor = make_processor(tmp_path, image_size=tiny_config.vision_config.image_size)
    model = EfficientVLMForImageTextRetrieval(tiny_config)
    for name in ("first", "second"):
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    for file, marker in (
        ("processing_efficientvlm.py", "class EfficientVLMProcessor(ProcessorMixin):"),
        ("modeling_efficientvlm_retrieval.py", "class EfficientVLMForImageTextRetrieval("),
    ):
        for name in ("first", "second"):
            path = tmp_path / name / file
            text = path.read_text()
            assert marker in text
            line_end = text.index("\n", text.index(marker)) + 1
            path.write_text(text[:line_end] + f"    MARKER = {name!r}\n" + text[line_end:])
    code = """
    import transformers
    for name in ("first", "second"):
        folder = payload["root"] + "/" + name
        processor = transformers.AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        image_processor = transformers.AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        model = transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)
        zero_shot = transformers.AutoModelForZeroShotImageClassification.from_pretrained(folder, trust_remote_code=True)
        result[name] = {
            "processor": getattr(type(processor), "MARKER", None),
            "model": getattr(type(model), "MARKER", None),
            "zero_shot": getattr(type(zero_shot), "MARKER", None),
            "image_processor_module": type(image_processor).__module__,
            "processor_image_processor_module": type(processor.image_processor).__module__,
        }
    """
    result = run_in_clean_subprocess(code, tmp_path / "work", {"root": str(tmp_path)})
    for name in ("first", "second"):
        assert result[name]["processor"] == result[name]["model"] == result[name]["zero_shot"] == name
        assert name in result[name]["image_processor_module"]
        assert result[name]["processor_image_processor_module"] == result[name]["image_processor_module"]


def test_a_folder_loaded_as_remote_code_and_saved_again_keeps_its_auto_map(tiny_config, tmp_path) -> None:
    """transformers sets the loading auto class as a remote class's `_auto_class`: a folder loaded with `AutoModel`
    (or VQA through `AutoModelForImageTextToText`) and saved again kept only that one, and its task's pipeline
    could no longer load it."""
    from modeling_efficientvlm import EfficientVLMForImageTextRetrieval, EfficientVLMForQuestionAnswering

    for model_class, name in (
        (EfficientVLMForImageTextRetrieval, "retrieval"),
        (EfficientVLMForQuestionAnswering, "vqa"),
    ):
        model_class(tiny_config).save_pretrained(tmp_path / name)
    code = """
    import json, transformers
    for name, auto_class in (("retrieval", "AutoModel"), ("vqa", "AutoModelForImageTextToText")):
        folder = payload["root"] + "/" + name
        model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True)
        model.save_pretrained(folder + "_again")
        result[name] = json.load(open(folder + "_again/config.json"))["auto_map"]
    """
    result = run_in_clean_subprocess(code, tmp_path / "work", {"root": str(tmp_path)})
    for name in ("retrieval", "vqa"):
        saved = tiny_config.from_pretrained(tmp_path / name).auto_map
        assert {k: v for k, v in result[name].items() if k.startswith("AutoModel")} == {
            k: v for k, v in saved.items() if k.startswith("AutoModel")
        }
    assert result["retrieval"]["AutoModelForZeroShotImageClassification"].endswith("EfficientVLMForImageTextRetrieval")
    assert {"AutoModelForVisualQuestionAnswering", "AutoModelForImageTextToText"} <= set(result["vqa"])
