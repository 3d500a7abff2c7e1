"""Pre-training losses of X-VLM / EfficientVLM, kept apart from the models (open_clip's `loss.py` style).

They live in the model package (not in `trainers/`) because `EfficientVLMForPreTraining.forward` computes
them, and a model saved for remote code must carry every file its forward needs.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def distributed_world_size() -> int:
    """The number of processes of the initialised default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_batch(tensor: torch.Tensor, local_gradient: bool = False) -> torch.Tensor:
    """Concatenates `tensor` (local_batch, ...) of every process along dim 0, in rank order: (global_batch, ...).

    Differentiable: the backward of `torch.distributed.nn.functional.all_gather` sums, across processes, the
    gradients every process's loss sends to each slice, so a loss computed identically on every process over
    the gathered batch, with DDP averaging the gradients, gives the gradients of one process on the global
    batch. With `local_gradient`, only this process's own slice carries a gradient, its own loss's (X-VLM's
    `AllGather`): after DDP's average, 1/N of those with N processes. Works under gloo and NCCL; local batches
    may differ in size (padded for the collective, then cut). Without an initialised process group, or with one
    process, returns `tensor` itself. Every process must call it (it is a collective).
    """
    world_size = distributed_world_size()
    if world_size == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = tensor.contiguous()
    if padded.shape[0] < max(sizes):
        padding = padded.new_zeros((max(sizes) - padded.shape[0], *padded.shape[1:]))
        padded = torch.cat([padded, padding])
    if tensor.requires_grad and not local_gradient:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            # Deprecated in favour of the private `_functional_collectives`; still the public autograd gather.
            warnings.simplefilter("ignore", FutureWarning)
            parts = all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(parts, padded.detach())
        if tensor.requires_grad:  # local_gradient: this process's own slice is its tensor, the others constants
            parts[dist.get_rank()] = padded
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def same_image_targets(image_ids: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
    """Boolean (batch, batch) matrix: True where image i and text j show the same image.

    Without `image_ids`, each image matches only its own text (the diagonal).
    """
    if image_ids is None:
        return torch.eye(batch_size, dtype=torch.bool, device=device)
    image_ids = image_ids.view(-1, 1)
    return image_ids == image_ids.t()


class ImageTextContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over image and text embeddings (ITC).

    Texts of the same image (equal `image_ids`) all count as positives, with the target mass shared
    between them, as in X-VLM's retrieval fine-tuning.

    In training mode under `torch.distributed` (DDP, `torchrun`), the embeddings and image ids of every
    process are gathered first ([`gather_batch`], with gradients): the negatives are those of the global batch,
    as X-VLM's, and every process computes the same loss over it (without image ids, the positives are the
    global batch's diagonal), whose gradients are the global batch's (X-VLM's gather keeps each process's own
    slice only: the encoders get 1/N of them with N processes; `local_gradient` does the same). In eval mode, or
    in one process, only the local batch is used.
    """

    def get_logits(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, itc_temperature: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`image_embeds`, `text_embeds`: (batch, embed_dim), L2-normalised. Returns (i2t, t2i) logits."""
        logits_per_image = image_embeds @ text_embeds.t() / itc_temperature
        return logits_per_image, logits_per_image.t()

    def get_ground_truth(self, image_ids: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
        targets = same_image_targets(image_ids, batch_size, device).float()
        return targets / targets.sum(dim=1, keepdim=True)

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        itc_temperature: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        local_gradient: bool = False,
    ) -> torch.Tensor:
        """`local_gradient`: X-VLM's gather, each process's own slice's gradient only (see [`gather_batch`])."""
        if self.training:
            image_embeds = gather_batch(image_embeds, local_gradient)
            text_embeds = gather_batch(text_embeds, local_gradient)
            image_ids = None if image_ids is None else gather_batch(image_ids)
        logits_per_image, logits_per_text = self.get_logits(image_embeds, text_embeds, itc_temperature)
        targets = self.get_ground_truth(image_ids, image_embeds.shape[0], image_embeds.device)
        loss_i2t = -(F.log_softmax(logits_per_image, dim=1) * targets).sum(dim=1).mean()
        loss_t2i = -(F.log_softmax(logits_per_text, dim=1) * targets).sum(dim=1).mean()
        return (loss_i2t + loss_t2i) / 2


def identical_texts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (batch, batch) matrix: True where texts i and j are the same token sequence (padding ignored)."""
    if attention_mask is not None:
        input_ids = input_ids.masked_fill(attention_mask == 0, -1)
    return (input_ids.unsqueeze(1) == input_ids.unsqueeze(0)).all(dim=-1)


def sample_hard_negatives(
    logits_per_image: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    random_fraction: float = 0.0,
    same_text: torch.Tensor | None = None,
    num_negatives: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples `num_negatives` hard negative texts per image and as many hard negative images per text.

    Negatives are drawn in proportion to the softmax of the ITC similarities (X-VLM), never from the same image.
    With `random_fraction` f > 0 they are drawn from the mixture (1 - f) * that distribution + f * uniform over
    the other images' pairs: a model trained from scratch has ITC similarities that single out exactly the pairs
    its fusion cannot yet tell apart, so with hard negatives alone its ITM head only learns the class prior;
    the random share teaches it to look at the image first.

    Args:
        logits_per_image: (batch, batch) image-to-text ITC logits.
        image_ids: (batch,) optional ids; texts of the same image are never negatives, unless the whole batch
            shows one image (then any pair is drawn; [`itm_negative_labels`] marks it).
        random_fraction: share of uniformly drawn negatives, in [0, 1] (0: X-VLM's hard negatives only).
        same_text: (batch, batch) optional, True where texts i and j are identical ([`identical_texts`]): a text
            identical to image i's own text describes image i too, so it is never image i's negative (and image
            j is never a negative of a text identical to text j's). Short, generic captions ("a picture of two
            shapes", "a man riding a horse") repeat across images; drawn as negatives they are true matches
            labelled "no match". A row whose every other text is identical to its own keeps X-VLM's rule.
        num_negatives: negatives per image and per text, distinct where the row has that many candidates (else
            drawn with replacement).

    Returns:
        `(negative_text_index, negative_image_index)`, each (num_negatives * batch,), draw by draw: entry
        `k * batch + i` is the index of image i's k-th negative text, and of text i's k-th negative image.
    """
    if not 0.0 <= random_fraction <= 1.0:
        raise ValueError(f"`random_fraction` (ITM random negatives) must be in [0, 1]; got {random_fraction}.")
    if num_negatives < 1:
        raise ValueError(f"`num_negatives` (ITM negatives per pair) must be >= 1; got {num_negatives}.")
    batch_size = logits_per_image.shape[0]
    positives = same_image_targets(image_ids, batch_size, logits_per_image.device)
    # A batch that shows one image only (an epoch's last batch of region captions, say) has no negative to draw:
    # its rows draw from every pair, and [`itm_negative_labels`] leaves such a same-image pair out of the loss.
    positives = positives & ~positives.all(dim=1, keepdim=True)
    positives_t2i = positives.t()
    if same_text is not None:
        if same_text.shape != positives.shape:
            raise ValueError(f"`same_text` must have shape {tuple(positives.shape)}; got {tuple(same_text.shape)}.")

        # Text j identical to image i's own text: (i, j) is a match. A row left without a negative keeps image ids.
        def widen(matches: torch.Tensor, identical: torch.Tensor) -> torch.Tensor:
            widened = matches | identical
            return torch.where(widened.all(dim=1, keepdim=True), matches, widened)

        positives, positives_t2i = widen(positives, same_text), widen(positives_t2i, same_text.t())
    return _sample_negatives(
        logits_per_image.detach(), positives, positives_t2i, generator, random_fraction, num_negatives
    )


def itm_negative_labels(
    image_ids: torch.Tensor | None,
    negative_text_index: torch.Tensor,
    negative_image_index: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """ITM labels (2 * n * batch,) of the negative pairs in the order of the ITM pairs (each image with its negative
    texts, then each text with its negative images; see [`sample_hard_negatives`]): 0, or -100 (ignored by the
    cross-entropy) for a drawn pair that shows the same image, which only a batch of one image yields. Caption
    negatives (text index >= `batch_size`) are always negatives."""
    device = negative_text_index.device
    same = same_image_targets(image_ids, batch_size, device)
    rows = torch.arange(batch_size, device=device).repeat(negative_text_index.shape[0] // batch_size)
    in_batch = negative_text_index < batch_size
    same_text = same[rows, negative_text_index.clamp(max=batch_size - 1)] & in_batch
    same_image = same[negative_image_index.to(device), rows]
    return torch.where(torch.cat([same_text, same_image]), -100, 0)


@torch.no_grad()
def _sample_negatives(
    logits_per_image: torch.Tensor,
    positives: torch.Tensor,
    positives_t2i: torch.Tensor,
    generator: torch.Generator | None,
    random_fraction: float = 0.0,
    num_negatives: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    def weights(logits: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
        hard = (F.softmax(logits.float(), dim=1) + 1e-5).masked_fill(matches, 0)
        if random_fraction == 0.0:
            return hard
        uniform = (~matches).float()
        hard, uniform = (w / w.sum(dim=1, keepdim=True) for w in (hard, uniform))
        return (1.0 - random_fraction) * hard + random_fraction * uniform

    def draw(weights: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
        if num_negatives == 1:
            return torch.multinomial(weights, 1, generator=generator).squeeze(1)
        # Distinct negatives where every row has enough candidates (one sync, only for several negatives).
        replacement = bool((~matches).sum(dim=1).min() < num_negatives)
        drawn = torch.multinomial(weights, num_negatives, replacement=replacement, generator=generator)
        return drawn.t().reshape(-1)  # draw by draw: (num_negatives * batch,)

    negative_text_index = draw(weights(logits_per_image, positives), positives)
    negative_image_index = draw(weights(logits_per_image.t(), positives_t2i), positives_t2i)
    return negative_text_index, negative_image_index


def masked_language_modeling_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over masked positions. `logits`: (batch, seq, vocab); `labels`: (batch, seq), -100 ignored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_regression_loss(
    predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """X-VLM's grounding loss: L1 and generalised IoU between (batch, 4) boxes given as normalised
    (center x, center y, width, height). Returns `(l1, giou)` means over the rows of `mask` (batch,) bool, all
    rows without one; with no row in `mask`, zeros that still reach every input (so a step without regions keeps
    the box head in the graph, as distributed training needs)."""
    loss_l1 = F.l1_loss(predicted, target, reduction="none").sum(dim=1)
    pred, true = _cxcywh_to_xyxy(predicted), _cxcywh_to_xyxy(target)
    area_pred = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(dim=1)
    area_true = (true[:, 2:] - true[:, :2]).clamp(min=0).prod(dim=1)
    inter = (torch.min(pred[:, 2:], true[:, 2:]) - torch.max(pred[:, :2], true[:, :2])).clamp(min=0).prod(dim=1)
    union = area_pred + area_true - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.max(pred[:, 2:], true[:, 2:]) - torch.min(pred[:, :2], true[:, :2])).clamp(min=0).prod(dim=1)
    loss_giou = 1 - (iou - (hull - union) / hull.clamp(min=1e-6))
    if mask is None:
        return loss_l1.mean(), loss_giou.mean()
    count = mask.sum().clamp(min=1)
    # where(), not a product: a box-less row's target may be anything (zeros give a NaN-free but meaningless GIoU)
    return (torch.where(mask, loss_l1, 0).sum() / count, torch.where(mask, loss_giou, 0).sum() / count)
