"""Texts grouped by the image they cross-attend to, so cross-attention reads each image's keys and values in place.

Retrieval re-ranking scores k texts per image, VQA ranks k answers per question, ITM training scores each image
with its own and its negative texts: many rows of a batch cross-attend to the same encoder row. Indexing the keys
and values per text copies (texts, image_len, hidden) twice per fusion layer, a memory-bound copy that cost as
much as the fusion layers' matmuls in CPU retrieval. Attention of one query never looks at another query, so the
queries of texts sharing an image can instead sit end to end along one query axis and attend to that image's
keys and values once.

Groups are cut into blocks of at most `block_size` texts (the batch over the images it uses, rounded up), so a
few images shared by many texts do not pad every other image's block: the blocks hold fewer than 2 x (texts +
images used) texts' query rows, zero-padded, and only an image with more than one block has its keys and values
repeated, once per block.
"""

from __future__ import annotations

import torch


class EncoderGroups:
    """Rows of a batch (texts) grouped into blocks by the encoder row (image) each one cross-attends to.

    Args:
        index: (batch,) integers, the encoder row of each text (`EfficientVLMTextModel.forward`'s
            `encoder_index`).
        num_rows: encoder rows in all (rows no text uses get no block).

    Attributes:
        index: (batch,) the encoder row of each text.
        block, slot: (batch,) the block of each text and its place in it.
        block_size: texts per block (the last block of a row is zero-padded to it).
        block_rows: (num_blocks,) the encoder row of each block, or None when the blocks are the encoder rows
            themselves (every row used by exactly one block): keys and values are then used as computed.
        blocked: whether cross-attention uses the blocks. Only without autograd (inference: retrieval re-ranking,
            answer ranking), where it pays: a training step of `efficientvlm-small` (batch 8, three ITM pairs per
            image) ran alike either way, the demo's tiny models 4% slower with blocks; nor under `torch.compile`,
            whose graphs cannot depend on the texts per row. Otherwise the keys and values are copied per text.

    Built once per forward; reading the texts per row is its one host sync.
    """

    def __init__(self, index: torch.Tensor, num_rows: int) -> None:
        self.index = index
        self.blocked = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if not self.blocked:
            return
        batch, device = index.numel(), index.device
        counts = torch.bincount(index, minlength=num_rows)
        counts_here = counts.cpu()
        used = int((counts_here > 0).sum())
        self.block_size = max(1, -(-batch // max(used, 1)))
        blocks_here = -(-counts_here // self.block_size)  # blocks of each row, rounded up
        self.num_blocks = int(blocks_here.sum())
        self.block_rows = (
            None
            if bool((blocks_here == 1).all())
            else torch.repeat_interleave(torch.arange(num_rows), blocks_here).to(device)
        )
        # Each text's place among the texts of its row, in batch order: its block and slot follow.
        order = torch.argsort(index, stable=True)
        place = torch.empty_like(index)
        place[order] = torch.arange(batch, device=device) - (counts.cumsum(0) - counts)[index[order]]
        first_block = (blocks_here.cumsum(0) - blocks_here).to(device)
        self.block = first_block[index] + torch.div(place, self.block_size, rounding_mode="floor")
        self.slot = place % self.block_size

    def to_blocks(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, length, ...) -> (num_blocks, block_size * length, ...): each block's texts end to end,
        zero-padded."""
        batch, length, *rest = states.shape
        blocks = states.new_zeros(self.num_blocks, self.block_size, length, *rest)
        blocks[self.block, self.slot] = states
        return blocks.view(self.num_blocks, self.block_size * length, *rest)

    def from_blocks(self, blocks: torch.Tensor, length: int) -> torch.Tensor:
        """The inverse of `to_blocks`: (num_blocks, block_size * length, ...) -> (batch, length, ...)."""
        return blocks.reshape(self.num_blocks, self.block_size, length, *blocks.shape[2:])[self.block, self.slot]

    def rows_of_blocks(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """Per-encoder-row tensors (keys, values, their mask: (num_rows, ...)) -> one per block."""
        if rows is None or self.block_rows is None:
            return rows
        return rows.index_select(0, self.block_rows)

    def rows_of_texts(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """Per-encoder-row tensors -> one copy per text, (batch, ...): where the blocks are not used."""
        return None if rows is None else rows.index_select(0, self.index)


__all__ = ["EncoderGroups"]
