"""`trainers.benchmark`: every workload on the tiny preset and a randomly pruned copy, ratios consistent with the
latencies, the JSON / table / plot outputs, peers built from configs, peak memory in a fresh process. Never timed
assertions: only relations that hold on any machine."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from trainers import cpu_memory
from trainers.benchmark import (
    WORKLOADS,
    BenchmarkReport,
    BenchmarkSettings,
    benchmark_models,
    format_report,
    plot_report,
    report_figure,
    run_benchmark,
    write_json,
)
from trainers.benchmark.suite import PEAK_TARGETS, SPEEDUP_PER_FLOPS_TARGET
from trainers.benchmark.workloads import TRAIN_STEPS

FAST = dict(text_length=8, warmup=0, repeats=1, rounds=2, vqa_candidates=6, vqa_k=3, retrieval_k=4, threads=(1,))


@pytest.fixture
def small_matmul_peak(monkeypatch):
    """Times the matmul peak on 256 x 256 products: where bfloat16 has no native support (an AVX2 CPU) torch's
    1024 x 1024 bfloat16 product takes seconds, and the peak's size is not in question in these tests."""
    from trainers.benchmark import report
    from trainers.evaluation import benchmarking

    for module in (benchmarking, report):
        monkeypatch.setattr(module, "matmul_peak_size", lambda device="cpu": 256)


@pytest.fixture(scope="module")
def report():
    models, notes = benchmark_models(["tiny"], [0.5])
    assert [m.name for m in models] == ["tiny", "tiny pruned 0.5"] and "tiny pruned 0.5: random masks" in notes[0]
    threads = torch.get_num_threads()
    # Recorded as glibc's defaults whatever ran before in this worker: a test of the `efficientvlm` script
    # (`commands.console()`) may have set the process's allocator to keep freed memory.
    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("always")
        patch.setattr(cpu_memory, "_kept", False)
        result = run_benchmark(models, BenchmarkSettings(workloads=WORKLOADS, batch_sizes=(2,), **FAST))
    assert torch.get_num_threads() == threads  # the thread sweep restores the setting
    # The retrieval workload is timed, not scored: its k = 4 warns of no capped recalls.
    assert not [str(warning.message) for warning in caught if "Re-ranking only the top k" in str(warning.message)]
    return result


def test_every_workload_has_a_row_per_model_with_consistent_ratios(report) -> None:
    names = {"encoders", "itm", "vqa", "retrieval", "train-step/distillation", "train-step/mask-learning"}
    assert {r.workload for r in report.results} == names
    assert len(report.results) == 2 * len(names)
    peak = report.matmul_peak_gflops[1]
    assert peak > 0
    for workload in names:
        base, pruned = report.rows(workload)
        assert (base.name, pruned.name, pruned.base) == ("tiny", "tiny pruned 0.5", "tiny")
        assert base.speedup == 1.0 and base.flops_reduction == 1.0 and base.speed_target is None
        assert pruned.speedup == pytest.approx(base.median_ms / pruned.median_ms)
        assert pruned.speedup_vs_base == pruned.speedup  # the base is the reference here
        # Random masks at sparsity 0.5 remove half the prunable parameters: fewer FLOPs, fewer parameters.
        assert pruned.gflops / base.gflops < 0.8
        assert pruned.flops_reduction == pytest.approx(base.gflops / pruned.gflops)
        assert pruned.parameters < base.parameters and pruned.encoder_parameters < base.encoder_parameters
        assert pruned.speed_target == (
            "pass" if pruned.speedup >= SPEEDUP_PER_FLOPS_TARGET * pruned.flops_reduction else "fail"
        )
        for row in (base, pruned):
            assert row.min_ms <= row.q1_ms <= row.median_ms <= row.q3_ms <= row.max_ms
            assert row.gflops_per_s == pytest.approx(row.gflops / (row.median_ms / 1e3))
            assert row.peak_fraction == pytest.approx(row.gflops_per_s / peak)
            assert row.peak_beside_gflops > 0
            assert row.peak_beside_fraction == pytest.approx(row.gflops_per_s / row.peak_beside_gflops)
            if workload in PEAK_TARGETS:
                target = PEAK_TARGETS[workload]
                assert row.peak_target == ("pass" if row.peak_beside_fraction >= target else "fail")
            else:
                assert row.peak_target is None
            assert (row.batch_size, row.image_size, row.threads) == (2, 32, 1)
    # A train step runs forward and backward: more FLOPs than the ITM forward alone.
    assert report.rows("train-step/distillation")[0].gflops > 2 * report.rows("itm")[0].gflops
    assert sum("mask-learning step" in note for note in report.notes) == 2


def test_table_json_and_plot(report, tmp_path) -> None:
    table = format_report(report)
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(report.results) + 1  # header + rows
    assert "| itm | tiny pruned 0.5 | 2 | 32 | 1 |" in table and "fp32 matmul peak" in table
    data = json.loads(write_json(report, tmp_path / "bench.json").read_text())
    assert format_report(BenchmarkReport.from_dict(data)) == table  # a saved run prints again
    assert set(data) == {
        "settings",
        "models",
        "machine",
        "matmul_peak_gflops",
        "dtype_peaks_gflops",
        "matmul_peak_samples",
        "targets",
        "results",
        "notes",
    }
    assert data["settings"]["batch_sizes"] == [2] and data["matmul_peak_gflops"]["1"] > 0
    # What each row name stands for: the pruned copy's preset, sparsity and seed.
    pruned = next(m for m in data["models"] if m["name"] == "tiny pruned 0.5")
    assert pruned["base"] == "tiny" and pruned["source"]["spec"] == "tiny" and pruned["source"]["sparsity"] == 0.5
    assert [m["name"] for m in data["models"]] == list(dict.fromkeys(r["name"] for r in data["results"]))
    # The peak is the best of its measurements: before the first setting and after each.
    samples = data["matmul_peak_samples"]["float32"]["1"]
    assert len(samples) == 1 + len(report.settings.workloads) and max(samples) == data["matmul_peak_gflops"]["1"]
    assert BenchmarkReport.from_dict(data).peak_samples == {"float32": {1: samples}}
    # How the process allocated is part of the machine (the fixture's process kept glibc's defaults).
    assert data["machine"]["freed_memory_kept"] is False and "the C library's default allocator" in table
    kept = copy.deepcopy(data)
    kept["machine"]["freed_memory_kept"] = True
    assert "CPU memory: freed blocks kept" in format_report(BenchmarkReport.from_dict(kept))
    # And which library the unpacked models' inference products ran on (this process's choice).
    from modeling_efficientvlm.packing_efficientvlm import cpu_products_library

    library = {
        "onednn": "oneDNN from the layers' own weights (products of 2^23 FLOPs or more)",
        "torch": "torch's own (MKL in x86 builds)",
    }
    assert data["machine"]["cpu_products"] == cpu_products_library()
    assert f"CPU products of the unpacked models' inference forms: {library[cpu_products_library()]}" in table
    for chosen, words in library.items():
        data["machine"]["cpu_products"] = chosen
        text = format_report(BenchmarkReport.from_dict(data))
        assert f"inference forms: {words} (`EFFICIENTVLM_CPU_PRODUCTS`" in text
    # And where those products ran the FFN activations.
    from modeling_efficientvlm.packing_efficientvlm import fuses_activations

    assert data["machine"]["cpu_activations"] == ("inside" if fuses_activations() else "after")
    for where, words in (("inside", "inside them (a post-op)"), ("after", "after them (torch's own pass, in place)")):
        data["machine"]["cpu_activations"] = where
        text = format_report(BenchmarkReport.from_dict(data))
        assert f"FFN activations of the oneDNN products (packed rows, unpacked ones on oneDNN): {words} (`" in text
    del data["machine"]["cpu_products"], data["machine"]["cpu_activations"]  # a report from before either: no line
    text = format_report(BenchmarkReport.from_dict(data))
    assert "CPU products" not in text and "FFN activations" not in text
    assert {"median_ms", "q1_ms", "peak_fraction", "peak_beside_fraction"} <= set(data["results"][0])
    assert data["results"][0]["name"] == "tiny"
    png = plot_report(report, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Latencies within one decade (no power of ten in view): the latency axis still carries numbers.
    narrow = copy.deepcopy(report)  # the fixture is shared by the module's tests
    for row, median_ms in zip(narrow.results, (1.7, 9.0)):
        row.median_ms = median_ms
    narrow.results = narrow.results[:2]
    latency = report_figure(narrow).axes[0]
    latency.figure.canvas.draw()
    low, high = latency.get_ylim()
    labels = [
        tick.label1.get_text()
        for tick in (*latency.yaxis.get_major_ticks(), *latency.yaxis.get_minor_ticks())
        if low <= tick.get_loc() <= high
    ]
    assert 1 < high / low < 10 and sum(bool(text) for text in labels) >= 2


def test_batch_and_image_size_sweep_and_memory(tmp_path) -> None:
    models, _ = benchmark_models(["tiny"])
    settings = BenchmarkSettings(batch_sizes=(1, 2), image_sizes=(32, 64), memory=True, **FAST)
    result = run_benchmark(models, settings)
    rows = {(r.batch_size, r.image_size): r for r in result.results}
    assert set(rows) == {(1, 32), (2, 32), (1, 64), (2, 64)}
    # Twice the batch, twice the FLOPs; twice the image side, four times the patches.
    assert rows[(2, 32)].gflops == pytest.approx(2 * rows[(1, 32)].gflops, rel=0.01)
    assert rows[(1, 64)].gflops > 2 * rows[(1, 32)].gflops
    # Memory: measured once per model and workload, at the largest setting, in a fresh process.
    measured = [r for r in result.results if r.peak_rss_mb is not None]
    assert [(r.batch_size, r.image_size) for r in measured] == [(2, 64)]
    assert measured[0].peak_rss_mb >= measured[0].loaded_rss_mb > 50


def test_several_dtypes_time_each_model_beside_its_copy_in_the_others(tmp_path, monkeypatch, small_matmul_peak) -> None:
    from trainers.benchmark import memory

    requests = []
    monkeypatch.setattr(
        memory, "peak_memory", lambda *args: requests.append(args) or {"peak_mb": 2.0, "loaded_mb": 1.0}
    )
    models, _ = benchmark_models(["tiny"], [0.5])
    settings = BenchmarkSettings(workloads=("itm",), batch_sizes=(2,), dtype="float32,bfloat16", memory=True, **FAST)
    report = run_benchmark(models, settings)
    rows = {r.name: r for r in report.results}
    assert list(rows) == ["tiny", "tiny [bfloat16]", "tiny pruned 0.5", "tiny pruned 0.5 [bfloat16]"]
    assert [r.dtype for r in rows.values()] == ["float32", "bfloat16"] * 2
    assert (rows["tiny [bfloat16]"].base, rows["tiny pruned 0.5 [bfloat16]"].base) == ("tiny", "tiny pruned 0.5")
    low = rows["tiny pruned 0.5 [bfloat16]"]
    assert low.speedup_vs_base == pytest.approx(rows["tiny pruned 0.5"].median_ms / low.median_ms)
    assert low.flops_reduction_vs_base == 1.0
    # Against its float32 model nothing is pruned; its speed target is judged against the preset's bfloat16 row.
    assert rows["tiny [bfloat16]"].speed_target is None
    assert low.target_base == "tiny [bfloat16]" and low.speed_target in ("pass", "fail")
    assert low.parameters == rows["tiny pruned 0.5"].parameters
    # Each row's share of the peak is of the peak in its own dtype, both measured in this run.
    float32_peak, bfloat16_peak = report.peaks_of("float32")[1], report.peaks_of("bfloat16")[1]
    assert float32_peak == report.matmul_peak_gflops[1] and report.dtype_peaks_gflops == {
        "bfloat16": {1: bfloat16_peak}
    }
    assert low.peak_fraction == pytest.approx(low.gflops_per_s / bfloat16_peak)
    assert rows["tiny"].peak_fraction == pytest.approx(rows["tiny"].gflops_per_s / float32_peak)
    # The copies really run in bfloat16, and their memory is measured with bfloat16 weights.
    assert next(models[0].in_dtype(torch.bfloat16).build("retrieval").parameters()).dtype == torch.bfloat16
    assert sorted(request[-1] for request in requests) == ["bfloat16", "bfloat16", "float32", "float32"]
    table = format_report(report)
    assert "| itm | tiny [bfloat16] | 2 |" in table and "bfloat16 matmul peak measured in this run" in table
    assert "[bfloat16]: the same model with bfloat16 weights" in table
    again = BenchmarkReport.from_dict(json.loads(write_json(report, tmp_path / "bench.json").read_text()))
    assert format_report(again) == table
    with pytest.raises(ValueError, match="distinct dtypes"):
        BenchmarkSettings(dtype="float32,float32")
    with pytest.raises(ValueError, match="float16 runs on CUDA only"):
        BenchmarkSettings(dtype="float32,float16")


def test_pruned_copies_padded_to_each_multiple_share_their_masks_and_outputs() -> None:
    models, notes = benchmark_models(["tiny"], [0.5], pad_multiples=[1, 8])
    assert [m.name for m in models] == ["tiny", "tiny pruned 0.5 pad 1", "tiny pruned 0.5 pad 8"] and len(notes) == 1
    exact, padded = (m.build("retrieval") for m in models[1:])
    exact_sizes, padded_sizes = exact.structure_sizes(), padded.structure_sizes()
    assert exact_sizes != padded_sizes
    for key in exact_sizes:
        for kept, width in zip(exact_sizes[key], padded_sizes[key]):
            assert width == kept if key.endswith("_heads") else kept <= width and (width % 8 == 0 or width == 64)
    inputs = {
        "pixel_values": torch.randn(2, 3, 32, 32),
        "input_ids": torch.randint(5, 100, (2, 6)),
        "attention_mask": torch.ones(2, 6, dtype=torch.long),
    }
    with torch.no_grad():
        torch.testing.assert_close(padded(**inputs).logits, exact(**inputs).logits, rtol=0, atol=1e-5)


def test_peers_build_from_configs_without_network(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models, notes = benchmark_models(["tiny", "blip-base", "clip-b16"])
    assert [m.kind for m in models] == ["efficientvlm", "blip", "clip-vision"] and len(notes) == 2
    settings = BenchmarkSettings(workloads=("itm", "vqa"), batch_sizes=(1,), image_sizes=(32,), **FAST)
    result = run_benchmark(models, settings)
    # CLIP's vision tower has no ITM head; no peer ranks VQA answers.
    assert [(r.workload, r.name) for r in result.results] == [("itm", "tiny"), ("itm", "blip-base"), ("vqa", "tiny")]
    # ... and the report says so, once per workload, rather than leaving the models out silently.
    assert result.notes[:2] == [
        f"No {workload} rows for {names}: no model of that kind (a peer without that head, or a saved folder of "
        "another task)."
        for workload, names in (("itm", "clip-b16"), ("vqa", "blip-base, clip-b16"))
    ]
    assert [m["source"]["spec"] for m in result.models] == ["tiny", "blip-base", "clip-b16"]
    blip = result.results[1]
    assert 200e6 < blip.parameters and blip.encoder_parameters < blip.parameters
    assert blip.flops_reduction < 0.1  # BLIP-base is far bigger than the tiny preset


def test_speed_targets_judge_compressed_models_against_their_base() -> None:
    from trainers.benchmark import BenchmarkModel, BenchmarkResult
    from trainers.benchmark.suite import _add_ratios

    def row(name: str, gflops: float, ms: float, base: str | None = None) -> BenchmarkResult:
        return BenchmarkResult("itm", name, 1, 224, 1, 10, 8, gflops, ms, ms, ms, ms, ms, gflops / ms, 0.85, base=base)

    kinds = {"teacher": "efficientvlm", "peer": "blip", "student": "efficientvlm", "pruned": "efficientvlm"}
    models = {name: BenchmarkModel(name, kind) for name, kind in kinds.items()}
    rows = [
        row("teacher", 8.0, 100.0),
        row("peer", 4.0, 90.0),
        row("student", 4.0, 60.0),
        row("pruned", 2.0, 30.0, "student"),
    ]
    _add_ratios(rows, models)
    teacher, peer, student, pruned = rows
    assert teacher.speed_target is None and peer.speed_target is None  # the reference; a peer is not ours to judge
    assert (student.flops_reduction_vs_base, student.speedup_vs_base) == (2.0, pytest.approx(100 / 60))
    assert student.speed_target == "fail"  # 1.67x < 0.9 x 2
    assert (pruned.base, pruned.flops_reduction_vs_base, pruned.speedup_vs_base) == ("student", 2.0, 2.0)
    assert pruned.speed_target == "pass" and pruned.speedup == pytest.approx(100 / 30)  # 2x >= 0.9 x 2


def test_variant_rows_of_a_pruned_model_are_judged_against_the_same_variant_of_its_base() -> None:
    from trainers.benchmark import BenchmarkModel, BenchmarkReport, BenchmarkResult
    from trainers.benchmark.suite import _add_ratios, target_notes

    def row(name: str, gflops: float, ms: float, base: str | None = None) -> BenchmarkResult:
        return BenchmarkResult("itm", name, 1, 384, 2, 10, 8, gflops, ms, ms, ms, ms, ms, gflops / ms, 0.85, base=base)

    student, pruned = (
        BenchmarkModel("student", "efficientvlm"),
        BenchmarkModel("pruned", "efficientvlm", base="student"),
    )
    models = {
        "teacher": BenchmarkModel("teacher", "efficientvlm"),
        "teacher [packed]": BenchmarkModel("teacher [packed]", "efficientvlm", base="teacher"),
        "student": student,
        "student [packed]": BenchmarkModel("student [packed]", "efficientvlm", base="student"),
        "pruned": pruned,
        "pruned [packed]": BenchmarkModel("pruned [packed]", "efficientvlm", base="pruned"),
        # A compiled row's model is its eager model (as `_measure_setting` maps it).
        "student [packed] [compiled]": student,
        "pruned [packed] [compiled]": pruned,
    }
    rows = [
        row("teacher", 8.0, 100.0),
        row("teacher [packed]", 8.0, 90.0, "teacher"),
        row("student", 4.0, 60.0),
        row("student [packed]", 4.0, 45.0, "student"),
        row("student [packed] [compiled]", 4.0, 40.0, "student [packed]"),
        row("pruned", 2.0, 30.0, "student"),
        row("pruned [packed]", 2.0, 30.0, "pruned"),
        row("pruned [packed] [compiled]", 2.0, 20.0, "pruned [packed]"),
    ]
    _add_ratios(rows, models)
    by_name = {r.name: r for r in rows}
    # The reference's variant and one whose counterpart was not timed are not judged.
    for name in ("teacher [packed]", "student [packed] [compiled]"):
        assert by_name[name].speed_target is None and by_name[name].target_base is None
    student_packed = by_name["student [packed]"]  # the student against the teacher, both packed: 2x for 2x
    assert (student_packed.target_base, student_packed.speed_target) == ("teacher [packed]", "pass")
    packed, compiled = by_name["pruned [packed]"], by_name["pruned [packed] [compiled]"]
    assert packed.base == "pruned" and packed.speedup_vs_base == 1.0  # the columns still give what packing buys
    assert (packed.target_base, packed.speed_target) == ("student [packed]", "fail")  # 45 / 30 = 1.5x < 0.9 x 2
    assert (compiled.target_base, compiled.speed_target) == ("student [packed] [compiled]", "pass")  # 2x
    assert by_name["pruned"].target_base is None and by_name["pruned"].speed_target == "pass"
    notes = target_notes(BenchmarkReport(BenchmarkSettings(), rows, {}))
    assert notes == [
        "student [packed] (itm, batch 1, 384px, 2 thread(s)): speed target against teacher [packed]: 2.00x / 2.00x "
        "FLOPs cut = 1.00 (target >= 0.9: pass)",
        "pruned [packed] (itm, batch 1, 384px, 2 thread(s)): speed target against student [packed]: 1.50x / 2.00x "
        "FLOPs cut = 0.75 (target >= 0.9: fail)",
        "pruned [packed] [compiled] (itm, batch 1, 384px, 2 thread(s)): speed target against student [packed] "
        "[compiled]: 2.00x / 2.00x FLOPs cut = 1.00 (target >= 0.9: pass)",
    ]
    # A row timed with a wide spread is named, with its spread, under the verdicts (5% of the median is not wide).
    by_name["pruned"].q1_ms, by_name["pruned"].q3_ms = 28.5, 31.5
    by_name["student"].q1_ms, by_name["student"].q3_ms = 59.0, 62.0
    by_name["teacher"].q1_ms, by_name["teacher"].q3_ms = 98.0, 103.0
    assert target_notes(BenchmarkReport(BenchmarkSettings(), rows, {}))[3:] == [
        "Noisy timings (interquartile range over 5% of the median): pruned (itm, batch 1, 384px, 2 thread(s)): 10.0%. "
        "Ratios and verdicts involving these rows can move by as much: rerun with more --rounds, on a quieter machine."
    ]
    # So is the peak's own drift between its measurements (5% of the best is not a drift).
    samples = {"float32": {1: [100.0, 96.0, 95.0], 2: [200.0, 180.0, 199.0]}, "bfloat16": {2: [50.0, 52.0]}}
    assert target_notes(BenchmarkReport(BenchmarkSettings(), rows, {}, peak_samples=samples))[4:] == [
        "The matmul peak itself moved by over 5% during the run (float32, 2 thread(s): 180.0-200.0 GFLOP/s over 3 "
        "measurements): the host's own speed changed, and rows timed in its slower moments read low against the best "
        "by up to as much (not against the peak timed beside them, which the peak targets are judged on)."
    ]


def test_the_peak_target_is_judged_against_the_peak_timed_beside_each_row(monkeypatch) -> None:
    # Timings are made up (no clock): the host "slowed" while the rows ran, so each row reads 85% of the peak
    # timed beside it but 68% of the run's best; the order of the timed calls is recorded.
    from trainers.benchmark import suite

    order, flops, counts = [], {}, []

    def timings(workloads, warmup, repeats, rounds):
        order.extend(workloads)
        result = {}
        for key in workloads:
            if key[0] == suite.PEAK_BESIDE:  # 1 GFLOP per call at 100 GFLOP/s (median of 7.5, 10, 12.5 ms)
                result[key] = [0.0125, 0.01, 0.0075]
            else:  # each row at 85 GFLOP/s
                result[key] = [flops[key] / 85e9] * 3
        return result

    count = suite.count_flops
    monkeypatch.setattr(suite, "count_flops", lambda call: flops.setdefault(("itm", f"m{len(flops)}"), count(call)))
    monkeypatch.setattr(suite, "interleaved_timings", timings)
    # A product of 1 GFLOP in 2.5 ms at best: 40 of them fill PEAK_BESIDE_SECONDS, one has more FLOPs than a row.
    monkeypatch.setattr(suite, "fastest_matmul", lambda device, dtype: (lambda: None, 10**9, 0.0025))
    monkeypatch.setattr(suite, "back_to_back", lambda product, n: counts.append(n) or product)
    monkeypatch.setattr(suite, "matmul_peak_gflops", lambda *args, **kwargs: 125.0)
    models, _ = benchmark_models(["tiny"], [0.5])
    for model, name in zip(models, ("m0", "m1")):
        model.name = name
    models[1].base = "m0"
    settings = BenchmarkSettings(workloads=("itm",), batch_sizes=(2,), **FAST)
    report = run_benchmark(models, settings)
    peak = ("matmul peak", "itm")
    assert order == [("itm", "m0"), (*peak, "m0"), ("itm", "m1"), (*peak, "m1")]  # A, P, B, P in each round
    assert counts == [1, 1]  # as many FLOPs as the row, at least one product
    for row in report.results:
        assert row.gflops_per_s == pytest.approx(85.0)
        assert row.peak_beside_gflops == pytest.approx(100.0)  # the median of the calls beside it, as the row's
        assert (row.peak_beside_fraction, row.peak_fraction) == (pytest.approx(0.85), pytest.approx(0.68))
        assert row.peak_target == "pass"
    assert "| 68% / 85% |" in format_report(report)
    assert (
        "Peak targets whose verdict would differ against the run's best matmul peak (the target is judged against "
        "the peak timed beside each row, in the same rounds): m0 (itm, batch 2, 32px, 1 thread(s)): 85% of 100.0 "
        "GFLOP/s beside it, 68% of the best 125.0; m1 (itm, batch 2, 32px, 1 thread(s)): 85% of 100.0 GFLOP/s beside "
        "it, 68% of the best 125.0. The host ran slower while these rows were timed than at its best moment."
    ) in report.notes
    # Against a host that kept its speed the verdicts agree, and no such note is written.
    monkeypatch.setattr(suite, "matmul_peak_gflops", lambda *args, **kwargs: 100.0)
    flops.clear()
    report = run_benchmark(models, settings)
    assert all(row.peak_target == "pass" for row in report.results)
    assert not [note for note in report.notes if note.startswith("Peak targets whose verdict")]
    # The peak's matrices are freed before each row's device memory is measured (a GPU's 8192^2 pair: 512 MB).
    import weakref

    class Product:
        def __call__(self) -> None:
            pass

    alive = []

    def fastest(device, dtype):
        product = Product()
        alive.append(weakref.ref(product))
        return product, 10**9, 0.0025

    def device_memory(calls, device):
        assert alive and all(ref() is None for ref in alive)
        return {}

    monkeypatch.setattr(suite, "fastest_matmul", fastest)
    monkeypatch.setattr(suite, "_device_memory", device_memory)
    flops.clear()
    run_benchmark(models, settings)
    # Products of a kFLOP: the row's FLOPs would take thousands, PEAK_BESIDE_SECONDS holds 40.
    monkeypatch.setattr(suite, "fastest_matmul", lambda device, dtype: (lambda: None, 1000, 0.0025))
    counts.clear(), flops.clear()
    run_benchmark(models, settings)
    assert counts == [40, 40]


def test_settings_are_validated_and_shared_with_the_demo() -> None:
    from trainers.demo.run import DemoSettings

    defaults = BenchmarkSettings()
    assert (DemoSettings().benchmark_batch_size, DemoSettings().benchmark_repeats) == (
        defaults.batch_sizes[0],
        defaults.repeats,
    )
    with pytest.raises(ValueError, match="Unknown workload"):
        BenchmarkSettings(workloads=("itm", "nope"))
    with pytest.raises(ValueError, match="batch_sizes"):
        BenchmarkSettings(batch_sizes=(0,))
    with pytest.raises(ValueError, match="--random_prune"):
        benchmark_models(["blip-base"], [0.5])
    with pytest.raises(ValueError, match=r"--random_prune sparsities must be in \(0, 1\); got \[0.0\]"):
        benchmark_models(["tiny"], [0.0])
    # A pruned copy without the model it is measured against failed in the ratios, after all the timing.
    pruned_alone = benchmark_models(["tiny"], [0.5])[0][1:]
    with pytest.raises(ValueError, match=r"^tiny pruned 0.5 is measured against its base tiny, which is not among"):
        run_benchmark(pruned_alone, BenchmarkSettings(workloads=("itm",)))
    for bad, message in [
        ({"batch_sizes": (2, 2)}, r"`batch_sizes` repeat: \(2, 2\)"),
        ({"workloads": ("itm", "itm")}, "`workloads` repeat"),
        ({"text_length": 0}, "`text_length` must be at least 1; got 0"),
        ({"vqa_candidates": 0, "vqa_k": 0}, "`vqa_candidates` must be at least 1"),
        ({"vqa_k": 64}, r"`vqa_k` \(64\) re-scores some of the `vqa_candidates` \(32\)"),
        ({"texts_per_image": 0}, "`texts_per_image` must be at least 1"),
        (
            {"workloads": ("itm", "train-step"), "batch_sizes": (1, 8)},
            r"\(--batch_sizes / --batch_size\) \[1, 8\]: the train-step workload needs batches of at least 2",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            BenchmarkSettings(**bad)
    # An image size that is not a multiple of the patch size fails before the first setting is timed.
    models, _ = benchmark_models(["tiny"])
    with pytest.raises(ValueError, match=r"--image_sizes \[36\]: not multiples of tiny's patch size 8"):
        run_benchmark(models, BenchmarkSettings(workloads=("itm",), batch_sizes=(1,), image_sizes=(32, 36), **FAST))


def test_a_workload_no_model_can_run_is_refused_before_timing(monkeypatch, tiny_config) -> None:
    from modeling_efficientvlm import EfficientVLMForQuestionAnswering, EfficientVLMForVisualReasoning
    from trainers.benchmark import prebuilt_models, suite

    monkeypatch.setattr(suite, "matmul_peak_gflops", lambda *args, **kwargs: pytest.fail("timed"))
    nlvr2, vqa = EfficientVLMForVisualReasoning(tiny_config), EfficientVLMForQuestionAnswering(tiny_config)
    # With an image size given, no reference model is looked up: the check must not rest on that.
    for model, workloads in ((nlvr2, ("encoders", "itm")), (vqa, ("retrieval",)), (vqa, ("train-step",))):
        settings = BenchmarkSettings(workloads=workloads, batch_sizes=(2,), image_sizes=(32,), **FAST)
        with pytest.raises(ValueError, match=f"None of the models can run the '{workloads[-1]}' workload \\(m: "):
            run_benchmark(prebuilt_models({"m": model}), settings)


def test_a_mistyped_preset_is_named_with_the_presets_before_timing(monkeypatch) -> None:
    import transformers

    from trainers.benchmark import suite

    def offline(name, *args, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}.")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", offline)
    monkeypatch.setattr(suite, "matmul_peak_gflops", lambda *args, **kwargs: pytest.fail("timed"))
    models, _ = benchmark_models(["efficientvlm-smal"])
    message = (
        r"--models 'efficientvlm-smal': not a preset \(.*efficientvlm-small.*\), a peer \(blip-base, clip-b16\) or a "
        r"folder, and not loadable as a Hub id: We couldn't connect"
    )
    with pytest.raises(ValueError, match=message):
        run_benchmark(models, BenchmarkSettings(workloads=("itm",), batch_sizes=(2,), **FAST))


def test_the_benchmark_command_refuses_what_it_would_ignore_or_merge(tmp_path) -> None:
    from trainers.benchmark import BenchmarkResult
    from trainers.benchmark.report import plot_path
    from trainers.commands.benchmark import main

    taken = tmp_path / "a-file"  # a file where the outputs' folder would be
    taken.write_text("")
    base = ["--workload", "itm", "--threads", "1", "--repeats", "1", "--rounds", "1", "--warmup", "0"]
    for argv, message in [
        (["--models", "tiny", "tiny"], "--models / --preset / --peer: tiny given more than once"),
        (["--preset", "tiny", "--random_prune", "0.5,0.5"], "--random_prune: 0.5 given more than once"),
        (["--preset", "tiny", "--random_prune", "0,0.5"], r"sparsities in \(0, 1\); got '0,0.5'"),
        (["--preset", "foo"], r"--preset 'foo': not a preset; choose one of"),
        (["--models", "tiny", "--peer", "nope"], r"--peer 'nope': not a peer built here; choose from \['blip-base'"),
        (["--models", "tiny", "--batch_size", "0"], r"`batch_sizes` must be positive integers; got \(0,\)"),
        (["--models", "tiny", "--batch_size", "2", "--batch_sizes", "1,2"], "Give one of --batch_size .2. and"),
        (
            ["--models", "tiny", "--batch_size", "8", "--batch_sizes", "32"],
            r"--batch_size \(8\) and --batch_sizes \('32'\)",
        ),
        (["--models", "tiny", "--output_json", str(tmp_path)], "--output_json .* is a folder; give the file"),
        (["--models", "tiny", "--plot", str(tmp_path / "out.txt")], r"--plot .*out.txt': matplotlib writes no '.txt'"),
        (["--models", "tiny", "--output_json", str(taken / "b.json")], "--output_json .*b.json': cannot write there"),
        (["--models", "tiny", "--plot", str(taken / "sub" / "b.png")], "--plot .*b.png': cannot write there"),
    ]:
        with pytest.raises(ValueError, match=message):
            main([*base, *argv])
    # A plot named without a suffix is written as matplotlib writes it, with .png added, and that file is named.
    assert plot_path(tmp_path / "noext") == tmp_path / "noext.png"
    row = BenchmarkResult("itm", "tiny", 2, 32, 1, 10, 8, 0.01, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0, 0.5)
    written = plot_report(BenchmarkReport(BenchmarkSettings(), [row], {1: 20.0}), tmp_path / "noext")
    assert written == tmp_path / "noext.png" and written.read_bytes()[:4] == b"\x89PNG"


def test_the_table_gives_gflops_to_3_significant_digits() -> None:
    from trainers.benchmark import BenchmarkResult

    rows = [
        BenchmarkResult("itm", f"m{i}", 2, 32, 1, 10, 8, gflops, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0, 0.5)
        for i, gflops in enumerate((0.010104, 0.5, 10.404, 99.96, 153.4, 1234.5))
    ]
    table = format_report(BenchmarkReport(BenchmarkSettings(), rows, {1: 20.0}))
    # A tiny model's 0.0101 GFLOPs does not read 0.00; large counts stay whole numbers, not 1.23e+03.
    cells = [line.split(" | ")[7] for line in table.splitlines() if line.startswith("| itm | m")]
    assert cells == ["0.0101", "0.5", "10.4", "100", "153", "1234"]


def test_packed_copies_sit_out_the_training_steps() -> None:
    models, _ = benchmark_models(["tiny"])
    settings = BenchmarkSettings(workloads=("train-step",), batch_sizes=(2,), pack_cpu_weights=True, **FAST)
    names = {row.name for row in run_benchmark(models, settings).results}
    assert names == {"tiny"}


def test_bfloat16_runs_every_workload_in_that_dtype_with_a_peak_of_the_same_dtype(
    monkeypatch, small_matmul_peak
) -> None:
    from trainers.evaluation import retrieval

    seen = {}
    evaluate = retrieval.retrieval_evaluate

    def spy(model, pixel_values, *args, **kwargs):
        seen.update(pixels=(pixel_values.device.type, pixel_values.dtype), batch_size=kwargs["batch_size"])
        return evaluate(model, pixel_values, *args, **kwargs)

    monkeypatch.setattr(retrieval, "retrieval_evaluate", spy)
    models, _ = benchmark_models(["tiny"])
    settings = BenchmarkSettings(
        workloads=("itm", "retrieval", "train-step"), batch_sizes=(2,), dtype="bfloat16", retrieval_batch_size=3, **FAST
    )
    result = run_benchmark(models, settings)
    assert next(models[0].build("retrieval").parameters()).dtype == torch.bfloat16
    # The retrieval images stay on the CPU (a dataset), in the model's dtype, sent in the given batches.
    assert seen == {"pixels": ("cpu", torch.bfloat16), "batch_size": 3}
    assert {r.workload for r in result.results} == {"itm", "retrieval", *TRAIN_STEPS}
    assert all(r.gflops > 0 and r.peak_fraction > 0 and r.peak_device_mb is None for r in result.results)
    table = format_report(result)
    assert "bfloat16 matmul peak measured in this run on the CPU" in table and "mixed precision" in table


def test_train_steps_keep_float32_weights_under_bfloat16_autocast() -> None:
    from trainers.benchmark.workloads import WorkloadShape, build_workloads

    models, _ = benchmark_models(["tiny"])
    models[0].place("cpu", torch.bfloat16)
    steps = build_workloads(models[0], "train-step", WorkloadShape(batch_size=2, image_size=32, text_length=8))
    for step in steps.values():
        trainer = step.trainer
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        loss = step()
        assert torch.isfinite(loss)
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        assert trainer.args.bf16 and any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_both_train_steps_of_a_pruned_copy_train_the_same_model_without_its_padding() -> None:
    from trainers.benchmark.workloads import WorkloadShape, build_workloads

    models, _ = benchmark_models(["tiny"], [0.5])  # FFN widths padded to multiples of 8 with all-zero neurons
    steps = build_workloads(models[1], "train-step", WorkloadShape(batch_size=2, image_size=32, text_length=8))
    distilled, masked = (steps[name].trainer for name in TRAIN_STEPS)
    padded = models[1].build("retrieval").structure_sizes()
    assert distilled.model.structure_sizes() == masked.model.structure_sizes() != padded
    assert sum(p.numel() for p in distilled.model.parameters()) == sum(p.numel() for p in masked.model.parameters())
    neurons = steps[TRAIN_STEPS[0]].silent_neurons_dropped
    assert neurons > 0 and masked.silent_neurons_dropped is None  # nothing left for the trainer to remove (or warn)
    report = run_benchmark(models, BenchmarkSettings(workloads=("train-step",), batch_sizes=(2,), **FAST))
    assert f"tiny pruned 0.5: train-step students without its {neurons} padding FFN neurons" in report.notes[0]


def test_memory_is_measured_for_each_train_step_alone(monkeypatch) -> None:
    from trainers.benchmark import BenchmarkResult, memory
    from trainers.benchmark.suite import _add_memory
    from trainers.benchmark.workloads import WorkloadShape, build_workloads

    models, _ = benchmark_models(["tiny"])
    shape = WorkloadShape(batch_size=2, image_size=32, text_length=8)
    for step in TRAIN_STEPS:  # what the fresh process builds: that step's trainer, not the other's
        assert list(build_workloads(models[0], step, shape)) == [step]
    requests = []
    peaks = {TRAIN_STEPS[0]: 300.0, TRAIN_STEPS[1]: 400.0}
    monkeypatch.setattr(
        memory,
        "peak_memory",
        lambda source, workload, *args: requests.append(workload) or {"peak_mb": peaks[workload], "loaded_mb": 100.0},
    )
    rows = [BenchmarkResult(step, "tiny", 2, 32, 1, 10, 8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5) for step in peaks]
    _add_memory(models, rows, BenchmarkSettings(workloads=("train-step",), batch_sizes=(2,), **FAST))
    assert requests == list(TRAIN_STEPS) and [row.peak_rss_mb for row in rows] == [300.0, 400.0]


def test_train_steps_leave_no_folder_behind(tmp_path, monkeypatch) -> None:
    import gc
    import tempfile

    from trainers.benchmark.workloads import WorkloadShape, build_workloads

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    models, _ = benchmark_models(["tiny"])
    steps = build_workloads(models[0], "train-step", WorkloadShape(batch_size=2, image_size=32, text_length=8))
    assert sorted(steps) == sorted(TRAIN_STEPS) and len(list(tmp_path.iterdir())) == 1
    steps[TRAIN_STEPS[0]]()
    del steps
    gc.collect()
    assert list(tmp_path.iterdir()) == []


def test_every_setting_compiles_every_model_afresh(monkeypatch) -> None:
    """Inductor's CPU kernels keep the thread count they were generated for: a second thread setting must not be
    handed the first one's graphs; and past dynamo's graphs per code (8 by default; 2 here, so that 3 models go past
    it) the later models must not run eager."""
    from trainers.benchmark import suite

    graphs, compile_ = [], torch.compile

    def counting_backend(graph, example_inputs):
        graphs.append(torch.get_num_threads())
        return graph.forward

    monkeypatch.setattr(suite.torch, "compile", lambda function, **kwargs: compile_(function, backend=counting_backend))
    models, _ = benchmark_models(["tiny"], [0.3, 0.6])  # 3 models: one past 2
    fast = {**FAST, "threads": (1, 2), "rounds": 1}
    with torch._dynamo.config.patch(recompile_limit=2):  # (pytest >= 9.2's monkeypatch deletes config entries)
        run_benchmark(models, BenchmarkSettings(workloads=("itm",), batch_sizes=(2,), compile="default", **fast))
    assert graphs == [1] * len(models) + [2] * len(models)


def test_compiled_rows_are_timed_beside_the_eager_models_with_the_eager_flops(monkeypatch) -> None:
    from trainers.benchmark import suite

    modes, compile_ = [], torch.compile

    def spy(function, mode=None, options=None):  # dynamo's real tracing, without inductor's code generation (slow)
        modes.append(mode or options)
        return compile_(function, backend="eager")

    monkeypatch.setattr(suite.torch, "compile", spy)
    models, _ = benchmark_models(["tiny"], [0.5])
    settings = BenchmarkSettings(workloads=("itm", "train-step"), batch_sizes=(2,), compile="reduce-overhead", **FAST)
    rows = {(r.workload, r.name): r for r in run_benchmark(models, settings).results}
    assert modes == ["reduce-overhead", "reduce-overhead"]  # the itm rows of both models, not the train steps
    assert sorted(name for workload, name in rows if workload == "itm") == [
        "tiny",
        "tiny [compiled]",
        "tiny pruned 0.5",
        "tiny pruned 0.5 [compiled]",
    ]
    assert not any(name.endswith("[compiled]") for workload, name in rows if workload in TRAIN_STEPS)
    for model in ("tiny", "tiny pruned 0.5"):
        eager, compiled = rows[("itm", model)], rows[("itm", model + " [compiled]")]
        assert compiled.base == model and compiled.gflops == eager.gflops
        assert compiled.speedup_vs_base == pytest.approx(eager.median_ms / compiled.median_ms)
        assert compiled.flops_reduction_vs_base == 1.0
    assert rows[("itm", "tiny pruned 0.5")].speed_target in ("pass", "fail")
    # The compiled pruned copy's speed target: against the compiled preset.
    assert rows[("itm", "tiny [compiled]")].speed_target is None
    assert rows[("itm", "tiny pruned 0.5 [compiled]")].target_base == "tiny [compiled]"
    assert rows[("itm", "tiny pruned 0.5 [compiled]")].speed_target in ("pass", "fail")
    assert "torch.compile(mode='reduce-overhead')" in format_report(run_benchmark(models[:1], settings))
    freezing = BenchmarkSettings(workloads=("itm",), batch_sizes=(2,), compile="freezing", **FAST)
    assert "torch.compile(options={'freezing': True})" in format_report(run_benchmark(models[:1], freezing))
    assert modes[-1] == {"freezing": True}
    with pytest.raises(ValueError, match="Unknown compile mode 'fast'"):
        BenchmarkSettings(workloads=("itm",), compile="fast")
    with pytest.raises(ValueError, match="compiled rows to the encoders, itm, vqa workloads"):
        BenchmarkSettings(workloads=("retrieval",), compile="default")

    def broken(function, mode=None):
        def call():
            raise RuntimeError("inductor: no C++ compiler")

        return call

    monkeypatch.setattr(suite.torch, "compile", broken)
    with pytest.raises(RuntimeError, match="torch.compile\\(mode='default'\\) failed on this workload: inductor"):
        run_benchmark(models[:1], BenchmarkSettings(workloads=("itm",), batch_sizes=(2,), compile="default", **FAST))


def test_device_and_dtype_settings_are_checked(monkeypatch) -> None:
    with pytest.raises(ValueError, match="Unknown dtype 'fp8'"):
        BenchmarkSettings(dtype="fp8")
    with pytest.raises(ValueError, match="float16 runs on CUDA only"):
        BenchmarkSettings(dtype="float16")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N; got 'meta'"):
        BenchmarkSettings(device="meta")
    with pytest.raises(ValueError, match="name the one to measure"):
        BenchmarkSettings(device="auto")
    with pytest.raises(ValueError, match="Unknown device 'gpu0'"):
        BenchmarkSettings(device="gpu0")
    with pytest.raises(ValueError, match="retrieval_batch_size"):
        BenchmarkSettings(retrieval_batch_size=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA device"):
        BenchmarkSettings(device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="peak GPU memory"):
        BenchmarkSettings(device="cuda", memory=True)
    assert BenchmarkSettings(device="cuda:0", dtype="float16").torch_dtype == torch.float16


def test_cuda_timings_wait_for_the_device_and_memory_is_the_allocators_peak(monkeypatch) -> None:
    from trainers.benchmark.suite import _device_memory
    from trainers.evaluation.benchmarking import synchronized

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device))))
    call = lambda: events.append("call") or 7  # noqa: E731
    assert synchronized(call, "cpu") is call
    assert synchronized(call, "cuda:0")() == 7 and events == ["call", ("sync", "cuda:0")]
    allocated = {"now": 100 * 2**20, "peak": 0}

    def workload():
        allocated["peak"] = allocated["now"] + 30 * 2**20

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocated.update(peak=0))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    memory = _device_memory({("itm", "tiny"): workload}, "cuda")
    assert memory == {("itm", "tiny"): {"peak_device_mb": 130.0, "device_workload_mb": 30.0}}
    assert _device_memory({("itm", "tiny"): workload}, "cpu") == {}


def test_packed_rows_are_timed_beside_their_models_with_the_same_flops_and_outputs(tmp_path, monkeypatch) -> None:
    from trainers.benchmark import memory

    requests = []
    monkeypatch.setattr(
        memory, "peak_memory", lambda source, *args: requests.append(source) or {"peak_mb": 2.0, "loaded_mb": 1.0}
    )
    models, _ = benchmark_models(["tiny"], [0.5])
    settings = BenchmarkSettings(workloads=("itm",), batch_sizes=(2,), pack_cpu_weights=True, memory=True, **FAST)
    report = run_benchmark(models, settings)
    rows = {r.name: r for r in report.results}
    assert list(rows) == ["tiny", "tiny [packed]", "tiny pruned 0.5", "tiny pruned 0.5 [packed]"]
    for name in ("tiny", "tiny pruned 0.5"):
        packed = rows[name + " [packed]"]
        assert packed.base == name and packed.gflops == rows[name].gflops  # packed products counted as GEMMs
        assert packed.speedup_vs_base == pytest.approx(rows[name].median_ms / packed.median_ms)
        assert packed.flops_reduction_vs_base == 1.0
    assert rows["tiny [packed]"].speed_target is None
    pruned_packed = rows["tiny pruned 0.5 [packed]"]
    assert pruned_packed.target_base == "tiny [packed]" and pruned_packed.speed_target in ("pass", "fail")
    # The packed copies are built packed (their memory measured so too), and score as their models do.
    assert [source.pack_cpu_weights for source in requests] == [False, True, False, True]
    plain, packed = models[1].build("retrieval"), models[1].packed().build("retrieval")
    assert all(block.cpu_packs is not None for block in packed.modules() if hasattr(block, "cpu_packs"))
    pixels = torch.randn(2, 3, plain.config.vision_config.image_size, plain.config.vision_config.image_size)
    ids, mask = torch.randint(5, 50, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        scores = [m.itm_scores(m.embed_images(pixels)[0], m.embed_texts(ids, mask)[0], mask) for m in (plain, packed)]
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)
    table = format_report(report)
    assert "| itm | tiny [packed] | 2 |" in table and "[packed]: the same model running" in table
    assert "tiny pruned 0.5 [packed] (itm, batch 2, 32px, 1 thread(s)): speed target against tiny [packed]: " in table
    assert "the faster of torch.mm (MKL) and oneDNN's with a packed weight" in table
    data = json.loads(write_json(report, tmp_path / "bench.json").read_text())
    assert format_report(BenchmarkReport.from_dict(data)) == table
    # A report from a machine (or a round) that timed torch.mm alone says so, wherever it is read back.
    data["machine"].pop("onednn_peak")
    assert "(1024 x 1024 torch.mm, best of 10" in format_report(BenchmarkReport.from_dict(data))
    with pytest.raises(ValueError, match="`pack_cpu_weights` packs float32 weights for the CPU"):
        BenchmarkSettings(pack_cpu_weights=True, dtype="bfloat16")


@pytest.mark.parametrize("packed", [False, True])
def test_kernel_rows_follow_their_models_with_the_same_flops(packed: bool) -> None:
    models, _ = benchmark_models(["tiny"], [0.5])
    settings = BenchmarkSettings(
        workloads=("itm",), batch_sizes=(2,), pack_cpu_weights=packed, cpu_attention_kernel=True, **FAST
    )
    report = run_benchmark(models, settings)
    rows = {r.name: r for r in report.results}
    suffix = " [packed]" if packed else ""
    for name in ("tiny", "tiny pruned 0.5"):
        kernel = rows[f"{name}{suffix} [kernel]"]
        assert kernel.base == f"{name}{suffix}" and kernel.gflops == rows[name].gflops  # counted as SDPA's
    assert len(rows) == (6 if packed else 4)
    assert "[kernel]: the same model with its attention on the CPU kernel" in format_report(report)
    built = models[0].with_attention_kernel().build("retrieval")
    assert built.config.vision_config._attn_implementation == "efficientvlm_cpu"
    with pytest.raises(ValueError, match="`cpu_attention_kernel` is a float32 CPU kernel"):
        BenchmarkSettings(cpu_attention_kernel=True, dtype="bfloat16")
