"""Hard-concrete (L0) structure masks and exact parameter accounting.

One implementation serves every modality: a [`StructureMasker`] is built from any model exposing
`structure_sizes()` and `structure_unit_parameters()` (every EfficientVLM model; VQA's answer decoder joins as
the `decoder` modality with `include_decoder=True`, as the official VQA pruning does), holds one log-alpha per
head / FFN neuron of every layer, samples stretched hard-concrete masks while training (Louizos et al.,
2018) and gives deterministic masks for evaluation and physical pruning, following CoFi
(princeton-nlp/CoFiPruning `models/l0_module.py`) and the official EfficientVLM `xvlm_l0_module.py`:

- stretch limits (-0.1, 1.1), hard-concrete temperature (beta) 2/3;
- FFN log-alphas start at log(1 - p) - log(p) + N(0, 0.01) with drop rate p = 0.5, head log-alphas at
  10 + N(0, 0.01) (heads start "on");
- after every optimizer step log-alphas are clamped to [log 1e-2, log 1e2] (CoFi's `constrain_parameters`);
- deterministic masks: the `round(units - E[non-zeros])` units with the lowest score
  sigmoid(log_alpha / hard_concrete_temperature * 0.8) are zeroed, the others keep that score (CoFi; the
  value is folded into the weights by `prune`), or 1 with `binary=True` (the official EfficientVLM code).

The sparsity constraint on these masks is [`SparsityLagrangian`] in `lagrangian.py`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import torch
from torch import nn

from modeling_efficientvlm.modeling_efficientvlm import StructureMasks

LIMIT_LEFT, LIMIT_RIGHT = -0.1, 1.1
# beta of the hard-concrete distribution (not a softmax temperature).
HARD_CONCRETE_TEMPERATURE = 2.0 / 3.0
EPSILON = 1e-6
DROPRATE_INIT = 0.5
HEAD_LOG_ALPHA_INIT = 10.0
# Wang et al. (2020) / CoFi: scales log_alpha when ranking units for the deterministic mask.
MAGICAL_NUMBER = 0.8
LOG_ALPHA_RANGE = (math.log(1e-2), math.log(1e2))
MODALITIES = ("vision", "text", "fusion", "decoder")


def modality_of(key: str) -> str:
    """`vision_heads` -> `vision`: the modality of a structure-mask key is its first word."""
    return key.split("_", 1)[0]


class StructureMasker(nn.Module):
    """Learnable hard-concrete masks over the heads and FFN neurons of a model.

    Args:
        structure_sizes: units (heads / neurons) per layer for each key, as `model.structure_sizes()`.
        unit_parameters: parameters carried by one unit per layer for each key, as
            `model.structure_unit_parameters()`.
        droprate_init: initial drop probability of the FFN neurons.
        head_log_alpha_init: initial log-alpha of the attention heads (high: heads start kept).
        hard_concrete_temperature: the temperature (beta) of the hard-concrete distribution.

    Use [`StructureMasker.from_model`] to build one for a model. Calling the masker returns a sampled
    [`StructureMasks`] dict in training mode (`masker.train()`) and the deterministic one in eval mode.
    """

    def __init__(
        self,
        structure_sizes: Mapping[str, list[int]],
        unit_parameters: Mapping[str, list[int]],
        droprate_init: float = DROPRATE_INIT,
        head_log_alpha_init: float = HEAD_LOG_ALPHA_INIT,
        hard_concrete_temperature: float = HARD_CONCRETE_TEMPERATURE,
    ) -> None:
        super().__init__()
        if set(structure_sizes) != set(unit_parameters):
            raise ValueError(
                f"`structure_sizes` keys {sorted(structure_sizes)} differ from `unit_parameters` keys "
                f"{sorted(unit_parameters)}."
            )
        if not 0.0 < droprate_init < 1.0:
            raise ValueError(f"`droprate_init` must be in (0, 1); got {droprate_init}.")
        if hard_concrete_temperature <= 0:
            raise ValueError(f"`hard_concrete_temperature` must be positive; got {hard_concrete_temperature}.")
        self.structure_sizes = {key: [int(n) for n in sizes] for key, sizes in structure_sizes.items()}
        self.unit_parameters = {key: [int(n) for n in unit_parameters[key]] for key in structure_sizes}
        for key, sizes in self.structure_sizes.items():
            if len(sizes) != len(self.unit_parameters[key]):
                raise ValueError(
                    f"`{key}` has {len(sizes)} layer sizes but {len(self.unit_parameters[key])} unit parameter counts."
                )
            if any(n < 0 for n in sizes) or any(n <= 0 for n in self.unit_parameters[key]):
                raise ValueError(f"`{key}` has a negative size or a non-positive parameter count per unit.")
        self.hard_concrete_temperature = hard_concrete_temperature
        self.droprate_init = droprate_init
        self.head_log_alpha_init = head_log_alpha_init
        # log_alpha[key][str(layer)]: one parameter per layer that still has units.
        self.log_alpha = nn.ModuleDict()
        for key, sizes in self.structure_sizes.items():
            per_layer = nn.ParameterDict()
            for layer, units in enumerate(sizes):
                if units > 0:
                    per_layer[str(layer)] = nn.Parameter(torch.empty(units))
            self.log_alpha[key] = per_layer
        # Every layer's log-alphas are concatenated (in `layers()` order) for sampling and accounting, so a step
        # costs a handful of kernels however many layers there are (one set per layer made a mask-learning step
        # on a GPU 1.2-1.4x a distillation step). Per unit: its parameter count and its modality's index.
        layers = self.layers()
        self._layer_units = [log_alpha.numel() for _, _, log_alpha in layers]
        self._modality_names = self.modalities  # those with units: the modalities of `layers`, in the same order
        unit_parameters_flat = [self.unit_parameters[key][layer] for key, layer, p in layers for _ in range(p.numel())]
        unit_modality = [self._modality_names.index(modality_of(key)) for key, _, p in layers for _ in range(p.numel())]
        self.register_buffer(
            "_unit_parameters", torch.tensor(unit_parameters_flat, dtype=torch.float32), persistent=False
        )
        self.register_buffer("_unit_modality", torch.tensor(unit_modality, dtype=torch.long), persistent=False)
        self.register_buffer(
            "_layer_of_unit",
            torch.repeat_interleave(torch.arange(len(layers)), torch.tensor(self._layer_units, dtype=torch.long)),
            persistent=False,
        )
        self.reset_parameters()

    @classmethod
    def from_model(cls, model: nn.Module, include_decoder: bool = False, **kwargs) -> StructureMasker:
        """A masker over every prunable structure of `model` (see [`StructureMasker`] for `kwargs`); with
        `include_decoder`, also over the answer decoder of a VQA model (the `decoder` modality)."""
        return cls(*model_structures(model, include_decoder), **kwargs)

    @property
    def includes_decoder(self) -> bool:
        """Whether the masks cover a decoder (`decoder_*` keys)."""
        return any(modality_of(key) == "decoder" for key in self.structure_sizes)

    def reset_parameters(self) -> None:
        """CoFi's initialisation: FFN log-alphas from the drop rate, heads high; both with N(0, 0.01) noise."""
        ffn_mean = math.log(1 - self.droprate_init) - math.log(self.droprate_init)
        with torch.no_grad():
            for key, per_layer in self.log_alpha.items():
                mean = self.head_log_alpha_init if key.endswith("heads") else ffn_mean
                for log_alpha in per_layer.values():
                    log_alpha.normal_(mean, 1e-2)

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def layers(self) -> list[tuple[str, int, nn.Parameter]]:
        """(key, layer, log_alpha) for every masked layer."""
        return [(key, int(layer), p) for key, per_layer in self.log_alpha.items() for layer, p in per_layer.items()]

    @property
    def modalities(self) -> list[str]:
        """Modalities that have prunable units, in key order."""
        seen: list[str] = []
        for key, sizes in self.structure_sizes.items():
            if sum(sizes) and modality_of(key) not in seen:
                seen.append(modality_of(key))
        return seen

    def _keys(self, modality: str | None) -> list[str]:
        if modality is None:
            return list(self.structure_sizes)
        keys = [key for key in self.structure_sizes if modality_of(key) == modality]
        if not keys:
            known = sorted({modality_of(key) for key in self.structure_sizes})
            raise ValueError(f"Unknown modality {modality!r}; this masker has {known}.")
        return keys

    def total_parameters(self, modality: str | None = None) -> int:
        """Prunable parameters of the unpruned model (all of them, or one modality's)."""
        return sum(
            units * per_unit
            for key in self._keys(modality)
            for units, per_unit in zip(self.structure_sizes[key], self.unit_parameters[key])
        )

    def check_fits(self, model: nn.Module) -> None:
        """Raises a ValueError unless `model` has exactly the structures this masker was built for."""
        sizes, unit_parameters = model_structures(model, self.includes_decoder)
        if sizes != self.structure_sizes:
            raise ValueError(
                f"The masks do not fit the model: the masker was built for structure sizes {self.structure_sizes} "
                f"but the model has {sizes}."
            )
        if unit_parameters != self.unit_parameters:
            raise ValueError(
                f"The masks do not fit the model: parameters per unit {self.unit_parameters} (masker) vs "
                f"{unit_parameters} (model)."
            )

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Loads log-alphas, with a ValueError naming the problem when the state does not fit this masker."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"The mask state does not fit this model's structures: missing {missing}, unexpected {unexpected}."
            )
        for name, tensor in own.items():
            if tuple(state_dict[name].shape) != tuple(tensor.shape):
                raise ValueError(
                    f"The mask state does not fit this model's structures: `{name}` has shape "
                    f"{tuple(state_dict[name].shape)}, the model has {tuple(tensor.shape)} units there."
                )
            if not torch.isfinite(state_dict[name]).all():
                raise ValueError(f"The mask state has NaN or inf log-alphas in `{name}`; nothing was loaded.")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def constrain_(self) -> None:
        """Clamps every log-alpha into [log 1e-2, log 1e2], as CoFi does after each optimizer step."""
        log_alphas = [log_alpha for _, _, log_alpha in self.layers()]
        if log_alphas:
            torch._foreach_clamp_min_(log_alphas, LOG_ALPHA_RANGE[0])
            torch._foreach_clamp_max_(log_alphas, LOG_ALPHA_RANGE[1])

    # -- the hard-concrete distribution ---------------------------------------------------------------------
    def probability_of_zero(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """Q(z = 0 | log_alpha): the CDF at 0 of the stretched concrete (CoFi's `cdf_qz(0, ...)`)."""
        x = (0.0 - LIMIT_LEFT) / (LIMIT_RIGHT - LIMIT_LEFT)
        logit = math.log(x) - math.log(1 - x)
        return torch.sigmoid(logit * self.hard_concrete_temperature - log_alpha).clamp(EPSILON, 1 - EPSILON)

    def sample_mask(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """A differentiable hard-concrete sample in [0, 1], one per unit."""
        u = torch.rand_like(log_alpha).clamp(EPSILON, 1 - EPSILON)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / self.hard_concrete_temperature)
        return (s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0)

    @torch.no_grad()
    def deterministic_mask(
        self, log_alpha: torch.Tensor, binary: bool = False, offset: float = 0.0, num_zeros: int | None = None
    ) -> torch.Tensor:
        """Zeroes the round(units - E[non-zeros]) lowest-scoring units; survivors keep their score
        sigmoid(log_alpha / hard_concrete_temperature * 0.8) (CoFi), or 1 with `binary`. `offset` shifts the
        log-alphas when counting the zeros only (see [`offset_for_sparsity`]): which units go and what the survivors
        keep still follow the learned log-alphas. `num_zeros`: that count, when already known."""
        if num_zeros is None:
            num_zeros = round(self.probability_of_zero(log_alpha + offset).double().sum().item())
        mask = torch.sigmoid(log_alpha / self.hard_concrete_temperature * MAGICAL_NUMBER)
        if binary:
            mask = torch.ones_like(mask)
        if num_zeros > 0:
            # Ranked by log_alpha: the same order as the score, without ties where the sigmoid saturates.
            mask[torch.topk(log_alpha, k=num_zeros, largest=False).indices] = 0.0
        return mask

    def check_finite(self) -> None:
        """Raises a ValueError naming the mask key, its modality and the layer of the first log-alpha that is NaN or
        inf (a diverged run: NaN gradients reached the masks). One device sync for all log-alphas."""
        layers = self.layers()
        if not layers:
            return
        if torch.isfinite(torch.cat([log_alpha.detach().reshape(-1) for _, _, log_alpha in layers]).sum()):
            return  # a sum carries any NaN / inf; the layers are then checked one by one
        for key, layer, log_alpha in layers:
            bad = (~torch.isfinite(log_alpha.detach())).nonzero().flatten()
            if len(bad):
                raise ValueError(
                    f"The log-alphas of `{key}` ({modality_of(key)} modality) layer {layer} have {len(bad)} NaN or inf "
                    f"value(s) (units {bad[:8].tolist()}): the mask training diverged (NaN gradients or loss); lower "
                    "the masks' or the Lagrangian's learning rate, or resume from an earlier checkpoint."
                )

    def flat_log_alpha(self) -> torch.Tensor:
        """Every layer's log-alphas in one (units,) tensor, in [`layers`] order (differentiable)."""
        layers = self.layers()
        if not layers:
            return self._unit_parameters.new_zeros(0)
        return torch.cat([log_alpha.reshape(-1) for _, _, log_alpha in layers])

    def _zero_counts(self, probability_of_zero: torch.Tensor) -> list[int]:
        """round(units - E[non-zeros]) = round(sum of P(z = 0)) per layer, from every unit's P(z = 0) in [`layers`]
        order, in one device sync."""
        zeros = probability_of_zero.new_zeros(len(self._layer_units), dtype=torch.float64)
        zeros.index_add_(0, self._layer_of_unit, probability_of_zero.double())
        return [round(value) for value in zeros.tolist()]

    def _as_structure_masks(self, flat_masks: torch.Tensor | list[torch.Tensor]) -> StructureMasks:
        per_layer = flat_masks.split(self._layer_units) if isinstance(flat_masks, torch.Tensor) else flat_masks
        masks: StructureMasks = {key: [None] * len(sizes) for key, sizes in self.structure_sizes.items()}
        for (key, layer, _), mask in zip(self.layers(), per_layer):
            masks[key][layer] = mask
        return masks

    def sample(self) -> StructureMasks:
        """Sampled masks (differentiable w.r.t. the log-alphas), one draw per unit shared by the batch: all layers
        are drawn in one go."""
        self.check_finite()
        return self._as_structure_masks(self.sample_mask(self.flat_log_alpha()))

    @torch.no_grad()
    def deterministic_masks(self, binary: bool = False, offset: float = 0.0) -> StructureMasks:
        """The masks to evaluate with and to prune with (`model.prune(masker.deterministic_masks())`); `offset`: see
        [`offset_for_sparsity`]."""
        self.check_finite()
        if not self._layer_units:
            return self._as_structure_masks([])
        log_alpha = self.flat_log_alpha()
        # 1 - E[non-zeros] = sum of P(z = 0): every layer's count of zeros in one pass and one sync.
        counts = self._zero_counts(self.probability_of_zero(log_alpha + offset))
        return self._as_structure_masks(
            [
                self.deterministic_mask(layer_log_alpha, binary, num_zeros=n)
                for layer_log_alpha, n in zip(log_alpha.split(self._layer_units), counts)
            ]
        )

    @torch.no_grad()
    def offset_for_sparsity(self, target: float, steps: int = 40) -> float:
        """The one shift of every log-alpha (of all modalities alike) that brings the sparsity of the deterministic
        masks closest to `target`, by bisection (the sparsity falls as the shift grows). Shifting them all alike
        keeps the learned ranking of units within and across modalities and layers: only how many go changes."""
        if not 0.0 <= target < 1.0:
            raise ValueError(f"The target sparsity must be in [0, 1); got {target}.")

        def sparsity(offset: float) -> float:
            return self.sparsity_of(self.deterministic_masks(offset=offset))

        # At -30 / +30 every unit's P(z = 0) is ~1 / ~0 (log-alphas are clamped to +-4.6).
        prune_more, prune_less = -30.0, 30.0
        for _ in range(steps):
            middle = (prune_more + prune_less) / 2
            if sparsity(middle) > target:
                prune_more = middle
            else:
                prune_less = middle
        return min((prune_less, prune_more), key=lambda offset: abs(sparsity(offset) - target))

    def forward(self) -> StructureMasks:
        return self.sample() if self.training else self.deterministic_masks()

    # -- exact accounting ---------------------------------------------------------------------------------
    def _expected_kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E[kept prunable parameters] = sum of unit parameters x P(z != 0), overall () and per modality of
        `_modality_names`, differentiable, from one pass over the log-alphas."""
        kept = (1 - self.probability_of_zero(self.flat_log_alpha())) * self._unit_parameters
        return kept.sum(), kept.new_zeros(len(self._modality_names)).index_add(0, self._unit_modality, kept)

    def expected_remaining_parameters(self, modality: str | None = None) -> torch.Tensor:
        """Differentiable E[kept prunable parameters] = sum of unit parameters x P(z != 0) over units."""
        self._keys(modality)  # a ValueError for an unknown modality
        overall, by_modality = self._expected_kept()
        if modality is None:
            return overall
        if modality not in self._modality_names:  # nothing left to prune in this modality
            return overall.new_zeros(())
        return by_modality[self._modality_names.index(modality)]

    @staticmethod
    def _sparsity(expected_kept: torch.Tensor, total: int) -> torch.Tensor:
        return expected_kept * 0 if total == 0 else 1 - expected_kept / total

    def expected_sparsity(self, modality: str | None = None) -> torch.Tensor:
        """1 - E[kept] / prunable parameters of the full model (or of one modality)."""
        return self._sparsity(self.expected_remaining_parameters(modality), self.total_parameters(modality))

    def expected_sparsities(self) -> dict[str, torch.Tensor]:
        """[`expected_sparsity`] overall (`"overall"`) and of every modality in [`modalities`], differentiable, from
        one pass over the log-alphas."""
        overall, by_modality = self._expected_kept()
        sparsities = {"overall": self._sparsity(overall, self.total_parameters())}
        for index, modality in enumerate(self._modality_names):
            sparsities[modality] = self._sparsity(by_modality[index], self.total_parameters(modality))
        return sparsities

    def _check_masks(self, masks: Mapping[str, list[torch.Tensor | None] | None]) -> None:
        unknown = sorted(set(masks) - set(self.structure_sizes))
        if unknown:
            raise ValueError(f"Unknown structure-mask keys {unknown}; expected some of {list(self.structure_sizes)}.")
        for key, layer_masks in masks.items():
            if layer_masks is None:
                continue
            sizes = self.structure_sizes[key]
            if len(layer_masks) != len(sizes):
                raise ValueError(f"`{key}` has {len(layer_masks)} masks but the model has {len(sizes)} such layers.")
            for layer, (mask, units) in enumerate(zip(layer_masks, sizes)):
                if mask is not None and tuple(mask.shape) != (units,):
                    raise ValueError(
                        f"The mask for `{key}` layer {layer} has shape {tuple(mask.shape)}; expected ({units},)."
                    )

    def remaining_parameters(self, masks: StructureMasks, modality: str | None = None) -> int:
        """Prunable parameters a model keeps after `prune(masks)`; a missing mask keeps its layer whole."""
        keys = self._keys(modality)
        kept = self.kept_structures(masks)
        return sum(units * per_unit for key in keys for units, per_unit in zip(kept[key], self.unit_parameters[key]))

    def sparsity_of(self, masks: StructureMasks, modality: str | None = None) -> float:
        """Fraction of the prunable parameters (all, or one modality's) that `prune(masks)` removes."""
        total = self.total_parameters(modality)
        return 0.0 if total == 0 else (total - self.remaining_parameters(masks, modality)) / total

    def kept_structures(self, masks: StructureMasks) -> dict[str, list[int]]:
        """Units kept per layer for each key after `prune(masks)` (a missing mask keeps its layer whole); every
        layer's non-zeros are counted with one device sync."""
        self._check_masks(masks)
        kept = {key: list(sizes) for key, sizes in self.structure_sizes.items()}
        given = [
            (key, layer, mask)
            for key, layer_masks in masks.items()
            for layer, mask in enumerate(layer_masks or [])
            if mask is not None
        ]
        if given:
            device = given[0][2].device
            counts = torch.stack([torch.count_nonzero(mask).to(device) for _, _, mask in given]).tolist()
            for (key, layer, _), count in zip(given, counts):
                kept[key][layer] = int(count)
        return kept

    def extra_repr(self) -> str:
        units = sum(sum(sizes) for sizes in self.structure_sizes.values())
        return (
            f"units={units}, prunable_parameters={self.total_parameters()}, "
            f"hard_concrete_temperature={self.hard_concrete_temperature:.4g}"
        )


def model_structures(model: nn.Module, include_decoder: bool = False) -> tuple[dict, dict]:
    """`(model.structure_sizes(), model.structure_unit_parameters())`, the decoder's included on request; a model
    that cannot be pruned with masks (or has no decoder to include) raises a ValueError naming it."""
    for name in ("structure_sizes", "structure_unit_parameters"):
        if not callable(getattr(model, name, None)):
            raise ValueError(f"{type(model).__name__} has no `{name}()`; it cannot be pruned with masks.")
    if not include_decoder:
        return model.structure_sizes(), model.structure_unit_parameters()
    if "include_decoder" not in inspect.signature(model.structure_sizes).parameters:  # a bare encoder
        raise ValueError(f"{type(model).__name__} has no decoder to prune.")
    return model.structure_sizes(include_decoder=True), model.structure_unit_parameters(include_decoder=True)


def random_structure_masks(
    model: nn.Module, target_sparsity: float, generator: torch.Generator | None = None
) -> StructureMasks:
    """Random 0/1 masks removing the smallest set of randomly ordered units whose parameters reach
    `target_sparsity` of the prunable parameters (for benchmarks and tests)."""
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"`target_sparsity` must be in [0, 1); got {target_sparsity}.")
    sizes, unit_parameters = model.structure_sizes(), model.structure_unit_parameters()
    units = [
        (key, layer, index)
        for key, per_layer in sizes.items()
        for layer, n in enumerate(per_layer)
        for index in range(n)
    ]
    total = sum(unit_parameters[key][layer] for key, layer, _ in units)
    masks: StructureMasks = {key: [torch.ones(n) if n else None for n in per_layer] for key, per_layer in sizes.items()}
    removed = 0
    for position in torch.randperm(len(units), generator=generator).tolist():
        if removed >= target_sparsity * total:
            break
        key, layer, index = units[position]
        masks[key][layer][index] = 0.0
        removed += unit_parameters[key][layer]
    return masks


__all__ = [
    "HARD_CONCRETE_TEMPERATURE",
    "LIMIT_LEFT",
    "LIMIT_RIGHT",
    "LOG_ALPHA_RANGE",
    "MODALITIES",
    "StructureMasker",
    "StructureMasks",
    "modality_of",
    "model_structures",
    "random_structure_masks",
]
