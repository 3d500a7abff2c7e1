"""The benchmark on models with emptied layers: FLOPs, parameters and ratios side by side."""

from __future__ import annotations

import copy

import torch

from modeling_efficientvlm import EfficientVLMForPreTraining
from trainers.benchmark import BenchmarkSettings, format_report, prebuilt_models, run_benchmark
from trainers.evaluation.benchmarking import count_flops, count_parameters


def test_pruned_model_has_fewer_flops_and_the_table_reports_ratios(tiny_config) -> None:
    full = EfficientVLMForPreTraining(tiny_config).eval()
    pruned = copy.deepcopy(full)
    sizes = pruned.structure_sizes()
    # Empty every first layer (those blocks keep only their bias) and halve the rest.
    masks = {
        key: [torch.zeros(n) if i == 0 else (torch.arange(n) % 2).float() for i, n in enumerate(layer)]
        for key, layer in sizes.items()
    }
    pruned.prune(masks)
    settings = BenchmarkSettings(batch_sizes=(2,), text_length=8, warmup=1, repeats=2, rounds=1)
    report = run_benchmark(prebuilt_models({"full": full, "pruned": pruned}), settings)
    reference, smaller = report.results
    assert (reference.name, smaller.name) == ("full", "pruned")
    assert reference.speedup == 1.0 and reference.flops_reduction == 1.0
    assert smaller.parameters == count_parameters(pruned) < count_parameters(full) == reference.parameters
    assert smaller.encoder_parameters == count_parameters(pruned.efficientvlm)
    assert smaller.flops_reduction == reference.gflops / smaller.gflops > 2
    assert smaller.speedup == reference.median_ms / smaller.median_ms
    assert smaller.speed_target in {"pass", "fail"} and reference.speed_target is None
    table = format_report(report)
    assert "| encoders | pruned | 2 |" in table and "speed target" in table


def test_attention_flops_count_on_the_cpu_as_on_a_gpu() -> None:
    """torch's counter knows only the CUDA attention kernels; ours counts the CPU one alike, forward and backward
    (QK^T and attention x V: 2 x 2 x batch x heads x q_len x k_len x head_dim)."""
    batch, heads, q_len, k_len, head_dim = 2, 3, 5, 7, 8
    query = torch.randn(batch, heads, q_len, head_dim, requires_grad=True)
    key, value = torch.randn(batch, heads, k_len, head_dim), torch.randn(batch, heads, k_len, head_dim)
    forward = 4 * batch * heads * q_len * k_len * head_dim
    attention = torch.nn.functional.scaled_dot_product_attention
    assert count_flops(lambda: attention(query, key, value)) == forward

    def train_step() -> None:
        with torch.enable_grad():
            attention(query, key, value).sum().backward()

    assert count_flops(train_step) == forward * 3.5  # backward: 5 matmuls of that size against the forward's 2


def test_inference_forms_count_the_flops_of_the_written_ones(tiny_config, tiny_inputs) -> None:
    """Without autograd the output GEMMs accumulate into the residual (`addmm_`, which torch's counter skips): the
    count is that of the written forms, which autograd runs."""
    model = EfficientVLMForPreTraining(tiny_config).eval()
    names = ("pixel_values", "input_ids", "attention_mask")
    inputs = {key: value for key, value in tiny_inputs.items() if key in names}

    def forward() -> None:
        model.efficientvlm(**inputs)

    def recorded_forward() -> None:
        with torch.enable_grad():
            model.efficientvlm(**inputs)

    assert count_flops(forward) == count_flops(recorded_forward) > 0


def test_the_fastest_matmul_is_found_and_repeated_back_to_back(monkeypatch) -> None:
    import time

    from trainers.evaluation import benchmarking

    calls = {"slow": 0, "fast": 0}

    def product(name: str, seconds: float):
        def run() -> None:
            calls[name] += 1
            time.sleep(seconds)

        return run

    products = {"slow": product("slow", 0.03), "fast": product("fast", 0.01)}
    monkeypatch.setattr(benchmarking, "matmul_products", lambda size, device, dtype: products)
    fastest, flops, seconds = benchmarking.fastest_matmul()
    assert fastest is products["fast"] and flops == 2 * 1024**3 and 0.01 <= seconds < 0.03
    calls.update(slow=0, fast=0)
    benchmarking.back_to_back(fastest, 7)()
    assert calls == {"slow": 0, "fast": 7}


def test_the_peak_products_multiply_alike() -> None:
    from trainers.evaluation.benchmarking import matmul_products

    results = {name: product() for name, product in matmul_products(size=64).items()}
    assert "torch.mm" in results
    for result in results.values():  # oneDNN's packed product computes the same matrix as torch.mm
        torch.testing.assert_close(result, results["torch.mm"], rtol=1e-4, atol=1e-4)
