"""`--push_to_hub`: only the model folder's files go up, in one commit whose message names the stage (no network:
`HfApi.create_repo` / `upload_folder` are intercepted)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from modeling_efficientvlm import EfficientVLMConfig
from trainers import commands as cli
from trainers.saving import save_model_folder
from trainers.tasks import task_model_class

from .data_utils import COLOURS, make_processor, write_vqa_json
from .test_model_card import assert_complete_card


class HubRecorder:
    """Stands in for the Hub: records the repos created and, for each `upload_folder`, exactly the files the real
    one would send (its own filtering: `allow_patterns`, `ignore_patterns` and the default ignores)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.repos: list[str] = []
        self.uploads: list[dict] = []
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            recorder.repos.append(repo_id)
            return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
            folder = Path(folder_path)
            files = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
            ignore = [*(ignore_patterns or []), *DEFAULT_IGNORE_PATTERNS]
            sent = sorted(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore))
            recorder.uploads.append({"repo_id": repo_id, "files": sent, **kwargs})

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        # Anything else reaching the Hub fails the test.
        monkeypatch.setattr(HfApi, "create_commit", lambda *args, **kwargs: pytest.fail("create_commit called"))


def test_prune_pushes_only_the_pruned_model_folder(tmp_path, monkeypatch) -> None:
    config = EfficientVLMConfig.from_preset("tiny")
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    student = save_model_folder(task_model_class("vqa")(config), processor, tmp_path / "student_vqa")
    records, image_root = write_vqa_json(tmp_path, n=6)
    answer_list = tmp_path / "answer_list.json"
    answer_list.write_text(json.dumps(COLOURS))
    output = tmp_path / "pruned_vqa"
    # Leftovers of training in the output folder are never uploaded.
    (output / "runs" / "Dec01").mkdir(parents=True)
    (output / "runs" / "Dec01" / "events.out.tfevents.1.host").write_text("x")
    (output / "train.log").write_text("x")
    hub = HubRecorder(monkeypatch)

    status = cli.main(
        [
            "prune",
            "--task",
            "vqa",
            "--model_name_or_path",
            str(student),
            "--train_file",
            str(records),
            "--eval_file",
            str(records),
            "--image_root",
            str(image_root),
            "--answer_list",
            str(answer_list),
            "--target_sparsity",
            "0.3",
            "--output_dir",
            str(output),
            "--max_steps",
            "4",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--per_device_train_batch_size",
            "3",
            "--report_to",
            "none",
            "--use_cpu",
            "--push_to_hub",
            "--hub_model_id",
            "someone/pruned-vqa",
        ]
    )
    assert status == 0
    assert (output / "checkpoint-2").is_dir() and (output / "checkpoint-4" / "training_args.bin").is_file()
    sparsity = json.loads((output / "pruning_report.json").read_text())["sparsity"]

    assert hub.repos == ["someone/pruned-vqa"]  # the Trainer itself never pushed
    [upload] = hub.uploads
    assert upload["repo_id"] == "someone/pruned-vqa"
    assert upload["commit_message"] == f"efficientvlm prune: pruned vqa model, sparsity {sparsity:.2f}"
    code = sorted(path.name for path in output.glob("*.py"))
    assert {"configuration_efficientvlm.py", "modeling_efficientvlm.py", "modeling_efficientvlm_vqa.py"} <= set(code)
    package = Path(__file__).parents[1] / "modeling_efficientvlm"
    assert all((package / name).is_file() for name in code)
    assert upload["files"] == sorted(
        [
            "README.md",
            "config.json",
            "eval_results.json",
            "generation_config.json",
            "model.safetensors",
            "processor_config.json",
            "pruning_report.json",
            "tokenizer.json",
            "tokenizer_config.json",
            *code,
        ]
    )

    card = ModelCard.load(output / "README.md")
    assert_complete_card(card)
    assert card.data.base_model == "student_vqa"
    assert card.data.datasets == [records.name]
    assert card.data.eval_results[0].metric_type == "vqa_accuracy"
    assert '"someone/pruned-vqa", trust_remote_code=True' in card.text  # the Hub id, not the folder
    assert "## Modal-adaptive pruning" in card.text and f"**{sparsity:.3f}**" in card.text


def test_a_bare_hub_model_id_goes_to_the_tokens_user_and_the_card_says_so(tmp_path, monkeypatch) -> None:
    from trainers.model_card import ModelCardInfo
    from trainers.saving import HubTarget

    hub = HubRecorder(monkeypatch)
    config = EfficientVLMConfig.from_preset("tiny")
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    folder = save_model_folder(
        task_model_class("retrieval")(config),
        processor,
        tmp_path / "out",
        ModelCardInfo(task="retrieval", stage="finetune"),
        push=HubTarget("my-retrieval"),
    )
    assert hub.repos == ["my-retrieval"]
    assert hub.uploads[0]["repo_id"] == "me/my-retrieval"
    assert hub.uploads[0]["commit_message"] == "efficientvlm finetune: fine-tuned retrieval model"
    assert '"me/my-retrieval"' in (folder / "README.md").read_text()


@pytest.mark.parametrize(
    "command, message",
    [
        (["pretrain", "--preset", "tiny"], "efficientvlm pretrain: pre-trained pretraining model"),
        (["finetune", "--task", "captioning", "--model_name_or_path"], "efficientvlm finetune: fine-tuned captioning"),
        (["distill", "--student_layers", "1,1,1", "--teacher_model_name_or_path"], "efficientvlm distill: student"),
    ],
)
def test_every_training_command_pushes_its_model_folder_only(tmp_path, monkeypatch, command, message) -> None:
    from .data_utils import write_image_text_json, write_vocab

    config = EfficientVLMConfig.from_preset("tiny")
    processor = make_processor(tmp_path, image_size=config.vision_config.image_size)
    teacher = save_model_folder(task_model_class("pretraining")(config), processor, tmp_path / "teacher")
    records, image_root = write_image_text_json(tmp_path, n=4)
    source = ["--vocab_file", str(write_vocab(tmp_path))] if command[0] == "pretrain" else [str(teacher)]
    hub = HubRecorder(monkeypatch)
    output = tmp_path / "out"
    cli.main(
        [
            *command,
            *source,
            "--train_file",
            str(records),
            "--image_root",
            str(image_root),
            "--output_dir",
            str(output),
            "--max_steps",
            "2",
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
            "--per_device_train_batch_size",
            "2",
            "--report_to",
            "none",
            "--use_cpu",
            "--push_to_hub",
        ]
    )
    assert hub.repos == ["out"]  # the output folder's name, under the token's user
    [upload] = hub.uploads
    assert upload["repo_id"] == "me/out" and upload["commit_message"].startswith(message)
    assert upload["files"] == [name for name in upload["files"] if "/" not in name]  # no runs/, no checkpoint-*
    assert {"model.safetensors", "config.json", "README.md", "processor_config.json"} <= set(upload["files"])
    assert not {"training_args.bin", "trainer_state.json", "all_results.json", "train_results.json"} & set(
        upload["files"]
    )
    card = ModelCard.load(output / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets == [records.name]
    assert card.data.base_model == (None if command[0] == "pretrain" else "teacher")
    assert '"me/out", trust_remote_code=True' in card.text
