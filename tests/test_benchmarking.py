"""Benchmark helpers: parameters, FLOPs and latency side by side, including models with emptied layers."""

from __future__ import annotations

import copy

import torch

from modeling_efficientvlm import EfficientVLMForPreTraining
from trainers.evaluation.benchmarking import (
    benchmark_inputs,
    compare_models,
    count_flops,
    count_parameters,
    format_table,
)


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
    inputs = benchmark_inputs(tiny_config, batch_size=2, text_length=8)
    assert count_flops(pruned.efficientvlm, inputs) < count_flops(full.efficientvlm, inputs) / 2
    rows = compare_models({"full": full, "pruned": pruned}, inputs, warmup=1, repeats=2, rounds=1)
    assert rows[0].speedup == 1.0 and rows[0].flops_reduction == 1.0
    assert rows[1].parameters == count_parameters(pruned) < count_parameters(full)
    assert rows[1].flops_reduction > 2
    table = format_table(rows)
    assert "| pruned |" in table and "speedup / FLOPs reduction" in table
