"""EfficientVLM / X-VLM encoders and the pre-training model.

Vision: a CLIP ViT (pre-LN). Text: a BERT stack whose first `num_hidden_layers` layers encode the text
and whose last `num_fusion_layers` layers also cross-attend to the image (post-LN). Every layer takes
its own head count and FFN width from the config, so a physically pruned checkpoint rebuilds exactly,
and every encoder accepts structure masks (per-head, per-FFN-neuron) for pruning with L0 masks.
"""

from __future__ import annotations

import copy
import os
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .checks_efficientvlm import check_tensor
from .configuration_efficientvlm import EfficientVLMConfig, EfficientVLMTextConfig, EfficientVLMVisionConfig
from .cpu_attention_efficientvlm import register as register_cpu_attention
from .grouping_efficientvlm import EncoderGroups
from .loading_efficientvlm import (
    OrdinaryFileModes,
    check_loaded_weights,
    corrupt_checkpoint_error,
    mask_learning_checkpoint_message,
    unreadable_weight_files,
)
from .loss_efficientvlm import (
    ImageTextContrastiveLoss,
    box_regression_loss,
    identical_texts,
    itm_negative_labels,
    masked_language_modeling_loss,
    sample_hard_negatives,
)
from .packing_efficientvlm import (
    FUSED_ACTIVATIONS,
    MIN_PACKED_FLOPS,
    NO_ACTIVATION,
    CPUWeightPacks,
    PacksCPUWeights,
    TensorStamp,
    cpu_packing_available,
    fuses_activations,
    inference_tensor_error,
    onednn_linear,
    onednn_products,
    packed_linear,
    packed_stack,
    packed_weight,
    runs_packed,
)

register_cpu_attention()  # attn_implementation="efficientvlm_cpu": built on first use

# Keys of a structure-mask dict: one list per key with one tensor per layer, shaped (heads,) or (neurons,).
# `text_*` index the text layers, `fusion_*` the fusion layers of the BERT stack, `decoder_*` the layers of a
# separate decoder (VQA's answer decoder). Each model takes the keys of the stacks it has: the vision model
# `VISION_MASK_KEYS`, the text model `TEXT_MASK_KEYS`, the others both (`MASK_KEYS`), and a model with an
# answer decoder also `DECODER_MASK_KEYS` (when asked for: `structure_sizes(include_decoder=True)`).
VISION_MASK_KEYS = ("vision_heads", "vision_ffn")
TEXT_MASK_KEYS = ("text_heads", "text_ffn", "fusion_heads", "fusion_cross_heads", "fusion_ffn")
MASK_KEYS = VISION_MASK_KEYS + TEXT_MASK_KEYS
DECODER_MASK_KEYS = ("decoder_heads", "decoder_cross_heads", "decoder_ffn")
StructureMasks = dict[str, list[torch.Tensor | None]]
# A decoder is a BERT stack of fusion layers only (self-attention, cross-attention, FFN): its stack's
# `fusion_*` structures are the model's `decoder_*` ones.
_DECODER_STACK_KEYS = dict(zip(DECODER_MASK_KEYS, ("fusion_heads", "fusion_cross_heads", "fusion_ffn")))


def decoder_stack_masks(structure_masks: StructureMasks | None) -> StructureMasks:
    """The `decoder_*` entries of a structure-mask dict as the decoder stack's own (`fusion_*`) keys."""
    masks = structure_masks or {}
    return {stack_key: masks[key] for key, stack_key in _DECODER_STACK_KEYS.items() if key in masks}


def decoder_structures(stack_structures: dict[str, list[int]]) -> dict[str, list[int]]:
    """A decoder stack's `structure_sizes()` / `structure_unit_parameters()` under the model's `decoder_*` keys."""
    return {key: list(stack_structures[stack_key]) for key, stack_key in _DECODER_STACK_KEYS.items()}


# Pruning is two-phase so that it is atomic: every pruned module is built first, as (parent, attribute, new
# module), then all are swapped in at once; an error while building leaves the model untouched.
PrunePlan = list[tuple[nn.Module, str, nn.Module]]


def commit_prune_plan(plan: PrunePlan) -> None:
    for parent, name, module in plan:
        setattr(parent, name, module)


def _check_mask_keys(structure_masks: StructureMasks | None) -> None:
    known = MASK_KEYS + DECODER_MASK_KEYS
    unknown = sorted(set(structure_masks or {}) - set(known))
    if unknown:
        raise ValueError(f"Unknown structure-mask keys {unknown}; expected some of {list(known)}.")


def check_finite_masks(structure_masks: StructureMasks | None, keys: tuple[str, ...]) -> None:
    """Raises a ValueError naming the key and layer of the first mask (among `keys`) holding NaN or inf: such a
    mask would silently turn every output into NaN. One device sync for all masks; skipped while compiling."""
    if not structure_masks or torch.compiler.is_compiling():
        return
    masks = [
        (key, layer, mask)
        for key in keys
        for layer, mask in enumerate(structure_masks.get(key) or [])
        if isinstance(mask, torch.Tensor) and mask.is_floating_point()
    ]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, _, mask in masks:
        by_device.setdefault(mask.device, []).append(mask.detach().reshape(-1))
    if all(torch.isfinite(torch.cat(group).sum(dtype=torch.float32)) for group in by_device.values()):
        return  # a sum carries any NaN / inf; the layers are located below (a finite overflow raises nothing)
    for key, layer, mask in masks:
        bad = (~torch.isfinite(mask.detach().reshape(-1))).nonzero().flatten()
        if len(bad):
            raise ValueError(
                f"The mask for `{key}` layer {layer} has {len(bad)} NaN or inf value(s) (units {bad[:8].tolist()}); "
                "masks must be finite."
            )


def check_prunable_masks(structure_masks: StructureMasks, sizes: dict[str, list[int]], model_name: str) -> None:
    """Every key of `structure_masks` names a stack of the model (`sizes`), has one mask per layer, and each mask
    is a finite 1-D tensor with one value per unit of its layer. `prune` calls this before changing anything,
    so a bad mask leaves the model as it was."""
    _check_mask_keys(structure_masks)
    for key, masks in structure_masks.items():
        if key not in sizes:
            raise ValueError(f"{model_name} has no layers for the structure-mask key {key!r}; it takes {list(sizes)}.")
        if masks is None:
            continue
        if len(masks) != len(sizes[key]):
            raise ValueError(f"`{key}` has {len(masks)} masks but the model has {len(sizes[key])} such layers.")
        for layer, (mask, units) in enumerate(zip(masks, sizes[key])):
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"The mask for `{key}` layer {layer} is a {type(mask).__name__}, not a tensor.")
            if tuple(mask.shape) != (units,):
                raise ValueError(
                    f"The mask for `{key}` layer {layer} has shape {tuple(mask.shape)}; expected ({units},) "
                    f"({units} units in that layer of {model_name})."
                )
    check_finite_masks(structure_masks, tuple(structure_masks))


# --------------------------------------------------------------------------------------------------------------
# Attention, MLP and their empty stand-ins
# --------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k/v: (batch, heads, seq, head_dim). Returns the context (batch, seq, heads, head_dim) and the
    attention probabilities (batch, heads, q_len, k_len)."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _keep_rows(linear: nn.Linear, index: torch.Tensor, size: int | None = None) -> nn.Linear:
    """The output rows `index` of `linear`, followed by zero rows (weight and bias) up to `size` outputs."""
    size = len(index) if size is None else size
    new = nn.Linear(linear.in_features, size, bias=linear.bias is not None)
    new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: len(index)].copy_(linear.weight[index])
        if linear.bias is not None:
            new.bias.zero_()
            new.bias[: len(index)].copy_(linear.bias[index])
    return new


def _keep_columns(linear: nn.Linear, index: torch.Tensor, scale: torch.Tensor, size: int | None = None) -> nn.Linear:
    """The input columns `index` of `linear` times `scale`, followed by zero columns up to `size` inputs."""
    size = len(index) if size is None else size
    new = nn.Linear(size, linear.out_features, bias=linear.bias is not None)
    new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : len(index)].copy_(linear.weight[:, index] * scale.to(linear.weight.dtype))
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


def check_pad_multiple(pad_to_multiple_of: int) -> None:
    """Raises a ValueError unless `pad_to_multiple_of` is an integer >= 1."""
    if isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
        raise ValueError(f"`pad_to_multiple_of` must be an integer >= 1; got {pad_to_multiple_of!r}.")


def padded_width(kept: int, width: int, pad_to_multiple_of: int) -> int:
    """The FFN width built for `kept` surviving neurons of a layer of `width`: `kept` rounded up to a multiple of
    `pad_to_multiple_of` (GEMMs whose inner or output size is not a multiple of 8 fall off the CPU BLAS fast path),
    never above `width` (a padded layer is no wider than the unpruned one), and 0 stays 0 (an emptied FFN is
    removed, not padded)."""
    check_pad_multiple(pad_to_multiple_of)
    if kept == 0:
        return 0
    return max(kept, min(-(-kept // pad_to_multiple_of) * pad_to_multiple_of, width))


def _kept(mask: torch.Tensor, expected: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the non-zero entries of a 1-D mask and their values."""
    mask = mask.detach()
    if mask.dim() != 1 or mask.numel() != expected:
        raise ValueError(f"The mask for {what} has shape {tuple(mask.shape)}; expected ({expected},).")
    index = torch.nonzero(mask, as_tuple=False).flatten()
    return index, mask[index]


def keeps_written_form(module: nn.Module, *inputs: torch.Tensor | None) -> bool:
    """Whether a forward must keep its written form: autograd records it (grad mode on and an input or a parameter
    requires grad), it is being traced / compiled (a Python loop over the rows would bake the traced size in), or
    autocast is on for the inputs' device (it casts the written form's ops; the in-place GEMMs would mix dtypes)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return True
    first = next((tensor for tensor in inputs if tensor is not None), None)
    if first is not None and torch.is_autocast_enabled(first.device.type):
        return True
    if not torch.is_grad_enabled():
        return False
    return any(tensor is not None and tensor.requires_grad for tensor in inputs) or any(
        parameter.requires_grad for parameter in module.parameters()
    )


# quick_gelu(x) = x * sigmoid(QUICK_GELU_SCALE * x) (CLIP's approximation of GELU).
QUICK_GELU_SCALE = 1.702


def plain_linears(*linears: nn.Module) -> bool:
    """Whether each is a plain, hook-free `nn.Linear` with a bias, so that a fused inference form may compute it
    from its weight and bias (a quantized, adapter-wrapped or hooked layer must run as itself)."""
    for linear in linears:  # a plain loop: this runs in every inference call of every block
        if type(linear) is not nn.Linear or linear.bias is None or linear._forward_hooks or linear._forward_pre_hooks:
            return False
    return True


def _times_weight(states: torch.Tensor, linear: nn.Linear, onednn: bool = False) -> torch.Tensor:
    """`states @ linear.weight.T` without the bias: (..., in) -> (..., out); on oneDNN with `onednn`."""
    if onednn:
        return onednn_linear(states, linear.weight)
    flat = torch.mm(states.reshape(-1, states.shape[-1]), linear.weight.t())
    return flat.view(*states.shape[:-1], flat.shape[-1])


def attention_head_parameters(head_dim: int, hidden_size: int, kv_hidden_size: int) -> int:
    """Parameters of one head: its rows of Q (from `hidden_size`), K and V (from `kv_hidden_size`) with
    biases, and its columns of the output projection."""
    return head_dim * (hidden_size + 1) + 2 * head_dim * (kv_hidden_size + 1) + head_dim * hidden_size


def ffn_neuron_parameters(hidden_size: int) -> int:
    """Parameters of one FFN neuron: its row of `fc1` with bias and its column of `fc2`."""
    return 2 * hidden_size + 1


class EfficientVLMAttention(PacksCPUWeights):
    """Multi-head attention with any number of heads of a fixed width.

    Self-attention when `encoder_hidden_states` is None, cross-attention otherwise (keys and values are
    read from states of width `kv_hidden_size`).
    """

    def __init__(
        self,
        config: EfficientVLMVisionConfig | EfficientVLMTextConfig,
        num_heads: int,
        kv_hidden_size: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.is_causal = False  # causal decoding passes its own additive mask
        inner = num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner)
        self.k_proj = nn.Linear(kv_hidden_size, inner)
        self.v_proj = nn.Linear(kv_hidden_size, inner)
        self.out_proj = nn.Linear(inner, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        encoder_groups: EncoderGroups | None = None,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states: (batch, q_len, hidden); attention_mask: additive, (batch, 1, q_len | 1, k_len);
        head_mask: (heads,) or (batch, heads), multiplied into each head's context; encoder_groups: the row of
        `encoder_hidden_states` each row of `hidden_states` attends to (then `encoder_hidden_states` and
        `attention_mask` may hold fewer rows: each one's keys and values are computed once, however many rows
        share it); residual: (batch, q_len, hidden), added to the output. Returns the output (batch, q_len, hidden)
        and, with `output_attentions`, (batch, heads, q_len, k_len)."""
        kv_states = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q_len = hidden_states.shape[1]
        fused = head_mask is None and not output_attentions and self._fuses(hidden_states, kv_states, residual)
        # Packed self-attention: one product where there were three (each big product evicts what the next op needs
        # from the caches), the value bias inside it: the keys and values have as many rows as the context here.
        # Whether a block packs is decided by its largest product (a narrow layer's three products stacked, or
        # cross-attention's keys and values over the image).
        self_attention = encoder_hidden_states is None and encoder_groups is None
        packed = fused and self._largest_product(runs_packed, hidden_states, kv_states, self_attention)
        packed_qkv = packed and self_attention
        # Unpacked, the inference form's products run on oneDNN where MKL is slow (`cpu_products_library`).
        onednn = (
            fused and not packed and self._largest_product(onednn_products, hidden_states, kv_states, self_attention)
        )
        grouped = encoder_groups is not None and encoder_groups.blocked and not output_attentions
        if packed_qkv:
            qkv = packed_stack(self, "qkv", ("q_proj", "k_proj", "v_proj"), bias_scales=(1.0, None, 1.0))
            # (batch, q_len, 3 x heads x head_dim) -> three (batch, heads, q_len, head_dim) views, in three ops
            qkv = packed_linear(hidden_states, qkv).view(*hidden_states.shape[:2], 3, -1, self.head_dim)
            query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            if packed:
                query = packed_linear(hidden_states, packed_weight(self, "q_proj"))
                kv = packed_stack(self, "kv", ("k_proj", "v_proj"), bias_scales=(None, None))
                key, value = packed_linear(kv_states, kv).chunk(2, dim=-1)
            elif fused:
                # Softmax is blind to the key bias (it adds q . b_k to all of a query's scores) and its rows sum to
                # 1, so the value bias adds b_v to every context row: added there, in place, instead of broadcast
                # into every key and value row (the keys' and values' GEMMs then start from nothing).
                if onednn:
                    query = onednn_linear(hidden_states, self.q_proj.weight, self.q_proj.bias)
                else:
                    query = self.q_proj(hidden_states)
                key = _times_weight(kv_states, self.k_proj, onednn)
                value = _times_weight(kv_states, self.v_proj, onednn)
            else:
                query = self.q_proj(hidden_states)
                key, value = self.k_proj(kv_states), self.v_proj(kv_states)
            if encoder_groups is not None:
                if grouped:  # the queries of texts sharing an image attend together to its keys and values
                    query = encoder_groups.to_blocks(query)
                # Keys, values and their mask: one per block, or (weights per text, training, compiling) per text.
                rows_for = encoder_groups.rows_of_blocks if grouped else encoder_groups.rows_of_texts
                key, value, attention_mask = rows_for(key), rows_for(value), rows_for(attention_mask)
            query = query.view(*query.shape[:2], -1, self.head_dim).transpose(1, 2)
            key = key.view(*key.shape[:2], -1, self.head_dim).transpose(1, 2)
            value = value.view(*value.shape[:2], -1, self.head_dim).transpose(1, 2)

        attention_interface: Callable = eager_attention_forward
        if not output_attentions:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        context, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scale,
            dropout=self.dropout if self.training else 0.0,
        )
        if grouped:
            context = encoder_groups.from_blocks(context, q_len)
        if head_mask is not None:
            context = context * head_mask.to(context.dtype).view(-1, 1, self.num_heads, 1)
        context = context.reshape(*hidden_states.shape[:2], -1)
        if fused and not packed_qkv:
            context = context.add_(self.v_proj.bias)  # the value bias, folded out of the values (see above)
        if packed:  # the output's bias and the residual added inside the product
            return packed_linear(context, packed_weight(self, "out_proj"), residual=residual), None
        if onednn:
            return onednn_linear(context, self.out_proj.weight, self.out_proj.bias, residual=residual), None
        if fused:  # the output starts as residual + bias and the output GEMM accumulates into it
            context = context.reshape(-1, context.shape[-1])
            bias = self.out_proj.bias
            output = context.new_empty((*hidden_states.shape[:2], bias.shape[0]))  # contiguous, whatever the residual
            if residual is None:
                output.copy_(bias)
            else:
                torch.add(residual, bias, out=output)
            output.view(-1, bias.shape[0]).addmm_(context, self.out_proj.weight.t())
            return output, None
        output = self.out_proj(context)
        if residual is not None:
            output = residual + output
        return output, (attn_weights if output_attentions else None)

    def _largest_product(
        self,
        test: Callable[..., bool],
        hidden_states: torch.Tensor,
        kv_states: torch.Tensor,
        self_attention: bool,
    ) -> bool:
        """`test` (`runs_packed`, `onednn_products`) of the block's largest product: a self-attention's queries, keys
        and values as the one product they stack into; a cross-attention's keys and values over the other modality's
        states, or else its queries."""
        if self_attention:
            return test(self, "q_proj", hidden_states, stacked=3)
        return test(self, "k_proj", kv_states, stacked=2) or test(self, "q_proj", hidden_states)

    def _fuses(self, *inputs: torch.Tensor | None) -> bool:
        """Whether the forward may fold the key and value biases away (see `forward`): no autograd, tracing or
        active dropout (dropped probabilities no longer sum to 1), plain linear layers."""
        if keeps_written_form(self, *inputs) or (self.training and self.dropout > 0):
            return False
        return plain_linears(self.q_proj, self.k_proj, self.v_proj, self.out_proj)

    def prune(self, mask: torch.Tensor) -> nn.Module:
        """Keeps the heads with a non-zero mask and folds the mask values into `out_proj`.

        Returns the pruned module, or an [`EfficientVLMEmptyAttention`] when no head survives.
        """
        index, values = _kept(mask, self.num_heads, "attention heads")
        if len(index) == 0:
            return EfficientVLMEmptyAttention(self.out_proj.bias.detach().clone()).train(self.training)
        rows = (index[:, None] * self.head_dim + torch.arange(self.head_dim, device=index.device)).flatten()
        pruned = EfficientVLMAttention(self.config, len(index), self.k_proj.in_features, self.dropout)
        pruned.q_proj = _keep_rows(self.q_proj, rows)
        pruned.k_proj = _keep_rows(self.k_proj, rows)
        pruned.v_proj = _keep_rows(self.v_proj, rows)
        pruned.out_proj = _keep_columns(self.out_proj, rows, values.repeat_interleave(self.head_dim))
        pruned.cpu_packs = copy.deepcopy(self.cpu_packs)  # empty, with the same settings
        return pruned.train(self.training)


class EfficientVLMEmptyAttention(nn.Module):
    """An attention block with no head left: its output is the output projection's bias, so the model
    computes exactly what the fully masked attention computed."""

    num_heads = 0

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        output_attentions: bool = False,
        residual: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As [`EfficientVLMAttention.forward`]; with `output_attentions`, weights of no head: (batch, 0, q_len,
        k_len), so that a model's attentions stay one tensor per layer."""
        # A new tensor, not a view of the parameter: views of leaves trip autograd hooks (e.g. FLOP counting).
        output = (torch.zeros_like(hidden_states) if residual is None else residual) + self.bias
        if not output_attentions:
            return output, None
        k_len = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
        return output, hidden_states.new_zeros(hidden_states.shape[0], 0, hidden_states.shape[1], k_len)

    def prune(self, mask: torch.Tensor) -> nn.Module:
        _kept(mask, 0, "attention heads")  # nothing left to remove: only an empty mask fits
        return self


# In-place forms of the activations of `ACT2FN` (the same kernels) that the FFN's inference path may use.
_IN_PLACE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": torch.ops.aten.gelu_,
    "relu": torch.relu_,
    "silu": lambda tensor: F.silu(tensor, inplace=True),
}


class EfficientVLMMLP(PacksCPUWeights):
    """Two-layer FFN; an optional (neurons,) mask multiplies the activations."""

    # On a CPU without autograd, inputs of more rows (tokens over the batch) than this run in blocks of at most this
    # many (see `_inference_forward`); a class attribute, so a test can force blocks on a tiny model. 1024 keeps a
    # 384-px image's 577 tokens in one block: blocks of 289 rows ran the GEMMs at 79-86% of the matmul peak, 577 at
    # 90%, and the (1024, 3072) block (12 MiB) stays under glibc's largest dynamic mmap threshold.
    inference_chunk_rows = 1024

    def __init__(self, config: EfficientVLMVisionConfig | EfficientVLMTextConfig, intermediate_size: int) -> None:
        super().__init__()
        self.config = config
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, config.hidden_size)

    @property
    def intermediate_size(self) -> int:
        return self.fc1.out_features

    def forward(
        self, hidden_states: torch.Tensor, ffn_mask: torch.Tensor | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden_states: (..., hidden); ffn_mask: (intermediate,) or broadcastable to (..., intermediate);
        residual: (..., hidden), added to the output. Returns (..., hidden)."""
        if keeps_written_form(self, hidden_states, residual):
            output = self._plain_forward(hidden_states, ffn_mask)
            return output if residual is None else residual + output
        return self._inference_forward(hidden_states, ffn_mask, residual)

    def _plain_forward(self, hidden_states: torch.Tensor, ffn_mask: torch.Tensor | None) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        if ffn_mask is not None:
            hidden_states = hidden_states * ffn_mask.to(hidden_states.dtype)
        return self.fc2(hidden_states)

    @staticmethod
    def _per_neuron(ffn_mask: torch.Tensor | None) -> bool:
        """Whether the mask holds one value per neuron (or is absent): it then applies to any block of rows."""
        return ffn_mask is None or ffn_mask.dim() == 1

    def _fuses(self, ffn_mask: torch.Tensor | None) -> bool:
        """Whether `_inference_forward` may run this FFN from its weights: plain linear layers with biases and a
        mask of one value per neuron."""
        return self._per_neuron(ffn_mask) and plain_linears(self.fc1, self.fc2)

    def _inference_forward(
        self, hidden_states: torch.Tensor, ffn_mask: torch.Tensor | None, residual: torch.Tensor | None
    ) -> torch.Tensor:
        """The FFN without autograd: on a CPU in blocks of at most `inference_chunk_rows` rows (tokens), so the
        widest tensor, (rows, intermediate), stays small enough for the cache and for the allocator to reuse
        instead of fresh pages (e.g. 57 MB at 8 x 577 tokens x 3072). When `_fuses`, the output starts as
        `residual + fc2.bias` and each block's `fc2` GEMM accumulates into its rows: no bias broadcast, no
        separate residual add, no copy of the blocks into place."""
        width = hidden_states.shape[-1]
        rows = hidden_states.numel() // width
        flat = hidden_states.reshape(rows, width)
        blocks = 1
        if hidden_states.device.type == "cpu" and rows > self.inference_chunk_rows:
            blocks = -(-rows // self.inference_chunk_rows)  # GPU allocators cache their blocks: no gain there
        out_features = self.fc2.out_features
        if not self._fuses(ffn_mask):
            if blocks == 1 or not self._per_neuron(ffn_mask):  # a per-token mask has the input's shape
                output = self._plain_forward(hidden_states, ffn_mask)
            else:
                output = torch.cat([self._plain_forward(block, ffn_mask) for block in flat.tensor_split(blocks)])
                output = output.view(*hidden_states.shape[:-1], out_features)
            return output if residual is None else residual + output
        if runs_packed(self, "fc1", hidden_states):
            return self._packed_forward(flat, blocks, ffn_mask, residual).view(*hidden_states.shape[:-1], -1)
        if onednn_products(self, "fc1", hidden_states):  # where MKL is slow (`cpu_products_library`)
            output = self._packed_forward(flat, blocks, ffn_mask, residual, plain=True)
            return output.view(*hidden_states.shape[:-1], -1)
        output = flat.new_empty((rows, out_features))  # contiguous, whatever the residual
        if residual is None:
            output.copy_(self.fc2.bias)
        else:
            torch.add(residual.reshape(rows, out_features), self.fc2.bias, out=output)
        alpha = 1 / self._fc1_scale  # quick-GELU's activations come out scaled (`_activated`)
        start = 0
        for block in flat.tensor_split(blocks):
            activated = self._activated(block, ffn_mask)
            output[start : start + len(block)].addmm_(activated, self.fc2.weight.t(), alpha=alpha)
            start += len(block)
        return output.view(*hidden_states.shape[:-1], out_features)

    def _packed_forward(
        self,
        flat: torch.Tensor,
        blocks: int,
        ffn_mask: torch.Tensor | None,
        residual: torch.Tensor | None,
        plain: bool = False,
    ) -> torch.Tensor:
        """`_inference_forward` on oneDNN, from packed weights or (`plain`) from the layers' own: fc1's bias, fc2's
        bias and the residual run inside the products, and fc1's activation too where `fuses_activations`.
        (rows, hidden) -> (rows, hidden)."""
        activation = FUSED_ACTIVATIONS.get(self.config.hidden_act) if fuses_activations() else None
        scale = self._fc1_scale
        if plain:  # no scaled copy of the weights: the inputs are scaled, and the output back (see block_output)
            fc1 = (self.fc1.weight, self.fc1.bias * scale if scale != 1 else self.fc1.bias)
            fc2 = (self.fc2.weight, self.fc2.bias * scale if scale != 1 else self.fc2.bias)
        else:
            fc1_pack = packed_weight(self, "fc1", weight_scale=scale, bias_scale=scale)
            fc2_pack = packed_weight(self, "fc2", weight_scale=1 / scale)
            fc1, fc2 = (fc1_pack.weight, fc1_pack.bias), (fc2_pack.weight, fc2_pack.bias)
        rescale = plain and scale != 1
        if residual is not None:
            residual = residual.reshape(len(flat), -1)

        def block_output(block: torch.Tensor, block_residual: torch.Tensor | None) -> torch.Tensor:
            # Plain quick-GELU: fc1 of (scale x block) is scale x fc1(block), whose SiLU is scale x quick_gelu; fc2
            # of that, with its bias and the residual scaled alike, is scale x the output.
            activated = onednn_linear(block * scale if rescale else block, *fc1, activation or NO_ACTIVATION)
            if activation is None:
                activated = self._activate_in_place(activated)
            if ffn_mask is not None:
                activated.mul_(ffn_mask.to(activated.dtype))
            if rescale:
                scaled_residual = None if block_residual is None else block_residual * scale
                return onednn_linear(activated, *fc2, residual=scaled_residual).mul_(1 / scale)
            return onednn_linear(activated, *fc2, residual=block_residual)

        if blocks == 1:
            return block_output(flat, residual)
        residuals = [None] * blocks if residual is None else residual.tensor_split(blocks)
        return torch.cat([block_output(*pair) for pair in zip(flat.tensor_split(blocks), residuals)])

    @property
    def _fc1_scale(self) -> float:
        """What the inference forms scale fc1's output by: QUICK_GELU_SCALE for quick-GELU (see `_activated`), else
        1."""
        return QUICK_GELU_SCALE if self.config.hidden_act == "quick_gelu" else 1.0

    def _activated(self, block: torch.Tensor, ffn_mask: torch.Tensor | None) -> torch.Tensor:
        """`activation(fc1(block)) * mask`, the activation in place. Quick-GELU comes out times QUICK_GELU_SCALE:
        quick_gelu(h) = h * sigmoid(a h) = silu(a h) / a with a = 1.702, so `fc1`'s GEMM scales its output by a
        (free inside the GEMM) and one in-place SiLU follows, where `x * sigmoid(1.702 x)` takes three passes (a
        scaling, a sigmoid and a product, each into a new tensor); `fc2`'s GEMM divides by a."""
        scale = self._fc1_scale
        activated = self._activate_in_place(
            torch.addmm(self.fc1.bias, block, self.fc1.weight.t(), beta=scale, alpha=scale)
        )
        if ffn_mask is not None:
            activated.mul_(ffn_mask.to(activated.dtype))
        return activated

    def _activate_in_place(self, fc1_output: torch.Tensor) -> torch.Tensor:
        """The activation of `fc1_output` of an inference form, in place where torch has an in-place form.
        Quick-GELU's fc1 output comes scaled by QUICK_GELU_SCALE (see `_activated`): its SiLU is the scaled
        quick-GELU."""
        if self.config.hidden_act == "quick_gelu":
            return F.silu(fc1_output, inplace=True)
        in_place = _IN_PLACE_ACTIVATIONS.get(self.config.hidden_act)
        return in_place(fc1_output) if in_place is not None else self.activation_fn(fc1_output)

    def prune(self, mask: torch.Tensor, pad_to_multiple_of: int = 1) -> nn.Module:
        """Keeps neurons with a non-zero mask, folding the mask values into `fc2`.

        With `pad_to_multiple_of` > 1 the kept width is rounded up (see [`padded_width`]) with neurons whose
        `fc1` row, `fc1` bias and `fc2` column are zero: the activation of 0 is 0 (GELU, quick-GELU, ReLU, SiLU),
        so they add exactly nothing to the output, and their gradients are zero too (they stay zero when the
        pruned model is fine-tuned). A fully masked FFN still becomes an [`EfficientVLMEmptyMLP`]."""
        index, values = _kept(mask, self.intermediate_size, "FFN neurons")
        if len(index) == 0:
            return EfficientVLMEmptyMLP(self.fc2.bias.detach().clone()).train(self.training)
        # Capped by the unpruned width, not the current one: a pruned FFN whose padding was dropped (to prune it
        # again) is padded anew.
        width = padded_width(len(index), max(self.config.intermediate_size, self.intermediate_size), pad_to_multiple_of)
        if width > len(index):
            zero = torch.zeros(1, dtype=self.fc1.weight.dtype, device=self.fc1.weight.device)
            if self.activation_fn(zero).item() != 0.0:
                raise ValueError(
                    f"Cannot pad an FFN with `hidden_act={self.config.hidden_act!r}`: its value at 0 is not 0, so "
                    "zero neurons would change the output; prune with `pad_to_multiple_of=1`."
                )
        pruned = EfficientVLMMLP(self.config, width)
        pruned.fc1 = _keep_rows(self.fc1, index, width)
        pruned.fc2 = _keep_columns(self.fc2, index, values, width)
        pruned.cpu_packs = copy.deepcopy(self.cpu_packs)  # empty, with the same settings
        return pruned.train(self.training)


class EfficientVLMEmptyMLP(nn.Module):
    """An FFN with no neuron left: outputs `fc2`'s bias, as the fully masked FFN did."""

    intermediate_size = 0

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)

    def forward(
        self, hidden_states: torch.Tensor, ffn_mask: torch.Tensor | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        return (torch.zeros_like(hidden_states) if residual is None else residual) + self.bias

    def prune(self, mask: torch.Tensor, pad_to_multiple_of: int = 1) -> nn.Module:
        _kept(mask, 0, "FFN neurons")
        return self


def build_attention(config, num_heads: int, kv_hidden_size: int, dropout: float) -> nn.Module:
    if num_heads == 0:
        return EfficientVLMEmptyAttention(torch.zeros(config.hidden_size))
    return EfficientVLMAttention(config, num_heads, kv_hidden_size, dropout)


def build_mlp(config, intermediate_size: int) -> nn.Module:
    if intermediate_size == 0:
        return EfficientVLMEmptyMLP(torch.zeros(config.hidden_size))
    return EfficientVLMMLP(config, intermediate_size)


# --------------------------------------------------------------------------------------------------------------
# Vision transformer
# --------------------------------------------------------------------------------------------------------------


def sincos_2d_position_embeddings(side: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (side * side, dim) of a `side` x `side` patch grid in reading
    order (MAE's layout): the first half of the channels codes the row, the second the column, each as sines then
    cosines of `dim // 4` frequencies from 1 down to 1 / `temperature`."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine position embeddings need a width divisible by 4; got {dim}.")
    frequencies = temperature ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(
        torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij"
    )

    def code(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.flatten()[:, None] * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([code(rows), code(cols)], dim=1).float()


class EfficientVLMVisionEmbeddings(PacksCPUWeights):
    """Patch embedding + class token + learned positions (interpolated for other image sizes)."""

    def __init__(self, config: EfficientVLMVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embed = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.num_patches = (config.image_size // config.patch_size) ** 2
        self.pos_embed = nn.Embedding(self.num_patches + 1, config.hidden_size)
        self.register_buffer("position_ids", torch.arange(self.num_patches + 1).unsqueeze(0), persistent=False)
        # (pos_embed.weight's stamp, (grid, dtype, inference mode), interpolated positions)
        self._interpolation_cache: tuple[TensorStamp, tuple, torch.Tensor] | None = None

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings (1, 1 + patches, hidden) for an image of `height` x `width` pixels. Without autograd
        (and outside tracing) an interpolated grid is kept for the next call of the same size until the embedding
        weights change: the bicubic interpolation took 0.5-1% of a batch-1 call at 384 px."""
        position = self.pos_embed.weight.unsqueeze(0)
        new_h, new_w = height // self.config.patch_size, width // self.config.patch_size
        if new_h * new_w == self.num_patches and new_h == new_w:
            return position
        weight = self.pos_embed.weight
        # Nothing kept under autograd or tracing, nor for inference tensors: torch counts no in-place writes to them.
        if keeps_written_form(self, position) or weight.is_inference():
            return self._interpolated(position, new_h, new_w)
        key = (new_h, new_w, weight.dtype, torch.is_inference_mode_enabled())
        cache = self._interpolation_cache
        if cache is None or not cache[0].matches(weight) or cache[1] != key:
            self._interpolation_cache = None  # the stale grid goes before the new one is made
            self._interpolation_cache = (TensorStamp.of(weight), key, self._interpolated(position, new_h, new_w))
        return self._interpolation_cache[2]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        self._interpolation_cache = None  # a move or cast: see `TensorStamp`
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_interpolation_cache": None}  # a weak reference does not pickle

    def _interpolated(self, position: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
        side = int(self.num_patches**0.5)
        grid = position[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(new_h, new_w), mode="bicubic", align_corners=False).to(position.dtype)
        return torch.cat([position[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, -1)], dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """pixel_values: (batch, channels, height, width) -> (batch, 1 + patches, hidden)."""
        if pixel_values.dim() != 4:
            raise ValueError(
                f"`pixel_values` must have shape (batch, channels, height, width); got {tuple(pixel_values.shape)}."
            )
        batch, channels, height, width = pixel_values.shape
        if channels != self.config.num_channels:
            raise ValueError(
                f"`pixel_values` has {channels} channels but the model expects {self.config.num_channels}."
            )
        if height % self.config.patch_size or width % self.config.patch_size:
            raise ValueError(
                f"Image size {height}x{width} is not a multiple of the patch size {self.config.patch_size}."
            )
        # NaN/inf pixels would otherwise turn every output into NaN silently. A sum carries any NaN / inf: one
        # pass and one device sync (on CPU ~25x faster than `isfinite(...).all()`); the images are then located.
        if not torch.compiler.is_compiling() and not torch.isfinite(pixel_values.sum(dtype=torch.float32)):
            bad = (~torch.isfinite(pixel_values)).flatten(1).any(dim=1).nonzero().flatten().tolist()
            if bad:
                raise ValueError(
                    f"`pixel_values` contains NaN or inf values (images {bad[:8]} of the batch of {batch})."
                )
        if not interpolate_pos_encoding and (height, width) != (self.config.image_size,) * 2:
            raise ValueError(
                f"Input image size ({height}x{width}) does not match the model ({self.config.image_size}x"
                f"{self.config.image_size}); pass `interpolate_pos_encoding=True` to use another size."
            )
        pixel_values = pixel_values.to(self.patch_embed.weight.dtype)
        position = self.interpolate_pos_encoding(height, width)
        if self._runs_packed(pixel_values):
            return self._packed_forward(pixel_values, position)
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        class_token = self.class_embedding.expand(batch, 1, -1).to(patches.dtype)
        embeddings = torch.cat([class_token, patches], dim=1)
        return embeddings + position

    def _runs_packed(self, pixel_values: torch.Tensor) -> bool:
        """Whether the patch embedding runs as one packed product (see `_packed_forward`): the embeddings pack
        (`pack_cpu_weights`), their inference form runs, and the patch embedding is the plain, hook-free
        convolution it was built as."""
        conv = self.patch_embed
        plain = type(conv) is nn.Conv2d and not (conv._forward_hooks or conv._forward_pre_hooks)
        plain = plain and conv.stride == conv.kernel_size and conv.padding == (0, 0) and conv.dilation == (1, 1)
        return (
            plain
            and conv.groups == 1
            and not keeps_written_form(self, pixel_values)
            and runs_packed(self, "patch_embed", pixel_values)
        )

    def _packed_forward(self, pixel_values: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The patches as rows times the packed patch weights, the positions added inside the product, then the
        class token before them: a copy of the pixels, one GEMM and the concatenation, where the convolution (a
        third slower at batch 1, 1.6x at batch 8 on 2 AMD cores), the concatenation and an add ran."""
        batch, channels, height, width = pixel_values.shape
        size = self.config.patch_size
        rows_h, rows_w = height // size, width // size
        patches = pixel_values.view(batch, channels, rows_h, size, rows_w, size).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, rows_h * rows_w, channels * size * size)
        positions = position[:, 1:].expand(batch, -1, -1)
        embeddings = packed_linear(patches, packed_weight(self, "patch_embed"), residual=positions)
        class_token = (self.class_embedding + position[:, :1]).expand(batch, 1, -1)
        return torch.cat([class_token, embeddings], dim=1)


def mark_zero_init(*branches: tuple[nn.Module, str]) -> None:
    """Marks each `(branch, projection name)` output projection for `_init_weights` to zero (the residual branch
    then starts at nothing). A fully pruned branch (`EfficientVLMEmpty*`) has no projection, only its bias."""
    for branch, name in branches:
        projection = getattr(branch, name, None)
        if projection is not None:
            projection.zero_init = True


class EfficientVLMVisionLayer(GradientCheckpointingLayer):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: EfficientVLMVisionConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = build_attention(
            config, config.layer_heads(layer_index), config.hidden_size, config.attention_dropout
        )
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = build_mlp(config, config.layer_intermediate_size(layer_index))
        if config.zero_init_residual:
            mark_zero_init((self.self_attn, "out_proj"), (self.mlp, "fc2"))

    def forward(
        self,
        hidden_states: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        ffn_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_states, attn_weights = self.self_attn(
            self.layer_norm1(hidden_states),
            head_mask=head_mask,
            output_attentions=output_attentions,
            residual=hidden_states,
        )
        hidden_states = self.mlp(self.layer_norm2(hidden_states), ffn_mask, residual=hidden_states)
        return hidden_states, attn_weights


@dataclass
class EncoderOutput(ModelOutput):
    """
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Output of the last layer.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        The input of the first layer and the output of each layer, each `(batch_size, sequence_length, hidden_size)`.
    attentions (`tuple(torch.FloatTensor)`, *optional*):
        Self-attention probabilities of each layer, each `(batch_size, num_heads, sequence_length, sequence_length)`
        with the layer's own head count (0 for a layer whose heads were all pruned).
    cross_attentions (`tuple(torch.FloatTensor)`, *optional*):
        Cross-attention probabilities of each fusion layer, each
        `(batch_size, num_heads, sequence_length, image_length)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


def _layer_mask(masks: list[torch.Tensor | None] | None, index: int, name: str, num_layers: int):
    if masks is None:
        return None
    if len(masks) != num_layers:
        raise ValueError(f"`{name}` has {len(masks)} entries but there are {num_layers} layers.")
    return masks[index]


# --------------------------------------------------------------------------------------------------------------
# Text + fusion BERT stack
# --------------------------------------------------------------------------------------------------------------


class EfficientVLMTextEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm and dropout (BERT)."""

    def __init__(self, config: EfficientVLMTextConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0), persistent=False
        )

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: (batch, seq) -> (batch, seq, hidden)."""
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, sequence); got {tuple(input_ids.shape)}.")
        seq_len = input_ids.shape[1]
        check_text_length(seq_len, self.config.max_position_embeddings)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        words = _embed_ids(self.word_embeddings, input_ids, "input_ids", "vocab_size")
        types = _embed_ids(self.token_type_embeddings, token_type_ids, "token_type_ids", "type_vocab_size")
        embeddings = words + self.position_embeddings(self.position_ids[:, :seq_len]) + types
        return self.dropout(self.LayerNorm(embeddings))


def check_text_length(length: int, positions: int) -> None:
    """Raises when a text of `length` tokens does not fit the position table of `positions` (the onnxruntime models
    check with it too, before a graph fails on it)."""
    if length > positions:
        raise ValueError(
            f"The text has {length} tokens but the model's position table holds {positions}; truncate it (the "
            "processor's `max_length`) or shorten it (the zero-shot classification pipeline tokenizes its labels "
            "without truncating)."
        )


def _embed_ids(table: nn.Embedding, ids: torch.Tensor, name: str, size_name: str) -> torch.Tensor:
    # An id past the table fails in torch's CPU kernel as a bare "index out of range in self": named here, at no cost
    # to the ids that fit (on CUDA it is a device-side assert, which cannot be caught).
    try:
        return table(ids)
    except IndexError as error:
        raise IndexError(
            f"`{name}` hold ids from {int(ids.min())} to {int(ids.max())}, but the model's table has "
            f"{table.num_embeddings} rows (text_config.{size_name}): the tokenizer does not match the model. Use the "
            f"checkpoint's own tokenizer, or build the model with {size_name} covering the tokenizer's ids."
        ) from error


class EfficientVLMTextLayer(GradientCheckpointingLayer):
    """Post-LN BERT layer; fusion layers add cross-attention to the image between self-attention and FFN."""

    def __init__(self, config: EfficientVLMTextConfig, layer_index: int, has_cross_attention: bool) -> None:
        super().__init__()
        self.attention = build_attention(
            config, config.layer_heads(layer_index), config.hidden_size, config.attention_probs_dropout_prob
        )
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:
            self.crossattention = build_attention(
                config,
                config.layer_cross_heads(layer_index),
                config.encoder_hidden_size,
                config.attention_probs_dropout_prob,
            )
            self.crossattention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = build_mlp(config, config.layer_intermediate_size(layer_index))
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if has_cross_attention and config.fusion_zero_init_residual:
            # `_init_weights` zeroes these: the layer starts as the identity (up to its LayerNorms).
            mark_zero_init((self.attention, "out_proj"), (self.crossattention, "out_proj"), (self.mlp, "fc2"))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        cross_head_mask: torch.Tensor | None = None,
        ffn_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        encoder_groups: EncoderGroups | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # Without active dropout each block adds the residual itself (its GEMM accumulates into it at inference).
        dropout = self.training and self.dropout.p > 0

        def add_residual(output: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            return residual + self.dropout(output) if dropout else output

        attn_output, self_weights = self.attention(
            hidden_states,
            attention_mask,
            head_mask=head_mask,
            output_attentions=output_attentions,
            residual=None if dropout else hidden_states,
        )
        hidden_states = self.attention_norm(add_residual(attn_output, hidden_states))
        cross_weights = None
        if self.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError("A fusion layer needs `encoder_hidden_states` (the image tokens) to cross-attend to.")
            cross_output, cross_weights = self.crossattention(
                hidden_states,
                encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                head_mask=cross_head_mask,
                output_attentions=output_attentions,
                encoder_groups=encoder_groups,
                residual=None if dropout else hidden_states,
            )
            hidden_states = self.crossattention_norm(add_residual(cross_output, hidden_states))
        mlp_output = self.mlp(hidden_states, ffn_mask, residual=None if dropout else hidden_states)
        hidden_states = self.mlp_norm(add_residual(mlp_output, hidden_states))
        return hidden_states, self_weights, cross_weights


def _keeps_every_position(attention_mask: torch.Tensor) -> bool:
    """Whether a (batch, k_len) 1/0 mask is all ones; never decided while tracing, compiling or exporting (the
    graph must serve padded inputs too) nor on an accelerator (the check would wait for the device)."""
    if attention_mask.device.type != "cpu" or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    return bool(attention_mask.all())


def extended_attention_mask(
    attention_mask: torch.Tensor | None, dtype: torch.dtype, causal: bool = False, query_length: int | None = None
) -> torch.Tensor | None:
    """(batch, k_len) 1/0 padding mask -> additive (batch, 1, q_len | 1, k_len) mask; `causal` adds a
    lower-triangular constraint (q_len == k_len). A CPU mask that keeps every position gives None: adding zeros
    changes no score, and without a mask SDPA and the CPU attention kernel take their fast paths."""
    if not causal and (attention_mask is None or _keeps_every_position(attention_mask)):
        return None
    min_value = torch.finfo(dtype).min
    if attention_mask is None:
        additive = None
    else:
        additive = (1.0 - attention_mask[:, None, None, :].to(dtype)) * min_value
    if causal:
        length = query_length if query_length is not None else attention_mask.shape[1]
        device = attention_mask.device if attention_mask is not None else None
        future = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
        causal_mask = torch.zeros(length, length, dtype=dtype, device=device).masked_fill(future, min_value)
        additive = causal_mask[None, None] if additive is None else (additive + causal_mask).clamp(min=min_value)
    return additive


class EfficientVLMTextEncoder(nn.Module):
    """The BERT layers: `num_hidden_layers` text layers, then `num_fusion_layers` fusion layers."""

    def __init__(self, config: EfficientVLMTextConfig) -> None:
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList(
            EfficientVLMTextLayer(config, i, has_cross_attention=config.layout.is_fusion(i))
            for i in range(config.num_total_layers)
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        layers: range | None = None,
        head_mask: list[torch.Tensor | None] | None = None,
        cross_head_mask: list[torch.Tensor | None] | None = None,
        ffn_mask: list[torch.Tensor | None] | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        encoder_groups: EncoderGroups | None = None,
    ) -> EncoderOutput:
        """Runs the layers in `layers` (default: all). Masks are indexed by absolute layer position for
        `head_mask` / `ffn_mask` (length: all layers) and by fusion-layer position for `cross_head_mask`.
        `encoder_groups`: which row of `encoder_hidden_states` each text cross-attends to, from
        [`EfficientVLMTextModel.forward`]'s `encoder_index`."""
        layout = self.config.layout
        layers = range(layout.num_layers) if layers is None else layers
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        all_cross = () if output_attentions and any(layout.is_fusion(i) for i in layers) else None
        for i in layers:
            is_fusion = layout.is_fusion(i)
            hidden_states, self_weights, cross_weights = self.layer[i](
                hidden_states,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                head_mask=_layer_mask(head_mask, i, "text/fusion head masks", layout.num_layers),
                cross_head_mask=(
                    _layer_mask(cross_head_mask, layout.fusion_index(i), "fusion_cross_heads", layout.num_fusion_layers)
                    if is_fusion
                    else None
                ),
                ffn_mask=_layer_mask(ffn_mask, i, "text/fusion FFN masks", layout.num_layers),
                output_attentions=output_attentions,
                encoder_groups=encoder_groups,
            )
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_attn += (self_weights,)
                if is_fusion:
                    all_cross += (cross_weights,)
        return EncoderOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden, attentions=all_attn, cross_attentions=all_cross
        )

    def prune_plan(
        self,
        head_mask: list[torch.Tensor | None] | None,
        cross_head_mask: list[torch.Tensor | None] | None,
        ffn_mask: list[torch.Tensor | None] | None,
        pad_to_multiple_of: int = 1,
    ) -> PrunePlan:
        """The pruned replacement of every masked module (masks indexed as in `forward`); changes nothing.
        `pad_to_multiple_of`: see [`EfficientVLMMLP.prune`]."""
        layout, plan = self.config.layout, []
        for i, layer in enumerate(self.layer):
            if head_mask is not None and head_mask[i] is not None:
                plan.append((layer, "attention", layer.attention.prune(head_mask[i])))
            if ffn_mask is not None and ffn_mask[i] is not None:
                plan.append((layer, "mlp", layer.mlp.prune(ffn_mask[i], pad_to_multiple_of)))
            if layout.is_fusion(i) and cross_head_mask is not None:
                mask = cross_head_mask[layout.fusion_index(i)]
                if mask is not None:
                    plan.append((layer, "crossattention", layer.crossattention.prune(mask)))
        return plan

    def record_sizes(self) -> None:
        """Writes the layers' current head counts and FFN widths into the config."""
        fusion_layers = [self.layer[i] for i in self.config.layout.fusion_layers]
        self.config.num_attention_heads_per_layer = [layer.attention.num_heads for layer in self.layer]
        self.config.intermediate_size_per_layer = [layer.mlp.intermediate_size for layer in self.layer]
        self.config.num_cross_attention_heads_per_layer = [layer.crossattention.num_heads for layer in fusion_layers]


# --------------------------------------------------------------------------------------------------------------
# Pre-trained model base and public models
# --------------------------------------------------------------------------------------------------------------


class EfficientVLMPreTrainedModel(PreTrainedModel):
    config_class = EfficientVLMConfig
    base_model_prefix = "efficientvlm"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["EfficientVLMVisionLayer", "EfficientVLMTextLayer"]
    # Our losses are means over the batch: let Trainer scale them under gradient accumulation.
    accepts_loss_kwargs = False
    # Attribute name of a task model's LM head ([`EfficientVLMLMHead`]), whose decoder is the output embeddings.
    lm_head_name: str | None = None
    # The auto classes a saved folder's `auto_map` names this class for (the first is the one it registers for;
    # see `save_pretrained`). Fixed per class: `_auto_class` is whichever auto class last loaded it as remote code.
    auto_classes: tuple[str, ...] = ()

    # A save leaves tied copies out (an LM head's decoder, NLVR2's shared cross-attention keys and values), and the
    # Trainer's resume warns of missing keys unless they are exactly these: every tied key is one, whatever the
    # class lists (pruning NLVR2 re-expands its ties, so they are read when asked for, not fixed here).
    @property
    def _keys_to_ignore_on_save(self) -> set[str]:
        return getattr(self, "_listed_keys_to_ignore_on_save", set()) | set(getattr(self, "all_tied_weights_keys", {}))

    @_keys_to_ignore_on_save.setter
    def _keys_to_ignore_on_save(self, keys: set[str] | list[str] | None) -> None:
        self._listed_keys_to_ignore_on_save = set(keys or [])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with two named errors where transformers would re-initialise layers
        and log a report: a [`CheckpointMismatchError`] when the weights do not fit the config (a pruned checkpoint
        with an unpruned config or the reverse, a missing layer; see `check_loaded_weights` for what may be
        missing), and a [`CorruptCheckpointError`] naming an unreadable (truncated, garbled) weights file. A
        checkpoint of `efficientvlm prune` taken while it learned its masks (it holds `masker.pt`) loads with a
        warning: it is the unpruned model, without those masks."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched_sizes = kwargs.pop("ignore_mismatched_sizes", False)
        try:
            # Mismatched shapes are reported through the loading info (and raised below), not as transformers'
            # RuntimeError that only points at its report.
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **kwargs,
            )
        except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as error:
            # torch.load's errors on a damaged `.bin` do not name the file (and suggest weights_only=False).
            subfolder = kwargs.get("subfolder") or ""
            damaged = isinstance(error, SafetensorError) or (
                pretrained_model_name_or_path is not None
                and unreadable_weight_files(pretrained_model_name_or_path, subfolder)
            )
            if not damaged:
                raise
            raise corrupt_checkpoint_error(error, pretrained_model_name_or_path, subfolder) from error
        check_loaded_weights(
            model,
            info,
            pretrained_model_name_or_path,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            config_given=not isinstance(kwargs.get("config"), (type(None), str, os.PathLike)),
        )
        mask_checkpoint = mask_learning_checkpoint_message(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        if mask_checkpoint is not None:
            warnings.warn(mask_checkpoint, UserWarning, stacklevel=2)
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`; a class with `auto_classes` (every task model) first sets
        `config.auto_map` to its own entries: `AutoModel` and its `auto_classes` all name this class, entries of
        other auto classes' models are dropped (a config copied from another task's folder would name a class whose
        file is not saved), those of configs and processors are kept.

        A dynamically quantized model (`torch.ao.quantization.quantize_dynamic`) raises: safetensors cannot store its
        packed int8 weights; the error names the formats that can."""
        quantized = sorted(
            {type(m).__qualname__ for m in self.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")}
        )
        if quantized:
            raise ValueError(
                f"save_pretrained cannot store a dynamically quantized model (it holds {quantized} modules, whose "
                "packed int8 weights safetensors cannot hold). Save it with "
                "`trainers.deployment.torch_int8.save_torch_int8(model, folder)` (reload with `load_torch_int8`), "
                "or save the float model and deploy int8 through ONNX: `efficientvlm export --int8`."
            )
        state_dict = kwargs.get("state_dict")
        if state_dict is not None:
            # A state dict gathered by DeepSpeed ZeRO-3 / FSDP (the Trainer's checkpoints) holds the scalar ITC
            # temperature in the (1,) shape it trained in (`trainers/sharding.py`): saved as the scalar it is.
            kwargs["state_dict"] = {
                key: value.reshape(()) if key.rsplit(".", 1)[-1] == "temp" and value.numel() == 1 else value
                for key, value in state_dict.items()
            }
        wrapped_class = type(self)
        if wrapped_class.__module__.startswith("torch.distributed"):
            # FSDP2 gives the model a class of its own (FSDP<Model>, defined in torch), and the Trainer saves its
            # checkpoints through it: saved as the model's class (its code, its `auto_map`), then given back.
            self.__class__ = next(c for c in wrapped_class.__mro__ if not c.__module__.startswith("torch.distributed"))
            try:
                return self.save_pretrained(save_directory, *args, **kwargs)
            finally:
                self.__class__ = wrapped_class
        if self.auto_classes:
            name = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
            kept = {
                key: value
                for key, value in (getattr(self.config, "auto_map", None) or {}).items()
                if not key.startswith("AutoModel")
            }
            self.config.auto_map = {**kept, **dict.fromkeys(("AutoModel", *self.auto_classes), name)}
        with OrdinaryFileModes(save_directory):
            return super().save_pretrained(save_directory, *args, **kwargs)

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """(batch, channels, height, width) -> L2-normalised ITC image embeddings (batch, embed_dim), as CLIP's
        (the backbone's contrastive projection; trained by pre-training and retrieval)."""
        return self.efficientvlm.get_image_features(pixel_values, **kwargs)

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """(batch, seq) -> L2-normalised ITC text embeddings (batch, embed_dim), as CLIP's."""
        return self.efficientvlm.get_text_features(input_ids, attention_mask, token_type_ids, **kwargs)

    def get_output_embeddings(self) -> nn.Linear | None:
        return None if self.lm_head_name is None else getattr(self, self.lm_head_name).decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        if self.lm_head_name is None:
            raise AttributeError(f"{type(self).__name__} has no LM head.")
        getattr(self, self.lm_head_name).decoder = value

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if getattr(module, "zero_init", False):  # `fusion_zero_init_residual`, vision `zero_init_residual`
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, EfficientVLMVisionEmbeddings):
            nn.init.normal_(module.class_embedding, mean=0.0, std=std)
            if module.config.position_embedding_init == "sincos_2d":
                side = module.config.image_size // module.config.patch_size
                grid = sincos_2d_position_embeddings(side, module.config.hidden_size)
                class_position = grid.new_zeros(1, grid.shape[1])  # the class token has no place on the grid
                # transformers' `copy_` skips a loaded weight (this runs again in `from_pretrained`).
                init.copy_(module.pos_embed.weight, torch.cat([class_position, grid]).to(module.pos_embed.weight))
            # Non-persistent buffers are not in checkpoints: `from_pretrained` rebuilds them here.
            module.position_ids.copy_(torch.arange(module.position_ids.shape[-1]).unsqueeze(0))
        elif isinstance(module, EfficientVLMTextEmbeddings):
            module.position_ids.copy_(torch.arange(module.position_ids.shape[-1]).unsqueeze(0))
        elif isinstance(module, (EfficientVLMEmptyAttention, EfficientVLMEmptyMLP)):
            nn.init.zeros_(module.bias)
        elif isinstance(module, EfficientVLMModel):
            module.temp.fill_(self.config.itc_temperature)

    # Structured pruning, one signature on every model. The encoders implement it; task models hold an
    # `EfficientVLMModel` as `self.efficientvlm` and delegate to it; a task model with more prunable
    # structures (NLVR2's shared cross-attention, VQA's answer decoder) overrides these.
    def structure_sizes(self, include_decoder: bool = False) -> dict[str, list[int]]:
        """Per-layer number of heads / FFN neurons for each structure-mask key of the model's stacks (the
        vision model: `VISION_MASK_KEYS`, the text model: `TEXT_MASK_KEYS`, task models: both). With
        `include_decoder`, also the `DECODER_MASK_KEYS` of a model with an answer decoder (others raise)."""
        self._check_has_decoder(include_decoder)
        return self.efficientvlm.structure_sizes()

    def structure_unit_parameters(self, include_decoder: bool = False) -> dict[str, list[int]]:
        """Per-layer number of parameters one head / FFN neuron carries, for each key of `structure_sizes()`:
        removing `n` units of layer `i` of `key` removes exactly `n * result[key][i]` parameters."""
        self._check_has_decoder(include_decoder)
        return self.efficientvlm.structure_unit_parameters()

    def _check_has_decoder(self, include_decoder: bool) -> None:
        if include_decoder:
            raise ValueError(
                f"{type(self).__name__} has no separate decoder to prune (only VQA's answer decoder is one; a "
                "captioning model decodes with its text stack, pruned as `text` and `fusion`)."
            )

    def _own_config(self) -> None:
        """Gives this model and its submodules copies of the config objects they hold, once, before pruning writes
        the new sizes into them: models built from one config object share it, and the sizes of a pruned one reached
        the others (an unpruned model then saved pruned sizes and could not be reloaded)."""
        if getattr(self, "_owns_config", False):
            return
        memo: dict[int, object] = {}  # one copy per config object: sub-configs stay the ones the parents hold
        for module in self.modules():
            config = module.__dict__.get("config")
            if isinstance(config, PretrainedConfig):
                module.config = copy.deepcopy(config, memo)
            if isinstance(module, EfficientVLMPreTrainedModel):
                module._owns_config = True

    def pack_cpu_weights(self, enabled: bool = True, min_flops: int = MIN_PACKED_FLOPS) -> int:
        """Has every attention and FFN block run its linear layers (and the vision embeddings their patch
        convolution) from oneDNN-packed copies of their weights where it runs on a CPU in float32 without autograd
        (inference: `eval()` under `torch.no_grad()` / `inference_mode()`), with each layer's bias, activation and
        residual add inside its product and a self-attention's queries, keys and values in one product
        (`packing_efficientvlm`). The copies are made at a block's first such call and again when its weights change
        as torch counts changes (an optimizer step, `load_state_dict`, `copy_` / `mul_` on a parameter or its
        `detach()`, a new `.data`); a write through `parameter.data` (`p.data.mul_(...)`) is not counted by torch
        and goes unseen: call `pack_cpu_weights()` again after such writes (it drops every copy). They cost one more
        copy of those weights in memory (about the model's size) and are never saved. Outputs match the unpacked
        model's to float32 rounding. A block whose largest product on an input (a self-attention's queries, keys and
        values stacked) has fewer than `min_flops` FLOPs runs unpacked for it (tiny models, a few rows of a narrow
        FFN: oneDNN's cost per call outweighs the gain; 0 packs everything). `enabled=False` drops the copies.
        Blocks that pruning builds later pack too. Returns the number of blocks set. A model constructed under
        `torch.inference_mode()` has inference tensors for weights, whose in-place writes torch does not count: it
        raises ValueError rather than risk a stale copy."""
        if enabled and not cpu_packing_available():
            raise RuntimeError(
                "pack_cpu_weights needs PyTorch built with oneDNN (torch.backends.mkldnn.is_available() is False "
                "here); the model runs unpacked."
            )
        if enabled:
            for name, parameter in self.named_parameters():
                if parameter.is_inference():
                    raise inference_tensor_error(f"pack_cpu_weights: {name}")
        blocks = [m for m in self.modules() if isinstance(m, PacksCPUWeights)]
        for block in blocks:
            block.cpu_packs = CPUWeightPacks(min_flops) if enabled else None
        return len(blocks)

    def prune(self, structure_masks: StructureMasks, pad_to_multiple_of: int = 1) -> None:
        """Removes every head / FFN neuron whose mask is zero, folds the surviving mask values into the
        weights (the outputs are unchanged) and records the new per-layer sizes in the config, so
        `save_pretrained` / `from_pretrained` rebuild the smaller model.

        `pad_to_multiple_of` rounds each pruned FFN's kept width up to a multiple of it (never above its unpruned
        width; an emptied FFN stays removed) with all-zero neurons, which leave the outputs unchanged: CPU GEMMs
        run up to a third slower at widths that are not multiples of 8 (see [`EfficientVLMMLP.prune`]). Heads
        need no padding: a head's width (`head_dim`) is already such a multiple.

        `structure_masks` maps keys of `structure_sizes()` to one mask (or None) per layer; a key of a stack
        the model does not have raises. Every mask is checked (keys, one per layer, shape, finite values) and
        every pruned module built before any is swapped in: a bad mask raises and leaves the model as it was.
        The sizes are recorded in a config of this model's own (one it shared with other models is left as it was)."""
        check_prunable_masks(structure_masks, self.structure_sizes(), type(self).__name__)
        self._own_config()
        self.efficientvlm.prune(structure_masks, pad_to_multiple_of)


class EfficientVLMVisionModel(EfficientVLMPreTrainedModel):
    """The CLIP vision tower: embeddings, pre-LayerNorm, the layers and the post-LayerNorm."""

    config_class = EfficientVLMVisionConfig
    input_modalities = ("image",)

    def __init__(self, config: EfficientVLMVisionConfig) -> None:
        super().__init__(config)
        self.embeddings = EfficientVLMVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(EfficientVLMVisionLayer(config, i) for i in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        head_mask: list[torch.Tensor | None] | None = None,
        ffn_mask: list[torch.Tensor | None] | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> EncoderOutput:
        """pixel_values: (batch, channels, height, width). head_mask / ffn_mask: one tensor (or None) per layer."""
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
        all_hidden = (hidden_states,) if output_hidden_states else None
        all_attn = () if output_attentions else None
        num_layers = len(self.layers)
        for i, layer in enumerate(self.layers):
            hidden_states, attn = layer(
                hidden_states,
                head_mask=_layer_mask(head_mask, i, "vision_heads", num_layers),
                ffn_mask=_layer_mask(ffn_mask, i, "vision_ffn", num_layers),
                output_attentions=output_attentions,
            )
            if output_hidden_states:
                all_hidden += (hidden_states,)
            if output_attentions:
                all_attn += (attn,)
        output = self.post_layernorm(hidden_states)
        if self.config.output_position_embeddings:
            output = output + self.embeddings.interpolate_pos_encoding(*pixel_values.shape[-2:]).to(output.dtype)
        return EncoderOutput(last_hidden_state=output, hidden_states=all_hidden, attentions=all_attn)

    def layer_masks(self, structure_masks: StructureMasks | None) -> dict[str, list[torch.Tensor | None] | None]:
        """The `head_mask` / `ffn_mask` arguments of `forward` from a structure-mask dict (keys of the other
        stacks are ignored, so one dict serves every encoder)."""
        _check_mask_keys(structure_masks)
        check_finite_masks(structure_masks, VISION_MASK_KEYS)
        masks = structure_masks or {}
        return {"head_mask": masks.get("vision_heads"), "ffn_mask": masks.get("vision_ffn")}

    def structure_sizes(self) -> dict[str, list[int]]:
        return {
            "vision_heads": [layer.self_attn.num_heads for layer in self.layers],
            "vision_ffn": [layer.mlp.intermediate_size for layer in self.layers],
        }

    def structure_unit_parameters(self) -> dict[str, list[int]]:
        config, depth = self.config, len(self.layers)
        return {
            "vision_heads": [attention_head_parameters(config.head_dim, config.hidden_size, config.hidden_size)]
            * depth,
            "vision_ffn": [ffn_neuron_parameters(config.hidden_size)] * depth,
        }

    def prune_plan(self, structure_masks: StructureMasks, pad_to_multiple_of: int = 1) -> PrunePlan:
        """The pruned replacement of every masked module; changes nothing (see `prune`)."""
        masks, plan = self.layer_masks(structure_masks), []
        head_masks, ffn_masks = masks["head_mask"], masks["ffn_mask"]
        for i, layer in enumerate(self.layers):
            if head_masks is not None and head_masks[i] is not None:
                plan.append((layer, "self_attn", layer.self_attn.prune(head_masks[i])))
            if ffn_masks is not None and ffn_masks[i] is not None:
                plan.append((layer, "mlp", layer.mlp.prune(ffn_masks[i], pad_to_multiple_of)))
        return plan

    def record_sizes(self) -> None:
        """Writes the layers' current head counts and FFN widths into the config."""
        self.config.num_attention_heads_per_layer = [layer.self_attn.num_heads for layer in self.layers]
        self.config.intermediate_size_per_layer = [layer.mlp.intermediate_size for layer in self.layers]

    def prune(self, structure_masks: StructureMasks, pad_to_multiple_of: int = 1) -> None:
        check_pad_multiple(pad_to_multiple_of)
        check_prunable_masks(structure_masks, self.structure_sizes(), type(self).__name__)
        self._own_config()  # first: the pruned modules are built with the model's own config
        commit_prune_plan(self.prune_plan(structure_masks, pad_to_multiple_of))
        self.record_sizes()


def _check_encoder_index(index: torch.Tensor, batch: int, encoder_hidden_states: torch.Tensor | None) -> None:
    if encoder_hidden_states is None:
        raise ValueError("`encoder_index` was given without `encoder_hidden_states` to index.")
    if index.dim() != 1 or index.shape[0] != batch or index.dtype not in (torch.long, torch.int):
        raise ValueError(
            f"`encoder_index` must be a 1-D integer tensor with one entry per text ({batch}); "
            f"got {index.dtype} of shape {tuple(index.shape)}."
        )
    rows = encoder_hidden_states.shape[0]
    check_tensor(
        ((index >= 0) & (index < rows)).all(),
        f"`encoder_index` must point at rows of `encoder_hidden_states` (0 to {rows - 1}).",
    )


class EfficientVLMTextModel(EfficientVLMPreTrainedModel):
    """The BERT stack alone. `mode="text"` runs the text layers, `"fusion"` the fusion layers on given
    text states (`text_hidden_states`), `"multimodal"` both (fusion needs `encoder_hidden_states`)."""

    config_class = EfficientVLMTextConfig
    main_input_name = "input_ids"
    input_modalities = ("text",)

    def __init__(self, config: EfficientVLMTextConfig) -> None:
        super().__init__(config)
        self.embeddings = EfficientVLMTextEmbeddings(config)
        self.encoder = EfficientVLMTextEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        text_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        mode: str = "text",
        is_causal: bool = False,
        head_mask: list[torch.Tensor | None] | None = None,
        cross_head_mask: list[torch.Tensor | None] | None = None,
        ffn_mask: list[torch.Tensor | None] | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        encoder_index: torch.Tensor | None = None,
        **kwargs,
    ) -> EncoderOutput:
        """input_ids: (batch, seq); in `fusion` mode `text_hidden_states` (batch, seq, hidden) are the text
        layers' output; encoder_hidden_states: (batch, image_len, encoder_hidden_size);
        attention_mask / encoder_attention_mask: 1 for tokens to attend to, 0 for padding.

        encoder_index: (batch,) integers; text `i` cross-attends to row `encoder_index[i]` of
        `encoder_hidden_states` (and of `encoder_attention_mask`), which then holds each distinct image (or
        question) once: its keys and values are computed once per cross-attention layer, not once per text
        (retrieval re-ranking scores k texts per image; VQA k answers per question)."""
        layout = self.config.layout
        layers = {
            "text": layout.text_layers,
            "fusion": layout.fusion_layers,
            "multimodal": range(layout.num_layers),
        }.get(mode)
        if layers is None:
            raise ValueError(f"`mode` must be 'text', 'fusion' or 'multimodal'; got {mode!r}.")
        if mode == "fusion":
            if text_hidden_states is None:
                raise ValueError("`mode='fusion'` needs the text layers' output as `text_hidden_states`.")
            hidden_states = text_hidden_states
        else:
            if input_ids is None:
                raise ValueError(f"`mode={mode!r}` needs `input_ids`.")
            hidden_states = self.embeddings(input_ids, token_type_ids)
        if attention_mask is not None and attention_mask.shape != hidden_states.shape[:2]:
            raise ValueError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)} but the text has shape "
                f"{tuple(hidden_states.shape[:2])}."
            )
        encoder_groups = None
        if encoder_index is not None:
            _check_encoder_index(encoder_index, hidden_states.shape[0], encoder_hidden_states)
            encoder_groups = EncoderGroups(encoder_index, encoder_hidden_states.shape[0])
        elif encoder_hidden_states is not None and encoder_hidden_states.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"Batch sizes differ: {hidden_states.shape[0]} texts but {encoder_hidden_states.shape[0]} images."
            )
        dtype = hidden_states.dtype
        encoder_mask = extended_attention_mask(encoder_attention_mask, dtype)  # per encoder row: groups index it
        return self.encoder(
            hidden_states,
            extended_attention_mask(attention_mask, dtype, causal=is_causal, query_length=hidden_states.shape[1]),
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_mask,
            layers=layers,
            head_mask=head_mask,
            cross_head_mask=cross_head_mask,
            ffn_mask=ffn_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            encoder_groups=encoder_groups,
        )

    def layer_masks(self, structure_masks: StructureMasks | None) -> dict[str, list[torch.Tensor | None] | None]:
        """The `head_mask` / `cross_head_mask` / `ffn_mask` arguments of `forward` (lists over the whole stack,
        over the fusion layers for `cross_head_mask`) from a structure-mask dict (other stacks' keys ignored)."""
        _check_mask_keys(structure_masks)
        check_finite_masks(structure_masks, TEXT_MASK_KEYS)
        masks, layout = structure_masks or {}, self.config.layout

        def whole_stack(text_key: str, fusion_key: str) -> list[torch.Tensor | None] | None:
            text, fusion = masks.get(text_key), masks.get(fusion_key)
            if text is None and fusion is None:
                return None
            text = list(text) if text is not None else [None] * layout.num_text_layers
            return text + (list(fusion) if fusion is not None else [None] * layout.num_fusion_layers)

        return {
            "head_mask": whole_stack("text_heads", "fusion_heads"),
            "cross_head_mask": masks.get("fusion_cross_heads"),
            "ffn_mask": whole_stack("text_ffn", "fusion_ffn"),
        }

    def structure_sizes(self) -> dict[str, list[int]]:
        layout, stack = self.config.layout, self.encoder.layer
        text, fusion = layout.split(stack)
        return {
            "text_heads": [layer.attention.num_heads for layer in text],
            "text_ffn": [layer.mlp.intermediate_size for layer in text],
            "fusion_heads": [layer.attention.num_heads for layer in fusion],
            "fusion_cross_heads": [layer.crossattention.num_heads for layer in fusion],
            "fusion_ffn": [layer.mlp.intermediate_size for layer in fusion],
        }

    def structure_unit_parameters(self) -> dict[str, list[int]]:
        config, layout = self.config, self.config.layout
        head = attention_head_parameters(config.head_dim, config.hidden_size, config.hidden_size)
        cross_head = attention_head_parameters(config.head_dim, config.hidden_size, config.encoder_hidden_size)
        neuron = ffn_neuron_parameters(config.hidden_size)
        return {
            "text_heads": [head] * layout.num_text_layers,
            "text_ffn": [neuron] * layout.num_text_layers,
            "fusion_heads": [head] * layout.num_fusion_layers,
            "fusion_cross_heads": [cross_head] * layout.num_fusion_layers,
            "fusion_ffn": [neuron] * layout.num_fusion_layers,
        }

    def prune_plan(self, structure_masks: StructureMasks, pad_to_multiple_of: int = 1) -> PrunePlan:
        """The pruned replacement of every masked module; changes nothing (see `prune`)."""
        return self.encoder.prune_plan(**self.layer_masks(structure_masks), pad_to_multiple_of=pad_to_multiple_of)

    def record_sizes(self) -> None:
        self.encoder.record_sizes()

    def prune(self, structure_masks: StructureMasks, pad_to_multiple_of: int = 1) -> None:
        check_pad_multiple(pad_to_multiple_of)
        check_prunable_masks(structure_masks, self.structure_sizes(), type(self).__name__)
        self._own_config()  # first: the pruned modules are built with the model's own config
        commit_prune_plan(self.prune_plan(structure_masks, pad_to_multiple_of))
        self.record_sizes()


@dataclass
class EfficientVLMModelOutput(ModelOutput):
    """
    image_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`):
        L2-normalised ITC embedding of each image (projected [CLS] token).
    text_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`):
        L2-normalised ITC embedding of each text.
    logits_per_image (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
        Image-to-text ITC similarities divided by the ITC temperature.
    logits_per_text (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
        The transpose of `logits_per_image`.
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Fused text states (output of the last fusion layer).
    vision_output, text_output, fusion_output ([`EncoderOutput`]):
        Each encoder's output with its optional hidden states and attentions.
    """

    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    vision_output: EncoderOutput | None = None
    text_output: EncoderOutput | None = None
    fusion_output: EncoderOutput | None = None


class EfficientVLMModel(EfficientVLMPreTrainedModel):
    """Vision transformer, text/fusion BERT stack, ITC projections and ITC temperature."""

    auto_classes = ("AutoModel",)

    def __init__(self, config: EfficientVLMConfig) -> None:
        super().__init__(config)
        self.vision_model = EfficientVLMVisionModel(config.vision_config)
        self.text_model = EfficientVLMTextModel(config.text_config)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(config.text_config.hidden_size, config.embed_dim)
        # `temp` is the official checkpoints' name of the learnable ITC temperature.
        self.temp = nn.Parameter(torch.tensor(config.itc_temperature))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_model.set_input_embeddings(value)

    @property
    def itc_temperature(self) -> torch.Tensor:
        """The learnable ITC temperature, clamped as in X-VLM so it cannot collapse or explode."""
        return self.temp.clamp(0.001, 0.5)

    # -- the three building blocks every task model composes ------------------------------------------------
    def encode_image(
        self,
        pixel_values: torch.Tensor,
        structure_masks: StructureMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> EncoderOutput:
        """pixel_values: (batch, channels, height, width) -> image tokens (batch, 1 + patches, vision_hidden)."""
        return self.vision_model(
            pixel_values,
            **self.vision_model.layer_masks(structure_masks),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        structure_masks: StructureMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        token_type_ids: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """input_ids: (batch, seq) -> text states (batch, seq, text_hidden) from the text layers.
        `token_type_ids` (batch, seq), as BERT tokenizers emit them (all 0 for one sentence), default 0."""
        return self.text_model(
            input_ids,
            attention_mask,
            token_type_ids=token_type_ids,
            mode="text",
            **self.text_model.layer_masks(structure_masks),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )

    def fuse(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_states: torch.Tensor,
        image_attention_mask: torch.Tensor | None = None,
        structure_masks: StructureMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        image_index: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Runs the fusion layers: text_states (batch, seq, hidden) cross-attend to image_states
        (batch, image_len, vision_hidden); or, with `image_index` (batch,), text `i` to image
        `image_index[i]` of image_states (num_images, image_len, vision_hidden), each image's keys and values
        computed once."""
        return self.text_model(
            attention_mask=attention_mask,
            text_hidden_states=text_states,
            encoder_hidden_states=image_states,
            encoder_attention_mask=image_attention_mask,
            mode="fusion",
            **self.text_model.layer_masks(structure_masks),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            encoder_index=image_index,
        )

    def encode_image_text(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        structure_masks: StructureMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        images_per_text: int = 1,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[EncoderOutput, EncoderOutput, torch.Tensor]:
        """The prologue of every image-text task: images (images_per_text * batch, channels, height, width) and
        texts (batch, seq) -> their encoder outputs and the text attention mask (all ones when none is given).

        With `images_per_text > 1` (NLVR2), image `k * batch + i` belongs to text `i`."""
        if pixel_values.dim() == 4 and input_ids.dim() == 2:  # other shapes get the encoders' own errors
            num_images, num_texts = pixel_values.shape[0], input_ids.shape[0]
            if num_images != images_per_text * num_texts:
                per_text = f" ({images_per_text} per text)" if images_per_text > 1 else ""
                raise ValueError(f"Batch sizes differ: {num_images} images{per_text} but {num_texts} texts.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        vision = self.encode_image(
            pixel_values, structure_masks, interpolate_pos_encoding=interpolate_pos_encoding, **flags
        )
        text = self.encode_text(input_ids, attention_mask, structure_masks, token_type_ids=token_type_ids, **flags)
        return vision, text, attention_mask

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        """(batch, channels, height, width) -> L2-normalised ITC image embeddings (batch, embed_dim)."""
        image_states = self.encode_image(pixel_values, **kwargs).last_hidden_state
        return itc_embedding(self.vision_proj, image_states)

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """(batch, seq) -> L2-normalised ITC text embeddings (batch, embed_dim)."""
        text_states = self.encode_text(
            input_ids, attention_mask, token_type_ids=token_type_ids, **kwargs
        ).last_hidden_state
        return itc_embedding(self.text_proj, text_states)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        structure_masks: StructureMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> EfficientVLMModelOutput:
        """Encodes images (batch, channels, height, width) and their texts (batch, seq), returns ITC
        embeddings/similarities and the fused text states."""
        flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        vision, text, attention_mask = self.encode_image_text(
            pixel_values,
            input_ids,
            attention_mask,
            structure_masks,
            interpolate_pos_encoding=interpolate_pos_encoding,
            token_type_ids=token_type_ids,
            **flags,
        )
        image_embeds = itc_embedding(self.vision_proj, vision.last_hidden_state)
        text_embeds = itc_embedding(self.text_proj, text.last_hidden_state)
        logits_per_image = image_embeds @ text_embeds.t() / self.itc_temperature
        fusion = self.fuse(
            text.last_hidden_state, attention_mask, vision.last_hidden_state, None, structure_masks, **flags
        )
        return EfficientVLMModelOutput(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            last_hidden_state=fusion.last_hidden_state,
            vision_output=vision,
            text_output=text,
            fusion_output=fusion,
        )

    # -- structured pruning: each encoder owns its stacks' keys -----------------------------------------------
    def structure_sizes(self) -> dict[str, list[int]]:
        return {**self.vision_model.structure_sizes(), **self.text_model.structure_sizes()}

    def structure_unit_parameters(self) -> dict[str, list[int]]:
        return {**self.vision_model.structure_unit_parameters(), **self.text_model.structure_unit_parameters()}

    def prune_plan(self, structure_masks: StructureMasks, pad_to_multiple_of: int = 1) -> PrunePlan:
        """The pruned replacement of every masked module of both encoders; changes nothing (see `prune`)."""
        return self.vision_model.prune_plan(structure_masks, pad_to_multiple_of) + self.text_model.prune_plan(
            structure_masks, pad_to_multiple_of
        )

    def record_sizes(self) -> None:
        self.vision_model.record_sizes()
        self.text_model.record_sizes()

    def prune(self, structure_masks: StructureMasks, pad_to_multiple_of: int = 1) -> None:
        check_pad_multiple(pad_to_multiple_of)
        check_prunable_masks(structure_masks, self.structure_sizes(), type(self).__name__)
        self._own_config()  # first: the pruned modules are built with the model's own config
        commit_prune_plan(self.prune_plan(structure_masks, pad_to_multiple_of))
        self.record_sizes()


# --------------------------------------------------------------------------------------------------------------
# Heads and the pre-training model
# --------------------------------------------------------------------------------------------------------------


class EfficientVLMITMHead(nn.Sequential):
    """X-VLM's matching head: Linear(hidden, 2 hidden) -> LayerNorm -> GELU -> Linear(2 hidden, 2)."""

    def __init__(self, hidden_size: int, num_outputs: int = 2) -> None:
        super().__init__(
            nn.Linear(hidden_size, hidden_size * 2),
            nn.LayerNorm(hidden_size * 2),
            nn.GELU(),
            nn.Linear(hidden_size * 2, num_outputs),
        )


class EfficientVLMLMHead(nn.Module):
    """BERT's LM prediction head: dense -> activation -> LayerNorm -> decoder tied to the word embeddings."""

    def __init__(self, config: EfficientVLMTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) -> (batch, seq, vocab) logits."""
        return self.decoder(self.LayerNorm(self.activation(self.dense(hidden_states))))


# --------------------------------------------------------------------------------------------------------------
# ITC + ITM, shared by every model that trains image-text matching (pre-training, retrieval)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EfficientVLMTaskOutput(ModelOutput):
    """
    The fields every task model's output starts with.

    loss (`torch.FloatTensor` of shape `()`):
        The task loss, when computed.
    logits (`torch.FloatTensor`):
        The task prediction (its shape is documented by each task's output).
    vision_output, text_output ([`EncoderOutput`]): the vision encoder on the images, the text layers on the texts.
    fusion_output ([`EncoderOutput`]): the fusion layers.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    vision_output: EncoderOutput | None = None
    text_output: EncoderOutput | None = None
    fusion_output: EncoderOutput | None = None


@dataclass
class EfficientVLMImageTextMatchingOutput(ModelOutput):
    """
    The fields of X-VLM's ITC + ITM with hard negatives, shared by the outputs of every model that trains them.

    loss (`torch.FloatTensor` of shape `()`):
        The model's loss: `loss_itc + loss_itm`, plus any other term the model computes.
    loss_itc, loss_itm (`torch.FloatTensor` of shape `()`):
        Image-text contrastive and image-text matching losses (`None` when not computed).
    logits_per_image (`torch.FloatTensor` of shape `(batch_size, batch_size)`):
        ITC similarities divided by the ITC temperature.
    itm_logits (`torch.FloatTensor` of shape `((1 + 2 n) * batch_size, 2)`, n = `itm_negatives_per_pair`):
        Matching logits of the positive pairs, then (image, hard negative text), then (hard negative image, text).
    itm_labels (`torch.LongTensor` of shape `((1 + 2 n) * batch_size,)`):
        1 for the positive pairs, 0 for the negatives; -100 (left out of the loss) for a "negative" of the same
        image, drawn only when the whole batch shows one image.
    negative_text_index, negative_image_index (`torch.LongTensor` of shape `(n * batch_size,)`):
        The hard negatives: entry `k * batch_size + i` is the index of image i's k-th negative text, and of text
        i's k-th negative image; pass them back as `itm_negatives` to reuse them (e.g. for a teacher).
    image_embeds, text_embeds (`torch.FloatTensor` of shape `(batch_size, embed_dim)`):
        L2-normalised ITC embeddings.
    itc_temperature (`torch.FloatTensor` of shape `()`, or `(1,)` while trained under DeepSpeed / FSDP):
        The (clamped) ITC temperature that divides the similarities. Read in the forward, where sharded engines
        hold the whole weight, so a trainer can recompute similarities over gathered embeddings.
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itm_labels: torch.LongTensor | None = None
    negative_text_index: torch.LongTensor | None = None
    negative_image_index: torch.LongTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    itc_temperature: torch.FloatTensor | None = None


@dataclass
class EfficientVLMContrastiveMatchingOutput(EfficientVLMImageTextMatchingOutput):
    """
    The fields of [`EfficientVLMImageTextMatchingOutput`], and:

    itm_fusion_output ([`EncoderOutput`]): fusion layers on the (1 + 2n) * batch_size ITM pairs.
    """

    itm_fusion_output: EncoderOutput | None = None


def itc_embedding(projection: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """L2-normalised ITC embedding (batch, embed_dim) of the [CLS] token of `states` (batch, seq, hidden), in float32
    whatever the weights' dtype: unit vectors in bfloat16 (8 bits of mantissa) give cosine similarities so coarse that
    a retrieval ranking ties and reorders."""
    return F.normalize(projection(states[:, 0]).float(), dim=-1)


def image_text_matching_logits(
    backbone: EfficientVLMModel,
    itm_head: nn.Module,
    text_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_states: torch.Tensor,
    structure_masks: StructureMasks | None = None,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
    image_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, EncoderOutput]:
    """Fuses each text (batch, seq, hidden) with its image (batch, image_len, vision_hidden), or with image
    `image_index[i]` when given (see [`EfficientVLMModel.fuse`]), and applies the ITM head to the fused [CLS].
    Returns the logits (batch, 2) and the fusion layers' output."""
    fusion = backbone.fuse(
        text_states,
        attention_mask,
        image_states,
        structure_masks=structure_masks,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        image_index=image_index,
    )
    return itm_head(fusion.last_hidden_state[:, 0]), fusion


def itm_pair_texts(
    texts: torch.Tensor, negative_text_index: torch.Tensor, negative_texts: torch.Tensor | None = None
) -> torch.Tensor:
    """`texts` (batch, ...) (states or attention masks) row by row in the order of the ITM pairs: each pair's own
    text, then image i's negative texts (`negative_text_index` (n * batch,) into `texts` followed by
    `negative_texts`, the caption negatives), then each text again once for each of its n negative images."""
    per_pair = negative_text_index.shape[0] // texts.shape[0]
    pool = texts if negative_texts is None else torch.cat([texts, negative_texts])
    return torch.cat([texts, pool[negative_text_index], texts.repeat(per_pair, *([1] * (texts.dim() - 1)))])


def use_caption_negatives(
    negative_text_index: torch.Tensor, negative_image_index: torch.Tensor, share: float, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replaces, with probability `share` per image, image i's (first) in-batch negative text by its caption negative
    (index `batch + i`, see [`image_text_contrastive_matching`]); `batch`: the images (pairs) of the batch."""
    first = negative_text_index[:batch]
    chosen = torch.rand(batch, device=negative_text_index.device) < share
    own = torch.arange(batch, batch * 2, device=negative_text_index.device)
    return torch.cat([torch.where(chosen, own, first), negative_text_index[batch:]]), negative_image_index


def encode_caption_negatives(
    backbone: EfficientVLMModel,
    input_ids: torch.Tensor,
    itm_negatives: tuple[torch.Tensor, torch.Tensor] | None,
    itm_negative_input_ids: torch.Tensor | None,
    itm_negative_attention_mask: torch.Tensor | None,
    structure_masks: StructureMasks | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The text states (batch, seq, hidden) and padding mask (batch, seq) of a batch's caption negatives
    (`itm_negative_input_ids`, one per pair, padded like `input_ids`), for [`image_text_contrastive_matching`];
    (None, None) when they cannot be used: none given, or none drawn (`itm_caption_negatives` is 0) and none named
    by `itm_negatives` given back (a teacher scoring its student's pairs: text indices >= batch)."""
    if itm_negative_input_ids is None:
        return None, None
    named = itm_negatives is not None and int(itm_negatives[0].max()) >= input_ids.shape[0]
    if not (named or (itm_negatives is None and backbone.config.itm_caption_negatives > 0)):
        return None, None
    if itm_negative_input_ids.shape != input_ids.shape:
        raise ValueError(
            f"`itm_negative_input_ids` must be shaped like `input_ids` {tuple(input_ids.shape)}; got "
            f"{tuple(itm_negative_input_ids.shape)}."
        )
    if itm_negative_attention_mask is None:
        itm_negative_attention_mask = torch.ones_like(itm_negative_input_ids)
    states = backbone.encode_text(itm_negative_input_ids, itm_negative_attention_mask, structure_masks)
    return states.last_hidden_state, itm_negative_attention_mask


def image_text_contrastive_matching(
    backbone: EfficientVLMModel,
    itm_head: nn.Module,
    itc_loss: ImageTextContrastiveLoss,
    image_states: torch.Tensor,
    text_states: torch.Tensor,
    attention_mask: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    itm_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
    structure_masks: StructureMasks | None = None,
    output_attentions: bool = False,
    output_hidden_states: bool = False,
    compute_loss: bool = True,
    input_ids: torch.Tensor | None = None,
    negative_text_states: torch.Tensor | None = None,
    negative_attention_mask: torch.Tensor | None = None,
) -> EfficientVLMContrastiveMatchingOutput:
    """X-VLM's ITC and ITM with hard negatives on encoded images (batch, image_len, vision_hidden) and texts
    (batch, seq, hidden).

    `image_ids` (batch,) make texts of the same image positives for ITC and never negatives for ITM;
    `itm_negatives = (negative_text_index, negative_image_index)` are reused instead of sampled (e.g. a
    teacher scoring the student's negatives). With `input_ids` (batch, seq) and the config's
    `itm_exclude_identical_texts`, a text identical to image i's own text is never image i's negative.

    `negative_text_states` (batch, seq, hidden) with `negative_attention_mask`: a caption negative per pair (a text
    that is false of image i, e.g. its own caption with one attribute changed). With the config's
    `itm_caption_negatives` share s > 0, the negative text of each image is its caption negative with probability
    s (instead of an in-batch text); `negative_text_index` then indexes the texts followed by the caption
    negatives (`batch + i` is the caption negative of pair i), as `itm_negatives` given back expect.

    Under `torch.distributed`, in training mode, `itc_loss` gathers the embeddings and image ids of every process
    (global negatives, the same loss on every process); `logits_per_image` and the ITM hard negatives stay
    per-process (the local batch).
    """
    image_embeds = itc_embedding(backbone.vision_proj, image_states)
    text_embeds = itc_embedding(backbone.text_proj, text_states)
    itc_temperature = backbone.itc_temperature
    logits_per_image = image_embeds @ text_embeds.t() / itc_temperature
    local = getattr(backbone.config, "itc_local_gradient", False)
    loss_itc = itc_loss(image_embeds, text_embeds, itc_temperature, image_ids, local) if compute_loss else None

    # ITM: positives, then each image with a hard negative text, then each text with a hard negative image.
    # Hard negatives are sampled per process, from the local batch (the fusion pass needs their states here).
    if itm_negatives is None:
        same_text = None
        if input_ids is not None and backbone.config.itm_exclude_identical_texts:
            same_text = identical_texts(input_ids, attention_mask)
        itm_negatives = sample_hard_negatives(
            logits_per_image,
            image_ids,
            random_fraction=backbone.config.itm_random_negatives,
            same_text=same_text,
            num_negatives=backbone.config.itm_negatives_per_pair,
        )
        share = backbone.config.itm_caption_negatives
        if negative_text_states is not None and share > 0:
            itm_negatives = use_caption_negatives(*itm_negatives, share, batch=text_states.shape[0])
    negative_text_index, negative_image_index = itm_negatives
    batch = text_states.shape[0]
    # Negatives per pair, from the indices (given `itm_negatives` may come from a model with another setting).
    per_pair = negative_text_index.shape[0] // batch
    if (
        per_pair < 1
        or negative_text_index.shape[0] != per_pair * batch
        or negative_image_index.shape != negative_text_index.shape
    ):
        raise ValueError(
            f"`itm_negatives` must hold n * batch ({batch}) negative text and image indices each; got "
            f"{tuple(negative_text_index.shape)} and {tuple(negative_image_index.shape)}."
        )
    if negative_text_states is not None:
        if negative_text_states.shape != text_states.shape or negative_attention_mask is None:
            raise ValueError(
                "Caption negatives need `negative_attention_mask` and states shaped like the texts' "
                f"{tuple(text_states.shape)}; got {tuple(negative_text_states.shape)}."
            )
    elif int(negative_text_index.max()) >= batch:
        raise ValueError(
            f"`itm_negatives` name caption negatives (text index >= batch size {batch}); pass the caption "
            "negatives (`itm_negative_input_ids`) they were drawn from."
        )
    # Pairs: (image i, text i), (image i, each negative text), (each negative image, text i). Each image is given
    # once, so the fusion computes its cross-attention keys and values once for all its pairs.
    own_images = torch.arange(batch, device=image_states.device)
    itm_logits, itm_fusion = image_text_matching_logits(
        backbone,
        itm_head,
        itm_pair_texts(text_states, negative_text_index, negative_text_states),
        itm_pair_texts(attention_mask, negative_text_index, negative_attention_mask),
        image_states,
        structure_masks,
        output_attentions,
        output_hidden_states,
        image_index=torch.cat([own_images, own_images.repeat(per_pair), negative_image_index.to(own_images.device)]),
    )
    negative_labels = itm_negative_labels(image_ids, negative_text_index, negative_image_index, batch)
    itm_labels = torch.cat([torch.ones_like(own_images), negative_labels.to(own_images.device)]).to(itm_logits.device)
    loss_itm = F.cross_entropy(itm_logits, itm_labels) if compute_loss else None
    return EfficientVLMContrastiveMatchingOutput(
        loss=loss_itc + loss_itm if compute_loss else None,
        loss_itc=loss_itc,
        loss_itm=loss_itm,
        logits_per_image=logits_per_image,
        itm_logits=itm_logits,
        itm_labels=itm_labels,
        negative_text_index=negative_text_index,
        negative_image_index=negative_image_index,
        image_embeds=image_embeds,
        text_embeds=text_embeds,
        itc_temperature=itc_temperature,
        itm_fusion_output=itm_fusion,
    )


@dataclass
class EfficientVLMForPreTrainingOutput(EfficientVLMContrastiveMatchingOutput):
    """
    The fields of [`EfficientVLMContrastiveMatchingOutput`] (`loss` sums every term whose inputs were given),
    and:

    loss_mlm (`torch.FloatTensor` of shape `()`):
        Masked language modelling loss.
    loss_bbox, loss_giou (`torch.FloatTensor` of shape `()`):
        Grounding losses (L1 and generalised IoU), when `target_bbox` is given.
    mlm_logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        Predictions on the masked text.
    vision_output, text_output ([`EncoderOutput`]): encoders on the images and the clean texts.
    mlm_text_output, mlm_fusion_output ([`EncoderOutput`]): text and fusion layers on the masked texts.
    """

    loss_mlm: torch.FloatTensor | None = None
    loss_bbox: torch.FloatTensor | None = None
    loss_giou: torch.FloatTensor | None = None
    mlm_logits: torch.FloatTensor | None = None
    vision_output: EncoderOutput | None = None
    text_output: EncoderOutput | None = None
    mlm_text_output: EncoderOutput | None = None
    mlm_fusion_output: EncoderOutput | None = None


class EfficientVLMForPreTraining(EfficientVLMPreTrainedModel):
    """X-VLM pre-training: ITC, ITM with hard negatives and MLM on the fused text."""

    auto_classes = ("AutoModelForPreTraining",)

    _tied_weights_keys = {"mlm_head.decoder.weight": "efficientvlm.text_model.embeddings.word_embeddings.weight"}
    lm_head_name = "mlm_head"

    def __init__(self, config: EfficientVLMConfig) -> None:
        super().__init__(config)
        self.efficientvlm = EfficientVLMModel(config)
        self.itm_head = EfficientVLMITMHead(config.text_config.hidden_size)
        self.mlm_head = EfficientVLMLMHead(config.text_config)
        # X-VLM's grounding head: a box (cx, cy, w, h) for the region a text describes.
        self.bbox_head = EfficientVLMITMHead(config.text_config.hidden_size, num_outputs=4)
        self.itc_loss = ImageTextContrastiveLoss()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        itm_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
        itm_negative_input_ids: torch.Tensor | None = None,
        itm_negative_attention_mask: torch.Tensor | None = None,
        target_bbox: torch.Tensor | None = None,
        target_bbox_mask: torch.Tensor | None = None,
        structure_masks: StructureMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> EfficientVLMForPreTrainingOutput:
        """
        pixel_values: (batch, channels, height, width); input_ids / attention_mask: (batch, seq) clean texts;
        mlm_input_ids / mlm_labels: (batch, seq) masked texts and their targets (-100 elsewhere), for MLM;
        image_ids: (batch,) optional, texts of the same image are positives for ITC and never negatives;
        itm_negatives: optional `(negative_text_index, negative_image_index)` to reuse instead of sampling;
        itm_negative_input_ids / itm_negative_attention_mask: (batch, seq) optional, a caption negative per text (a
        text false of its image, padded like `input_ids`), image i's ITM negative text with probability
        `config.itm_caption_negatives` (see [`image_text_contrastive_matching`]);
        target_bbox: (batch, 4) optional normalised (cx, cy, w, h) box each text describes, for grounding;
        target_bbox_mask: (batch,) optional bool, the texts that describe a region (the others' boxes are ignored):
        X-VLM's region texts mixed with whole-image captions in one batch (`trainers.data.PretrainingDataset`).
        """
        if target_bbox is not None and target_bbox.shape != (input_ids.shape[0], 4):
            raise ValueError(
                f"`target_bbox` must have shape ({input_ids.shape[0]}, 4) (a box per text); got "
                f"{tuple(target_bbox.shape)}."
            )
        if target_bbox_mask is not None and (target_bbox is None or target_bbox_mask.shape != (input_ids.shape[0],)):
            raise ValueError(
                f"`target_bbox_mask` needs `target_bbox` and shape ({input_ids.shape[0]},); got "
                f"{None if target_bbox_mask is None else tuple(target_bbox_mask.shape)} with target_bbox "
                f"{'missing' if target_bbox is None else 'given'}."
            )
        model = self.efficientvlm
        flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        vision, text, attention_mask = model.encode_image_text(
            pixel_values,
            input_ids,
            attention_mask,
            structure_masks,
            interpolate_pos_encoding=interpolate_pos_encoding,
            **flags,
        )
        image_states, text_states = vision.last_hidden_state, text.last_hidden_state
        negative_states, negative_mask = encode_caption_negatives(
            model, input_ids, itm_negatives, itm_negative_input_ids, itm_negative_attention_mask, structure_masks
        )

        matching = image_text_contrastive_matching(
            model,
            self.itm_head,
            self.itc_loss,
            image_states,
            text_states,
            attention_mask,
            image_ids=image_ids,
            itm_negatives=itm_negatives,
            structure_masks=structure_masks,
            input_ids=input_ids,
            negative_text_states=negative_states,
            negative_attention_mask=negative_mask,
            **flags,
        )
        itm_fusion, batch = matching.itm_fusion_output, input_ids.shape[0]

        # MLM on the masked text, fused with its image
        loss_mlm = mlm_logits = mlm_text = mlm_fusion = None
        if mlm_input_ids is not None:
            mlm_text = model.encode_text(mlm_input_ids, attention_mask, structure_masks, **flags)
            mlm_fusion = model.fuse(
                mlm_text.last_hidden_state, attention_mask, image_states, structure_masks=structure_masks, **flags
            )
            mlm_logits = self.mlm_head(mlm_fusion.last_hidden_state)
            if mlm_labels is not None:
                # Cross-entropy over no target is NaN, and Trainer's NaN filter would log the step's loss as 0.
                if not torch.compiler.is_compiling() and not (mlm_labels != -100).any():
                    raise ValueError(
                        f"`mlm_labels` has no masked position (all -100) in this batch of {batch}: the MLM loss "
                        "would be NaN. Each batch needs at least one text with a token to mask (are all captions "
                        "empty?)."
                    )
                loss_mlm = masked_language_modeling_loss(mlm_logits, mlm_labels)

        # Grounding: the positive pairs' fused [CLS] regresses the described box
        loss_bbox = loss_giou = None
        if target_bbox is not None:
            predicted_bbox = self.bbox_head(itm_fusion.last_hidden_state[:batch, 0]).sigmoid()
            loss_bbox, loss_giou = box_regression_loss(
                predicted_bbox,
                target_bbox.to(predicted_bbox.dtype),
                None if target_bbox_mask is None else target_bbox_mask.bool(),
            )

        loss = matching.loss
        for term in (loss_mlm, loss_bbox, loss_giou):
            if term is not None:
                loss = loss + term
        return EfficientVLMForPreTrainingOutput(
            **{**matching, "loss": loss},
            loss_mlm=loss_mlm,
            loss_bbox=loss_bbox,
            loss_giou=loss_giou,
            mlm_logits=mlm_logits,
            vision_output=vision,
            text_output=text,
            mlm_text_output=mlm_text,
            mlm_fusion_output=mlm_fusion,
        )


__all__ = [
    "DECODER_MASK_KEYS",
    "MASK_KEYS",
    "TEXT_MASK_KEYS",
    "VISION_MASK_KEYS",
    "EfficientVLMContrastiveMatchingOutput",
    "EfficientVLMImageTextMatchingOutput",
    "EfficientVLMTaskOutput",
    "encode_caption_negatives",
    "image_text_contrastive_matching",
    "image_text_matching_logits",
    "itm_pair_texts",
    "itc_embedding",
    "attention_head_parameters",
    "commit_prune_plan",
    "decoder_stack_masks",
    "decoder_structures",
    "check_finite_masks",
    "check_prunable_masks",
    "check_text_length",
    "ffn_neuron_parameters",
    "EfficientVLMAttention",
    "EfficientVLMForPreTraining",
    "EfficientVLMForPreTrainingOutput",
    "EfficientVLMITMHead",
    "EfficientVLMLMHead",
    "EfficientVLMModel",
    "EfficientVLMModelOutput",
    "EfficientVLMPreTrainedModel",
    "EfficientVLMTextModel",
    "EfficientVLMVisionModel",
    "EncoderOutput",
    "StructureMasks",
]
