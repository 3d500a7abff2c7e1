"""Offline test helpers for models: uneven physical pruning of a tiny model; a tiny retrieval model with non-zero
biases and its scores of texts sharing images."""

from __future__ import annotations

import torch

from trainers.pruning.padding import PAD_TO_MULTIPLE_OF


def prune_unevenly(
    model: torch.nn.Module, seed: int = 0, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF
) -> torch.nn.Module:
    """Prunes `model` in place and returns it: the first layer of every stack loses all its heads and FFN neurons
    (empty blocks), the others lose about half, at random (seeded); FFN widths padded with zero neurons as every
    pruning path of the project pads them (`pad_to_multiple_of`)."""
    generator = torch.Generator().manual_seed(seed)
    model.prune(
        {
            key: [
                torch.zeros(n) if i == 0 else (torch.rand(n, generator=generator) > 0.5).float()
                for i, n in enumerate(sizes)
            ]
            for key, sizes in model.structure_sizes().items()
        },
        pad_to_multiple_of=pad_to_multiple_of,
    )
    return model


def tiny_retrieval_model(seed: int = 0) -> torch.nn.Module:
    """The tiny preset's retrieval model in eval mode, seeded, with non-zero biases everywhere (the initializer zeroes
    them; folding or fusing them must matter)."""
    from modeling_efficientvlm import EfficientVLMConfig, EfficientVLMForImageTextRetrieval

    torch.manual_seed(seed)
    model = EfficientVLMForImageTextRetrieval(EfficientVLMConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.5)
    return model


def shared_image_scores(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """ITM logits of 5 texts of 8 tokens (one padded) sharing 2 images (grouped cross-attention), the image
    embeddings and the text embeddings, on seeded inputs."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=generator)
    input_ids = torch.randint(5, config.text_config.vocab_size, (5, 8), generator=generator)
    attention_mask = torch.ones(5, 8, dtype=torch.long)
    attention_mask[1, -3:] = 0
    images, image_embeds = model.embed_images(pixels)
    texts, text_embeds = model.embed_texts(input_ids, attention_mask)
    logits = model.itm_scores(images, texts, attention_mask, score="logit", image_index=torch.tensor([0, 0, 1, 1, 1]))
    return logits, image_embeds, text_embeds
