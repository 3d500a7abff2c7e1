"""Your own data through the CLI alone, start to finish, on a corpus generated into a fresh folder:
processor from the captions -> pretrain -> finetune teacher -> distill -> finetune student with KD -> prune (with a
fixed-mask phase) -> evaluate (with a predictions file) -> benchmark. No Python API between the stages: each
reads the previous stage's folder."""

from __future__ import annotations

import json

from trainers import commands as cli
from trainers.demo.corpus import generate_demo_data


def test_the_whole_method_through_the_cli_on_own_data(tmp_path, capsys) -> None:
    data = generate_demo_data(tmp_path / "my_data", quick=True, num_train_images=24, num_eval_images=8)
    root, out = str(data.image_root), tmp_path / "runs"
    steps = ["--per_device_train_batch_size", "8", "--report_to", "none", "--use_cpu", "--save_strategy", "no"]
    small = json.dumps({"vision_config": {"image_size": 64}, "text_config": {"max_position_embeddings": 64}})
    vqa = ["--task", "vqa", "--train_file", str(data.vqa_train), "--image_root", root]
    evaluation = ["--eval_file", str(data.vqa_test), "--answer_list", "auto"]

    assert cli.main(["processor", "--train_files", str(data.pretrain), str(data.vqa_train), "--image_size", "64",
                     "--output_dir", str(out / "processor")]) == 0  # fmt: skip
    cli.main(["pretrain", "--preset", "tiny", "--config_overrides", small, "--processor_name_or_path",
              str(out / "processor"), "--train_file", str(data.pretrain), "--image_root", root,
              "--max_steps", "3", "--output_dir", str(out / "teacher"), *steps])  # fmt: skip
    cli.main(["finetune", *vqa, *evaluation, "--model_name_or_path", str(out / "teacher"), "--max_steps", "3",
              "--output_dir", str(out / "teacher_vqa"), *steps])  # fmt: skip
    cli.main(["distill", "--teacher_model_name_or_path", str(out / "teacher"), "--student_layers", "1,1,1",
              "--train_file", str(data.pretrain), "--image_root", root, "--max_steps", "2",
              "--kd_term_weights", '{"vision_attn": 0, "text_attn": 0, "fusion_attn": 0, "fusion_cross_attn": 0}',
              "--output_dir", str(out / "student"), *steps])  # fmt: skip
    cli.main(["finetune", *vqa, "--answer_list", "auto", "--model_name_or_path", str(out / "student"),
              "--teacher_model_name_or_path", str(out / "teacher_vqa"), "--max_steps", "2",
              "--output_dir", str(out / "student_vqa"), *steps])  # fmt: skip
    cli.main(["prune", *vqa, *evaluation, "--model_name_or_path", str(out / "student_vqa"),
              "--teacher_model_name_or_path", str(out / "teacher_vqa"), "--target_sparsity", "0.3",
              "--sparsity_warmup_steps", "1", "--mask_freeze_fraction", "0.5", "--max_steps", "4",
              "--output_dir", str(out / "pruned_vqa"), *steps])  # fmt: skip
    report = json.loads((out / "pruned_vqa" / "pruning_report.json").read_text())
    assert 0 < report["sparsity"] < 1 and report["pruning_config"]["mask_freeze_fraction"] == 0.5

    predictions = out / "predictions.json"
    cli.main(["evaluate", "--task", "vqa", "--model_name_or_path", str(out / "pruned_vqa"), "--eval_file",
              str(data.vqa_test), "--image_root", root, "--predictions_file", str(predictions)])  # fmt: skip
    items = json.loads(predictions.read_text())
    assert len(items) == len(json.loads(data.vqa_test.read_text()))
    eval_results = json.loads((out / "pruned_vqa" / "eval_results.json").read_text())
    # The pruned folder ranks the candidates it was saved with: the same answers as the prune stage evaluated.
    mean = sum(item["vqa_accuracy"] for item in items) / len(items)
    assert abs(mean - eval_results["vqa_accuracy"]) < 1e-6

    capsys.readouterr()
    cli.main(["benchmark", "--models", str(out / "teacher_vqa"), str(out / "student_vqa"), str(out / "pruned_vqa"),
              "--repeats", "2", "--batch_size", "2", "--text_length", "8"])  # fmt: skip
    table = capsys.readouterr().out
    assert table.count("1.00x") >= 1 and str(out / "pruned_vqa") in table
    for folder in ("processor", "teacher", "teacher_vqa", "student", "student_vqa", "pruned_vqa"):
        assert (out / folder / "processor_config.json").is_file(), folder
