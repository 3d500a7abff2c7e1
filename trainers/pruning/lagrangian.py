"""The sparsity Lagrangian: one global target sparsity, warmed up, enforced by trained multipliers.

[`SparsityLagrangian`] adds lambda_1 (s - t) + lambda_2 (s - t)^2 for one global target t on the expected
sparsity s of all prunable parameters of a [`StructureMasker`], and optionally one such term per modality.
The target warms up linearly from 0 over `warmup_steps` optimizer steps ([`SparsityLagrangian.target`]);
the paper warms up over one epoch ([`one_epoch_warmup_steps`]). With a sparsity ladder the global target
climbs rung by rung instead: each rung's target warms up from the previous rung's (0 for the first) over the
same `warmup_steps`, starting when [`SparsityLagrangian.advance_rung`] moves it on (see `ladder.py`, which
decides when a rung has settled). The schedule lives only in [`SparsityLagrangian.target`].
The multipliers are maximised: their gradient is reversed in the forward pass, so a plain (descent)
optimizer step on them is gradient ascent, exactly as CoFi's negative learning rate (which
`torch.optim.AdamW` rejects).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .hard_concrete import MODALITIES, StructureMasker


class _ReverseGradient(torch.autograd.Function):
    """Identity forward, negated gradient backward: descending on the output ascends on the input."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


class SparsityLagrangian(nn.Module):
    """lambda_1 (s - t) + lambda_2 (s - t)^2 for the expected sparsity s of a [`StructureMasker`].

    Args:
        target_sparsity: the global target t over all prunable parameters (None: no global constraint).
        warmup_steps: the target grows linearly from 0 to its value over this many optimizer steps.
        target_sparsity_per_modality: optional targets for `vision`, `text`, `fusion` and / or `decoder` (VQA's
            answer decoder, when the masker covers it), each with its own multipliers, on that modality's
            expected sparsity.
        sparsity_ladder: increasing global targets (rungs), instead of `target_sparsity`: the global target is
            the current rung's, warmed up from the previous rung's; [`advance_rung`] moves to the next rung.

    The multipliers start at 0 and are trained by gradient ascent: [`forward`] reverses their gradient, so
    give them to an ordinary optimizer (weight decay 0) and it maximises the term over them while the
    masks minimise it.
    """

    def __init__(
        self,
        target_sparsity: float | None = None,
        warmup_steps: int = 0,
        target_sparsity_per_modality: Mapping[str, float] | None = None,
        sparsity_ladder: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        targets: dict[str, float] = {}
        if sparsity_ladder is not None:
            if target_sparsity is not None:
                raise ValueError("Give `target_sparsity` or `sparsity_ladder`, not both.")
            if not sparsity_ladder:
                raise ValueError("`sparsity_ladder` needs at least one rung.")
            target_sparsity = sparsity_ladder[0]
        if target_sparsity is not None:
            targets["overall"] = target_sparsity
        for modality, value in (target_sparsity_per_modality or {}).items():
            if modality not in MODALITIES:
                raise ValueError(f"Unknown modality {modality!r} in `target_sparsity_per_modality`; use {MODALITIES}.")
            targets[modality] = value
        if not targets:
            raise ValueError("Give a `target_sparsity` and / or `target_sparsity_per_modality`.")
        for name, value in targets.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                what = "target_sparsity" if name == "overall" else f"target_sparsity_per_modality[{name!r}]"
                raise ValueError(f"`{what}` must be a number in [0, 1); got {value!r}.")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0; got {warmup_steps}.")
        self.targets = {name: float(value) for name, value in targets.items()}
        self.warmup_steps = int(warmup_steps)
        self.ladder = tuple(float(value) for value in sparsity_ladder) if sparsity_ladder is not None else None
        # The current rung and the step it started at (its warm-up starts there).
        self.rung = 0
        self.rung_start_step = 0
        # Consecutive steps the current rung's sparsity has been within the ladder's tolerance (`ladder.py`).
        self.steps_in_tolerance = 0
        self.lambda_1 = nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in self.targets})
        self.lambda_2 = nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in self.targets})

    def target(self, step: int, name: str = "overall") -> float:
        """The target of constraint `name` (`overall` or a modality) at optimizer step `step`."""
        if name not in self.targets:
            raise ValueError(f"No constraint {name!r}; this Lagrangian has {list(self.targets)}.")
        if self.ladder is not None and name == "overall":
            start = self.ladder[self.rung - 1] if self.rung > 0 else 0.0
            return start + (self.targets[name] - start) * self._warmup_progress(step - self.rung_start_step)
        return self.targets[name] * self._warmup_progress(step)

    def _warmup_progress(self, steps: int) -> float:
        return 1.0 if self.warmup_steps == 0 else min(1.0, max(0, steps) / self.warmup_steps)

    def warmed_up(self, step: int) -> bool:
        """Whether every target has reached its full value (the current rung's, with a ladder) at `step`."""
        start = self.rung_start_step if self.ladder is not None else 0
        return self._warmup_progress(step - start) >= 1.0

    def advance_rung(self, step: int) -> None:
        """Moves the global target to the next rung of the ladder; its warm-up starts at `step`."""
        if self.ladder is None:
            raise ValueError("This Lagrangian has no `sparsity_ladder` to climb.")
        if self.rung + 1 >= len(self.ladder):
            raise ValueError(f"Already on the last rung ({self.ladder[-1]}) of the sparsity ladder {self.ladder}.")
        self.rung += 1
        self.rung_start_step = int(step)
        self.targets["overall"] = self.ladder[self.rung]

    def forward(self, masker: StructureMasker, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Returns the Lagrangian term and the values to log: expected sparsities, targets, multipliers (0-d
        tensors, detached, so that logging every step does not wait for the device)."""
        logs: dict[str, torch.Tensor | float] = {}
        loss = None
        sparsities = masker.expected_sparsities()  # one pass over every log-alpha
        for name in self.targets:
            suffix = "" if name == "overall" else f"_{name}"
            # A modality the masker does not hold: its own answer (0 with nothing left to prune, else a ValueError).
            sparsity = sparsities[name] if name in sparsities else masker.expected_sparsity(name)
            gap = sparsity - self.target(step, name)
            lambda_1 = _ReverseGradient.apply(self.lambda_1[name])
            lambda_2 = _ReverseGradient.apply(self.lambda_2[name])
            term = lambda_1 * gap + lambda_2 * gap**2
            loss = term if loss is None else loss + term
            logs[f"target_sparsity{suffix}"] = self.target(step, name)
            logs[f"lambda_1{suffix}"] = self.lambda_1[name].detach().clone()
            logs[f"lambda_2{suffix}"] = self.lambda_2[name].detach().clone()
        logs["expected_sparsity"] = sparsities["overall"].detach()
        for modality in masker.modalities:
            logs[f"expected_sparsity_{modality}"] = sparsities[modality].detach()
        logs["loss_lagrangian"] = loss.detach()
        return loss, logs

    def extra_repr(self) -> str:
        ladder = f", ladder={self.ladder}, rung={self.rung}" if self.ladder is not None else ""
        return f"targets={self.targets}, warmup_steps={self.warmup_steps}{ladder}"


def one_epoch_warmup_steps(batches_per_epoch: int | None, gradient_accumulation_steps: int, max_steps: int) -> int:
    """The paper's warm-up of the target: the optimizer steps of one epoch (all `max_steps` when the epoch
    length is unknown), at least 1 and at most `max_steps`."""
    steps = max_steps if batches_per_epoch is None else math.ceil(batches_per_epoch / gradient_accumulation_steps)
    return max(1, min(steps, max_steps))


__all__ = ["SparsityLagrangian", "one_epoch_warmup_steps"]
