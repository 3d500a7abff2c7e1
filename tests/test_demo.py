"""The main job: `efficientvlm demo --quick` end to end, its outputs, and `--push_to_hub` without network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image

from modeling_efficientvlm import EfficientVLMProcessor
from trainers.demo.run import main as demo_main
from trainers.tasks import task_model_class

from .remote_code_utils import load_in_clean_subprocess

UPLOADS: list[dict] = []


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("demo")

    def create_repo(self, repo_id, **kwargs):
        return repo_id

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        # What would be uploaded: every file of the folder, read now (it must be complete at push time).
        UPLOADS.append({"repo_id": repo_id, "files": sorted(p.name for p in Path(folder_path).iterdir())})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HfApi, "create_repo", create_repo)
        patch.setattr(HfApi, "upload_folder", upload_folder)
        demo_main(["--quick", "--output_dir", str(output), "--push_to_hub", "--hub_prefix", "someone/evlm"])
    return output


def test_demo_writes_every_output(demo_dir: Path) -> None:
    for name in (
        "report.md",
        "settings.json",
        "plots/training_losses.png",
        "plots/expected_sparsity.png",
        "plots/kept_structures.png",
        "data/vqa_train.json",
        "data/answer_list.json",
    ):
        assert (demo_dir / name).is_file(), name
    for plot in (demo_dir / "plots").iterdir():
        with Image.open(plot) as image:
            assert image.size[0] > 200
    report = (demo_dir / "report.md").read_text()
    assert "| teacher |" in report and "| pruned |" in report and "majority" in report.lower()


@pytest.mark.parametrize("task", ["vqa", "retrieval"])
def test_every_saved_model_loads_with_its_processor_and_card(demo_dir: Path, task: str) -> None:
    sizes = {}
    for role in ("teacher", "student", "pruned"):
        folder = demo_dir / "models" / f"{role}_{task}"
        model = task_model_class(task).from_pretrained(folder)
        processor = EfficientVLMProcessor.from_pretrained(folder)
        assert processor.tokenizer.convert_tokens_to_ids("circle") != processor.tokenizer.unk_token_id
        card = (folder / "README.md").read_text()
        assert "EfficientVLM" in card and "median latency" in card
        config = json.loads((folder / "config.json").read_text())
        assert "auto_map" in config
        sizes[role] = sum(sum(layer_sizes) for layer_sizes in model.structure_sizes().values())
        if role == "pruned":
            assert "Modal-adaptive pruning" in card
    assert sizes["pruned"] < sizes["student"]


def test_pruned_model_loads_in_a_clean_process(demo_dir: Path) -> None:
    folder = demo_dir / "models" / "pruned_vqa"
    model = task_model_class("vqa").from_pretrained(folder).eval()
    processor = EfficientVLMProcessor.from_pretrained(folder)
    inputs = dict(processor(images=[Image.new("RGB", (64, 64), "red")], text=["what color is the circle ?"]))
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=3)
    remote = load_in_clean_subprocess(
        folder, "AutoModelForVisualQuestionAnswering", {**inputs, "max_new_tokens": 3}, method="generate"
    )
    assert remote["class"] == "EfficientVLMForQuestionAnswering"
    assert "transformers_modules" in remote["module"]
    assert torch.equal(remote["output"], expected)


def test_push_to_hub_uploads_complete_folders(demo_dir: Path) -> None:
    assert {upload["repo_id"] for upload in UPLOADS} == {
        f"someone/evlm-{role}_{task}" for role in ("teacher", "student", "pruned") for task in ("vqa", "retrieval")
    }
    for upload in UPLOADS:
        files = set(upload["files"])
        assert {"model.safetensors", "config.json", "README.md", "processor_config.json", "tokenizer.json"} <= files
        assert {"configuration_efficientvlm.py", "modeling_efficientvlm.py"} <= files
        assert any(name.startswith("modeling_efficientvlm_") for name in files)
