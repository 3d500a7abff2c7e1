"""The main job: `efficientvlm demo --quick` end to end, its outputs, and `--push_to_hub` without network."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image

from modeling_efficientvlm import EfficientVLMProcessor
from trainers.commands.evaluate import EvaluateArguments
from trainers.demo.run import main as demo_main
from trainers.tasks import DEFAULT_DEMO_TASKS, task_model_class

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
        demo_main(
            [
                *("--quick", "--ablations", "--output_dir", str(output), "--num_threads", "1", "--jobs", "3"),
                *("--push_to_hub", "--hub_prefix", "someone/evlm"),
            ]
        )
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
    # Honest retrieval: the k of `efficientvlm evaluate`, stated, with ITC-only and ITM-only recall beside the
    # re-ranked one.
    k = next(f.default for f in dataclasses.fields(EvaluateArguments) if f.name == "k")
    assert f"top {k} ITC candidates" in report and "ITC-only r_mean | ITM-only r_mean |" in report
    assert "The ITM log-odds alone rank the teacher's candidates at" in report
    assert "Machine:" in report and "torch thread" in report and "paper bar" in report
    # The pipelines ran at once (--jobs 3): the report says so, and each one's training log is kept.
    from trainers.demo.run import PIPELINE_NICENESS, available_cores

    if available_cores() >= 3:
        assert "(the task pipelines 3 at a time, 1 thread each)" in report
    else:  # more pipelines than cores: the longest keeps a core, the others run at a lower priority
        assert "(the task pipelines 3 at a time, 1 thread each, " in report  # which ones: the planned steps
        assert "at normal CPU priority and " in report and f"at niceness {PIPELINE_NICENESS})" in report
    # The run's figures are reproducible: deterministic algorithms while it ran, the caller's setting after.
    assert "with its deterministic algorithms" in report and not torch.are_deterministic_algorithms_enabled()
    for task in DEFAULT_DEMO_TASKS:
        assert "'train_loss'" in (demo_dir / "runs" / f"{task}.log").read_text()
    # Ablations: random masks and a uniform split beside the learned masks.
    assert "| pruned, random masks |" in report and "| pruned, uniform split |" in report
    # NLVR2 (in the default run) against its answer-prior baselines.
    assert "| nlvr2 |" in report and "sentence text only" in report
    # Time per stage: every stage once, and a total that is their sum (no training run counted twice).
    table = report.split("## Time per stage")[1].split("Training runs")[0]
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    seconds = {row[1].strip(): float(row[3]) for row in rows[1:]}
    assert abs(sum(v for k, v in seconds.items() if k != "**total**") - seconds["**total**"]) <= len(seconds)


def test_the_reported_retrieval_recall_is_what_evaluate_prints_with_the_stated_command(demo_dir, capsys) -> None:
    from trainers.commands.evaluate import main as evaluate_main
    from trainers.demo.run import DemoSettings

    report = (demo_dir / "report.md").read_text()
    k, score = DemoSettings().retrieval_k, DemoSettings().retrieval_itm_score
    assert score == "log_odds+itc" and f"`efficientvlm evaluate --k {k} --itm_score {score}`" in report
    table = report.split("| retrieval |")[1].split("\n\n")[0]
    pruned = next(line for line in table.splitlines() if line.startswith("| pruned |")).split("|")
    data = demo_dir / "data"
    argv = ["--task", "retrieval", "--model_name_or_path", str(demo_dir / "models" / "pruned_retrieval")]
    argv += ["--eval_file", str(data / "retrieval_test.json"), "--image_root", str(data), "--k", str(k)]
    metrics = evaluate_main([*argv, "--itm_score", score])
    capsys.readouterr()
    # Re-ranked, ITC alone and ITM alone, side by side.
    assert [f"{metrics[name]:.4f}" for name in ("r_mean", "itc_r_mean", "itm_r_mean")] == [
        cell.strip() for cell in pruned[6:9]
    ]


def test_every_stage_is_saved(demo_dir: Path) -> None:
    for name in ("teacher_pretrained", "student_distilled"):
        folder = demo_dir / "models" / name
        model = task_model_class("pretraining").from_pretrained(folder)
        assert model.config.architectures == ["EfficientVLMForPreTraining"]
        assert (folder / "README.md").is_file() and (folder / "processor_config.json").is_file()
    assert DEFAULT_DEMO_TASKS == ("vqa", "retrieval", "nlvr2")
    for task in DEFAULT_DEMO_TASKS:
        report = json.loads((demo_dir / "models" / f"pruned_{task}" / "pruning_report.json").read_text())
        assert report["parameters_after"] < report["parameters_before"]
        # The recipe snaps the masks to the target when they are fixed; the report says from where.
        snap = report["snap_to_target"]
        assert snap["sparsity_after"] == pytest.approx(report["sparsity"], abs=1e-4)
        assert report["sparsity"] == pytest.approx(report["target_sparsity"], abs=0.05)
    assert "they were snapped to the target" in (demo_dir / "report.md").read_text()
    # The retrieval models learn ITM from caption negatives, a task setting the pre-trained and VQA models lack.
    from modeling_efficientvlm import EfficientVLMConfig

    def share(name: str) -> float:
        return EfficientVLMConfig.from_pretrained(demo_dir / "models" / name).itm_caption_negatives

    assert [share(f"{role}_retrieval") for role in ("teacher", "student", "pruned")] == [1.0, 1.0, 1.0]
    assert share("teacher_pretrained") == share("student_distilled") == share("teacher_vqa") == 0.0
    assert "as the negative text of 100% of the images" in (demo_dir / "report.md").read_text()


def test_uniform_masks_cut_every_layer_alike() -> None:
    from trainers.demo.run import uniform_structure_masks

    class Sizes:
        def structure_sizes(self):
            return {"vision_heads": [4, 4], "text_ffn": [10, 0]}

    scores = {("vision_heads", 0): torch.tensor([3.0, -1.0, 2.0, 0.0])}
    masks = uniform_structure_masks(Sizes(), scores, 0.5)
    assert masks["vision_heads"][0].tolist() == [1.0, 0.0, 1.0, 0.0]  # the two lowest scores go
    assert masks["vision_heads"][1].sum() == 2 and masks["text_ffn"][0].sum() == 5 and masks["text_ffn"][1] is None


def test_ablations_are_fair_and_reported(demo_dir: Path) -> None:
    ablations = json.loads((demo_dir / "ablations.json").read_text())
    settings = json.loads((demo_dir / "settings.json").read_text())
    report = (demo_dir / "report.md").read_text()
    for task in DEFAULT_DEMO_TASKS:
        fixed = ablations["tasks"][task]["fixed_mask_steps"]
        rows = ablations["tasks"][task]["rows"]
        seeds = sorted({row["seed"] for row in rows})
        targets = list(dict.fromkeys(row["target"] for row in rows))
        # --quick repeats the ablations with 2 seeds at the run's target and at 0.8.
        assert fixed > 0 and seeds == [0, 1] and targets == [0.5, 0.8]
        for target, seed in itertools.product(targets, seeds):
            by_kind = {row["kind"]: row for row in rows if row["seed"] == seed and row["target"] == target}
            assert set(by_kind) == {"learned", "random", "uniform"}
            # The same sparsity of the prunable parameters, counted the same way (random masks overshoot by at most
            # one unit; the uniform split rounds per layer), and a similar encoder cost.
            learned = by_kind["learned"]
            for kind in ("random", "uniform"):
                assert abs(by_kind[kind]["sparsity"] - learned["sparsity"]) < 0.05, (task, seed, kind)
                assert abs(by_kind[kind]["gflops"] / learned["gflops"] - 1) < 0.15, (task, seed, kind)
            assert all(0 <= row["after_masking"] <= 1 and 0 <= row["after_training"] <= 1 for row in by_kind.values())
            # The same fixed-mask training for every row, the learned masks' included.
            names = [f"ablation_{kind}_{task}_{target:g}_seed{seed}" for kind in ("random", "uniform")]
            own = seed == 0 and target == 0.5
            learned_name = f"pruned_{task}" if own else f"ablation_learned_{task}_{target:g}_seed{seed}"
            learned_run = f"{learned_name}_fixed_masks"
            assert [ablations["run_steps"][name] for name in (learned_run, *names)] == [fixed] * 3
            rates = [ablations["run_learning_rates"][name] for name in (learned_run, *names)]
            assert rates == [settings["fixed_mask_learning_rates"][task]] * 3
        section = report.split(f"## {task}")[1]
        assert f"after {fixed} fixed-mask steps" in section and "| random masks | 0, 1 |" in section
        assert f"{task} at target sparsity 0.8: after the same fixed-mask training, the learned masks" in section


def test_pruning_schedule_splits_the_pruning_steps() -> None:
    from trainers.demo.run import DemoSettings

    settings = DemoSettings(prune_steps={"vqa": 450, "retrieval": 250, "nlvr2": 300})
    assert settings.pruning_schedule("vqa") == (300, 150) and sum(settings.pruning_schedule("retrieval")) == 250
    assert DemoSettings(fixed_mask_fraction=0.0).pruning_schedule("vqa")[1] == 0
    with pytest.raises(ValueError, match="fixed_mask_fraction"):
        DemoSettings(fixed_mask_fraction=1.0)
    with pytest.raises(ValueError, match="ablation_seeds"):
        DemoSettings(ablation_seeds=0)


def test_per_task_learning_rates_come_from_the_task_registry_or_the_shared_rate() -> None:
    from trainers.demo.run import DemoSettings
    from trainers.tasks import task_spec

    settings = DemoSettings()
    for task in ("vqa", "retrieval", "nlvr2"):
        demo = task_spec(task).demo
        assert settings.teacher_learning_rates[task] == (demo.teacher_learning_rate or settings.learning_rate)
        assert settings.student_learning_rates[task] == (demo.student_learning_rate or settings.learning_rate)
        assert settings.fixed_mask_learning_rates[task] == (demo.fixed_mask_learning_rate or settings.learning_rate)
    assert settings.student_learning_rates["retrieval"] != settings.learning_rate  # retrieval's own, measured
    assert settings.fixed_mask_learning_rates["vqa"] < settings.learning_rate
    assert DemoSettings(student_learning_rates={"vqa": 1e-4}).student_learning_rates == {"vqa": 1e-4}


def test_the_eta_weighs_each_stage_by_its_step_cost() -> None:
    from trainers.demo.run import STEP_COST, DemoRun, DemoSettings, training_minutes_left

    # A default run's plan, its pipelines one after another: after pre-training (0.267 s a step), a plain step count
    # would predict 23.3 min for what took 11.7; weighted by cost, its own stages' timings make the estimate right.
    # Its fine-tuning steps then (the timings below are that plan's).
    finetune_steps = {"vqa": 1500, "retrieval": 750, "nlvr2": 700}
    run = DemoRun(Path("unused"), DemoSettings(pretrain_steps=300, finetune_steps=finetune_steps), jobs=1)
    steps = run.steps_by_kind()
    assert set(steps) == set(STEP_COST) and sum(steps.values()) == sum(run.planned_steps().values())
    costs = run.planned_costs()
    assert costs["task pipelines"] == pytest.approx(
        STEP_COST["fine-tune teacher"] * steps["fine-tune teacher"]
        + STEP_COST["fine-tune + prune student"] * steps["fine-tune + prune student"]
    )
    seconds = {"pre-train teacher": 80.0, "distil student": 34.0, "task pipelines": 394.0 + 271.0}
    assert training_minutes_left(costs, [], 0.0) is None
    first = training_minutes_left(costs, ["pre-train teacher"], seconds["pre-train teacher"])
    actual = (seconds["distil student"] + seconds["task pipelines"]) / 60
    assert abs(first - actual) / actual < 0.1
    done = ["pre-train teacher", "distil student"]
    later = training_minutes_left(costs, done, sum(seconds[name] for name in done))
    assert abs(later - seconds["task pipelines"] / 60) / (seconds["task pipelines"] / 60) < 0.15
    assert training_minutes_left(costs, list(costs), sum(seconds.values())) is None


def test_the_eta_counts_pipelines_run_at_once() -> None:
    from trainers.demo.run import FEWER_THREADS_SLOWDOWN, DemoRun, DemoSettings, pipelines_speedup

    assert pipelines_speedup(1, 2, 2) == 1.0
    # 2 cores: 3 pipelines of 1 thread keep both cores busy, each step slower than with 2 threads.
    assert pipelines_speedup(3, 2, 2) == pytest.approx(2 / FEWER_THREADS_SLOWDOWN)
    assert pipelines_speedup(3, 1, 1) == 1.0  # one core: nothing runs at once, nor slower
    assert pipelines_speedup(3, 8, 8) == pytest.approx(3 / FEWER_THREADS_SLOWDOWN)
    one, three = (DemoRun(Path("unused"), DemoSettings(), jobs=jobs) for jobs in (1, 3))
    speedup = pipelines_speedup(3, one.machine["torch_threads"], one.machine["cores"])
    assert three.planned_costs()["task pipelines"] == pytest.approx(one.planned_costs()["task pipelines"] / speedup)
    assert DemoRun(Path("unused"), DemoSettings(), tasks=("vqa",), jobs=3).jobs == 1  # no more than the tasks


def test_the_longest_pipeline_keeps_a_core_where_pipelines_outnumber_cores() -> None:
    from trainers.demo.run import PIPELINE_NICENESS, DemoRun, DemoSettings

    def niceness(cores: int, tasks: tuple[str, ...] = ("vqa", "retrieval", "nlvr2")) -> dict[str, int]:
        run = DemoRun(Path("unused"), DemoSettings(), tasks=tasks, jobs=3)
        run.machine["cores"] = cores
        return run.pipeline_niceness()

    # One per core: retrieval (1500 steps at 2.4 VQA steps each) and VQA (3450) keep theirs; NLVR2 (1140) yields.
    assert niceness(2) == {"vqa": 0, "retrieval": 0, "nlvr2": PIPELINE_NICENESS}
    assert niceness(1) == {"vqa": PIPELINE_NICENESS, "retrieval": 0, "nlvr2": PIPELINE_NICENESS}
    assert niceness(3) == niceness(8) == {"vqa": 0, "retrieval": 0, "nlvr2": 0}  # a core each
    assert niceness(2, ("vqa", "nlvr2")) == {"vqa": 0, "nlvr2": 0}
    assert niceness(1, ("vqa", "nlvr2")) == {"vqa": 0, "nlvr2": PIPELINE_NICENESS}  # VQA's 3450 steps, NLVR2's 1140


def test_pipelines_run_at_once_by_default_where_there_are_cores(monkeypatch, capsys) -> None:
    from trainers.demo import run

    monkeypatch.setattr(run, "available_cores", lambda: 1)
    assert run.default_jobs(("vqa", "retrieval", "nlvr2")) == 1
    monkeypatch.setattr(run, "available_cores", lambda: 2)
    assert run.default_jobs(("vqa", "retrieval", "nlvr2")) == 3
    with pytest.raises(SystemExit):
        demo_main(["--jobs", "0"])
    assert "--jobs must be at least 1" in capsys.readouterr().err
    # Without fork (Windows, macOS) the pipelines run one after another, and asking for more is a clear error.
    monkeypatch.setattr(run, "can_fork", lambda: False)
    assert run.default_jobs(("vqa", "retrieval", "nlvr2")) == 1
    with pytest.raises(SystemExit):
        demo_main(["--jobs", "3"])
    assert "--jobs 3 runs the task pipelines in forked processes, which this platform lacks" in capsys.readouterr().err


def test_pipelines_at_once_give_the_models_of_pipelines_one_after_another(demo_dir: Path, tmp_path: Path) -> None:
    # The fixture ran the three pipelines at once (1 thread each); one after another, in this process, with 1
    # thread, every model trains and scores exactly alike: each training run starts from its own seed.
    demo_main(["--quick", "--tasks", "vqa,nlvr2", "--output_dir", str(tmp_path), "--num_threads", "1", "--jobs", "1"])
    assert not (tmp_path / "runs" / "vqa.log").exists()
    for task in ("vqa", "nlvr2"):
        for role in ("teacher", "student", "pruned"):
            cards = [
                json.loads((d / "models" / f"{role}_{task}" / "config.json").read_text()) for d in (demo_dir, tmp_path)
            ]
            assert cards[0] == cards[1]
            weights = [
                task_model_class(task).from_pretrained(d / "models" / f"{role}_{task}").state_dict()
                for d in (demo_dir, tmp_path)
            ]
            assert weights[0].keys() == weights[1].keys()
            assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0]), (role, task)


def test_ablation_seeds_needs_ablations(capsys) -> None:
    with pytest.raises(SystemExit):
        demo_main(["--ablation_seeds", "2"])
    assert "--ablation_seeds needs --ablations" in capsys.readouterr().err


def test_the_demo_uses_every_available_core_unless_told(monkeypatch, capsys) -> None:
    from trainers.demo import run

    monkeypatch.setattr(run, "available_cores", lambda: 2)
    assert run.default_num_threads() == 2
    monkeypatch.setattr(run, "available_cores", lambda: 64)
    assert run.default_num_threads() == 8  # the demo's small matrices gain little from more
    with pytest.raises(SystemExit):
        demo_main(["--num_threads", "0"])
    assert "--num_threads must be at least 1" in capsys.readouterr().err


def test_ablation_table_gives_the_lead_of_the_learned_masks_and_its_spread() -> None:
    from trainers.demo.report import ablation_table
    from trainers.demo.run import AblationRow

    rows = [
        AblationRow("learned", 0, 0.50, 0.39, 0.56, 0.57),
        AblationRow("random", 0, 0.50, 0.39, 0.47, 0.54),
        AblationRow("uniform", 0, 0.50, 0.39, 0.54, 0.58),
        AblationRow("learned", 1, 0.51, 0.39, 0.55, 0.56),
        AblationRow("random", 1, 0.51, 0.39, 0.48, 0.53),
        AblationRow("uniform", 1, 0.51, 0.39, 0.53, 0.55),
    ]
    text = "\n".join(ablation_table("vqa at target sparsity 0.5", rows, 150, "vqa_accuracy"))
    random_row = next(line for line in text.splitlines() if line.startswith("| random masks |"))
    # Learned minus random: 0.03 on both seeds (std 0); learned minus uniform: -0.01 and +0.01.
    assert random_row.endswith("| 0.0300 ± 0.0000 (0.0300 to 0.0300) |")
    assert "| 0.4750 ± 0.0071 (0.4700 to 0.4800) |" in random_row  # right after masking
    assert "beat random masks (by +0.0300 on average; ahead in 2 of 2 seeds)" in text
    assert "do **not** consistently beat uniform split (by +0.0000 on average; ahead in 1 of 2 seeds)" in text


@pytest.mark.parametrize("task", DEFAULT_DEMO_TASKS)
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
        f"someone/evlm-{role}_{task}" for role in ("teacher", "student", "pruned") for task in DEFAULT_DEMO_TASKS
    } | {"someone/evlm-teacher_pretrained", "someone/evlm-student_distilled"}
    for upload in UPLOADS:
        files = set(upload["files"])
        assert {"model.safetensors", "config.json", "README.md", "processor_config.json", "tokenizer.json"} <= files
        assert {"configuration_efficientvlm.py", "modeling_efficientvlm.py"} <= files
        if not upload["repo_id"].endswith(("_pretrained", "_distilled")):  # pre-training lives in the base file
            assert any(name.startswith("modeling_efficientvlm_") for name in files)


def test_loss_plot_of_runs_too_short_to_log_says_so_instead_of_an_empty_legend(tmp_path) -> None:
    import warnings

    from trainers.demo.report import plot_losses

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns on a legend without lines
        path = plot_losses({"teacher_vqa": [{"step": 1}]}, tmp_path / "losses.png")
    assert path.stat().st_size > 0


def test_results_table_shows_retained_share_precisely_enough_to_read_the_paper_bar() -> None:
    from trainers.demo.report import results_table

    # 0.8114 / 0.8249 = 98.36%: one decimal would print "98.4%" beside "fail" (the bar is >= 98.4%).
    metrics = {
        "teacher": {"vqa_accuracy": 0.8249},
        "student": {"vqa_accuracy": 0.8119},
        "pruned": {"vqa_accuracy": 0.8114},
    }
    rows = [
        {"name": name, "parameters": 1e6, "gflops": 1.0, "median_ms": 10.0, "speedup": speedup}
        for name, speedup in (("teacher", 1.0), ("student", 1.9), ("pruned", 2.42))
    ]
    lines = {line.split(" | ")[0].strip("| "): line for line in results_table("vqa", metrics, rows).splitlines()}
    assert lines["teacher"].endswith("| 100.00% | — |")
    assert lines["student"].endswith("| 98.42% | fail |")  # retained enough, but 1.9x < 2x
    assert lines["pruned"].endswith("| 98.36% | fail |")
    metrics["pruned"]["vqa_accuracy"] = 0.8118  # 98.41%
    assert results_table("vqa", metrics, rows).splitlines()[-1].endswith("| 98.41% | pass |")


def test_teacher_lead_is_read_against_the_test_splits_sampling_error() -> None:
    from trainers.demo.report import teacher_student_line

    counts = {"vqa_test": 836, "nlvr2_test": 600, "retrieval_test": 300}
    # sqrt(0.8175 * 0.1825 / 836) = 0.0134: a 0.0011 lead is a tie, a 0.03 lead is not.
    assert "read it as a tie" in teacher_student_line(0.8175, 0.8164, counts, "vqa")
    assert "(0.0134)" in teacher_student_line(0.8175, 0.8164, counts, "vqa")
    assert "by more than twice the standard error" in teacher_student_line(0.8475, 0.8164, counts, "vqa")
    assert "the student is not behind" in teacher_student_line(0.8164, 0.8175, counts, "vqa")
    assert "(ahead by 0.0151, less than twice the standard error" in teacher_student_line(0.8453, 0.8604, counts, "vqa")
    assert "(ahead by 0.0500, more than twice" in teacher_student_line(0.80, 0.85, counts, "vqa")
    assert "not behind the teacher**: distillation" in teacher_student_line(0.8, 0.8, counts, "vqa")  # no margin
    # A perfect teacher's score alone has no spread: the student's gives the error, sqrt(0.9917 * 0.0083 / 600).
    assert "more than twice the standard error of a score on 600 test statements (0.0037)" in teacher_student_line(
        1.0, 0.9917, counts, "nlvr2"
    )
    assert "read it as a tie" in teacher_student_line(1.0, 0.995, counts, "nlvr2")
    assert teacher_student_line(0.9, 0.8, {}, "vqa").endswith("the teacher is ahead.")
