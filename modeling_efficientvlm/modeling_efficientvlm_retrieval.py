"""Image-text retrieval (X-VLM / EfficientVLM): ITC embeddings find candidates, ITM re-ranks the top k.

Training is X-VLM's retrieval fine-tuning: the ITC loss (texts of the same image are all positives) plus
ITM with hard negatives sampled from the ITC similarities. Evaluation embeds every image and text once,
keeps the top `k` candidates of every query by ITC similarity and scores them with the ITM head
(`itm_rerank_scores`); recall@K is computed by `trainers.evaluation.retrieval.retrieval_evaluate`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .checks_efficientvlm import warn_if_dropout_is_on
from .configuration_efficientvlm import EfficientVLMConfig
from .loss_efficientvlm import ImageTextContrastiveLoss
from .modeling_efficientvlm import (
    EfficientVLMContrastiveMatchingOutput,
    EfficientVLMImageTextMatchingOutput,
    EfficientVLMITMHead,
    EfficientVLMModel,
    EfficientVLMPreTrainedModel,
    EfficientVLMTaskOutput,
    StructureMasks,
    encode_caption_negatives,
    image_text_contrastive_matching,
    image_text_matching_logits,
    itc_embedding,
)

# Score of an (image, text) pair that is not among the top-k ITC candidates of its query (as in X-VLM).
NOT_RERANKED_SCORE = -100.0
# What the ITM head gives a pair (`itm_match_score`).
ITM_SCORES = ("probability", "log_odds", "logit")
# Re-ranking may also add the pair's ITC logit to its ITM log-odds (`itm_rerank_scores`).
ITM_ITC_SCORE = "log_odds+itc"
RERANK_SCORES = (*ITM_SCORES, ITM_ITC_SCORE)


def check_itm_score(score: str, name: str = "`score`", rerank: bool = False) -> None:
    """Raises a ValueError naming `name` (the argument or flag that gave it) unless `score` is one of `ITM_SCORES`,
    or with `rerank` of `RERANK_SCORES` (what can rank re-ranked candidates)."""
    allowed = RERANK_SCORES if rerank else ITM_SCORES
    if score not in allowed:
        raise ValueError(f"{name} must be one of {allowed}; got {score!r}.")


def itm_match_score(logits: torch.Tensor, score: str) -> torch.Tensor:
    """The matching score (pairs,) of ITM head logits (pairs, 2) ("no match", "match"), in float32:

    - `"probability"`: the match probability, softmax of both logits;
    - `"log_odds"`: the match log-odds, logit[1] - logit[0]: the probability's order without its rounding to 1.0
      (a fp32 softmax gives 1.0 to every pair with log-odds above ~17, which then tie);
    - `"logit"`: the raw match logit alone, what X-VLM (as ALBEF) ranks by. The cross-entropy of a 2-way head
      trains only the difference of its logits: the gradients of its last layer's two rows are opposite, so
      their sum stays where it was initialised, and the raw logit is half the trained log-odds plus half a
      projection of the head's hidden features onto that untrained direction.
    """
    check_itm_score(score)
    logits = logits.float()
    if score == "probability":
        return logits.softmax(dim=-1)[:, 1]
    return logits[:, 1] - logits[:, 0] if score == "log_odds" else logits[:, 1]


# --------------------------------------------------------------------------------------------------------------
# The retrieval model
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EfficientVLMImageTextRetrievalOutput(EfficientVLMImageTextMatchingOutput, EfficientVLMTaskOutput):
    """
    The fields of [`EfficientVLMTaskOutput`] and [`EfficientVLMImageTextMatchingOutput`], and `logits_per_text`.

    Always (training and inference):
    logits_per_image (`torch.FloatTensor` of shape `(num_images, num_texts)`):
        ITC cosine similarities divided by the ITC temperature (CLIP's scaling; softmax over texts gives
        zero-shot probabilities).
    logits_per_text (`torch.FloatTensor` of shape `(num_texts, num_images)`): its transpose.
    image_embeds (`(num_images, embed_dim)`), text_embeds (`(num_texts, embed_dim)`): L2-normalised ITC embeddings.
    vision_output, text_output ([`EncoderOutput`]): the encoders on the images and the texts.

    Training only (`return_loss=True` on a paired batch, see `forward`):
    loss (`torch.FloatTensor` of shape `()`): `loss_itc + loss_itm`.
    logits (`torch.FloatTensor` of shape `((1 + 2n) * batch_size, 2)`, n = `itm_negatives_per_pair`):
        The ITM logits (`itm_logits`), the task prediction a distiller matches.
    itm_logits, itm_labels, negative_text_index, negative_image_index: the ITM pairs with sampled hard negatives.
    fusion_output ([`EncoderOutput`]): the fusion layers on the (1 + 2n) * batch_size ITM pairs.
    """

    logits_per_text: torch.FloatTensor | None = None


class EfficientVLMForImageTextRetrieval(EfficientVLMPreTrainedModel):
    """X-VLM retrieval: ITC + ITM with hard negatives for training, ITC top-k + ITM re-ranking for search.

    Inference, as CLIP: `get_image_features` / `get_text_features` (L2-normalised ITC embeddings),
    `model(pixel_values, input_ids, attention_mask, return_loss=False)` scores M images against N texts
    (`logits_per_image` (M, N)); `itm_rerank_scores` re-ranks the top-k with the ITM head (X-VLM's search).
    Loaded with `pipeline("zero-shot-image-classification", ...)`, the ITC scores rank the candidate labels.

    Parameter names are those of [`EfficientVLMForPreTraining`], so a pre-training checkpoint loads with
    `from_pretrained` (its MLM and box heads are dropped).
    """

    auto_classes = ("AutoModelForZeroShotImageClassification",)

    # A pre-training checkpoint carries heads retrieval does not use.
    _keys_to_ignore_on_load_unexpected = [r"^mlm_head\.", r"^bbox_head\."]

    def __init__(self, config: EfficientVLMConfig) -> None:
        super().__init__(config)
        self.efficientvlm = EfficientVLMModel(config)
        self.itm_head = EfficientVLMITMHead(config.text_config.hidden_size)
        self.itc_loss = ImageTextContrastiveLoss()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        itm_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
        itm_negative_input_ids: torch.Tensor | None = None,
        itm_negative_attention_mask: torch.Tensor | None = None,
        structure_masks: StructureMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_loss: bool = True,
        interpolate_pos_encoding: bool = False,
    ) -> EfficientVLMImageTextRetrievalOutput:
        """
        pixel_values: (num_images, channels, height, width); input_ids / attention_mask / token_type_ids:
        (num_texts, seq).

        Training (`return_loss=True`, the default, which Trainer relies on to evaluate the loss) needs a paired
        batch: as many texts as images, text i describing image i. It adds ITC + ITM losses with hard negatives
        sampled from the ITC similarities (`loss`, `itm_logits`, ...). image_ids: (batch,) optional, texts of the
        same image are positives for ITC and never ITM negatives; itm_negatives: optional
        `(negative_text_index, negative_image_index)` to reuse instead of sampling; itm_negative_input_ids /
        itm_negative_attention_mask: (batch, seq) optional, a caption negative per pair (a text false of image i,
        padded like `input_ids`), which becomes image i's ITM negative text with probability
        `config.itm_caption_negatives` (see [`image_text_contrastive_matching`]).

        Inference (`return_loss=False`, images and texts in different numbers, as the zero-shot pipeline
        passes one image and N candidate texts, or a single pair without `image_ids` in eval mode): scores every
        image against every text with ITC only (`logits_per_image` (M, N), `logits_per_text` (N, M));
        deterministic, no fusion pass, no sampling.
        """
        num_images, num_texts = pixel_values.shape[0], input_ids.shape[0]
        # One pair in eval mode without image ids is a query (the zero-shot pipeline with a single label); with them
        # it is a batch of a dataset (the last one of a Trainer's evaluation), whose loss is asked for.
        training = (
            return_loss and num_images == num_texts and (self.training or num_images > 1 or image_ids is not None)
        )
        if not training and (itm_negatives is not None or itm_negative_input_ids is not None):
            raise ValueError(
                "`itm_negatives` and `itm_negative_input_ids` are training inputs: they need `return_loss=True` and "
                "one text per image; got "
                f"return_loss={return_loss}, {num_images} images and {num_texts} texts."
            )
        if training and image_ids is not None and image_ids.shape != (num_texts,):
            raise ValueError(f"`image_ids` must have shape ({num_texts},); got {tuple(image_ids.shape)}.")
        flags = dict(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        model = self.efficientvlm
        if not training:
            vision = model.encode_image(
                pixel_values, structure_masks, interpolate_pos_encoding=interpolate_pos_encoding, **flags
            )
            text = model.encode_text(input_ids, attention_mask, structure_masks, token_type_ids=token_type_ids, **flags)
            image_embeds = itc_embedding(model.vision_proj, vision.last_hidden_state)
            text_embeds = itc_embedding(model.text_proj, text.last_hidden_state)
            logits_per_image = image_embeds @ text_embeds.t() / model.itc_temperature
            return EfficientVLMImageTextRetrievalOutput(
                logits_per_image=logits_per_image,
                logits_per_text=logits_per_image.t(),
                image_embeds=image_embeds,
                text_embeds=text_embeds,
                vision_output=vision,
                text_output=text,
            )
        vision, text, attention_mask = model.encode_image_text(
            pixel_values,
            input_ids,
            attention_mask,
            structure_masks,
            interpolate_pos_encoding=interpolate_pos_encoding,
            token_type_ids=token_type_ids,
            **flags,
        )
        negative_states, negative_mask = encode_caption_negatives(
            model, input_ids, itm_negatives, itm_negative_input_ids, itm_negative_attention_mask, structure_masks
        )
        matching = image_text_contrastive_matching(
            model,
            self.itm_head,
            self.itc_loss,
            vision.last_hidden_state,
            text.last_hidden_state,
            attention_mask,
            image_ids=image_ids,
            itm_negatives=itm_negatives,
            structure_masks=structure_masks,
            input_ids=input_ids,
            negative_text_states=negative_states,
            negative_attention_mask=negative_mask,
            **flags,
        )
        fields = dict(matching)
        # The fusion pass over the ITM pairs is this task's `fusion_output`.
        fusion = fields.pop("itm_fusion_output")
        return EfficientVLMImageTextRetrievalOutput(
            **fields,
            logits=matching.itm_logits,
            logits_per_text=matching.logits_per_image.t(),
            vision_output=vision,
            text_output=text,
            fusion_output=fusion,
        )

    # -- retrieval scoring: embed once, ITC for candidates, ITM to re-rank ----------------------------------
    def embed_images(
        self,
        pixel_values: torch.Tensor,
        structure_masks: StructureMasks | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, channels, height, width) -> image tokens (batch, image_len, vision_hidden) for ITM and
        L2-normalised ITC embeddings (batch, embed_dim)."""
        states = self.efficientvlm.encode_image(
            pixel_values, structure_masks, interpolate_pos_encoding=interpolate_pos_encoding
        ).last_hidden_state
        return states, itc_embedding(self.efficientvlm.vision_proj, states)

    def embed_texts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        structure_masks: StructureMasks | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, seq) -> text states (batch, seq, hidden) for ITM and L2-normalised ITC embeddings
        (batch, embed_dim). `token_type_ids` (batch, seq), as the processor emits them with
        `return_token_type_ids=True`, are used as `forward` uses them (default 0)."""
        states = self.efficientvlm.encode_text(
            input_ids, attention_mask, structure_masks, token_type_ids=token_type_ids
        ).last_hidden_state
        return states, itc_embedding(self.efficientvlm.text_proj, states)

    @staticmethod
    def itc_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (num_images, num_texts) of L2-normalised ITC embeddings."""
        return image_embeds @ text_embeds.t()

    def itm_scores(
        self,
        image_states: torch.Tensor,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        structure_masks: StructureMasks | None = None,
        score: str = "probability",
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Matching score (pairs,) of each (image, text) pair: the ITM head's match probability
        (`score="probability"`), log-odds (`"log_odds"`) or raw match logit (`"logit"`, what X-VLM ranks by; see
        [`itm_match_score`]). Pair `i` is
        `(image_states[i], text_states[i])`, or `(image_states[image_index[i]], text_states[i])` with
        `image_index` (each distinct image then given once: its cross-attention keys and values are computed
        once for all its texts)."""
        check_itm_score(score)  # before the fusion pass
        logits, _ = image_text_matching_logits(
            self.efficientvlm,
            self.itm_head,
            text_states,
            attention_mask,
            image_states,
            structure_masks,
            image_index=image_index,
        )
        return itm_match_score(logits, score)

    def itc_logit_scale(self) -> float:
        """1 / the learned ITC temperature: turns a cosine similarity into the ITC logit the contrastive loss
        trained (`logits_per_image`)."""
        return 1.0 / self.efficientvlm.itc_temperature.item()

    @torch.no_grad()
    def itm_rerank_scores(
        self,
        image_states: torch.Tensor | Iterable[tuple[int, torch.Tensor]],
        text_states: torch.Tensor,
        text_attention_mask: torch.Tensor | None,
        itc_scores: torch.Tensor,
        k: int = 128,
        batch_size: int = 128,
        structure_masks: StructureMasks | None = None,
        score: str = "logit",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """X-VLM's re-ranking: the top-`k` texts of every image and the top-`k` images of every text by ITC
        similarity are scored by ITM, every other pair gets `NOT_RERANKED_SCORE` (-100).

        Args:
            image_states: (num_images, image_len, vision_hidden), from [`embed_images`]; or, to hold only one
                chunk of images at a time, an iterable of `(first_image_index, states_of_the_chunk)` covering
                every image once (e.g. a generator that encodes each chunk when asked).
            text_states: (num_texts, seq, hidden) and text_attention_mask (num_texts, seq), from [`embed_texts`].
            itc_scores: (num_images, num_texts) ITC similarities, from [`itc_scores`].
            batch_size: (image, text) pairs per fusion pass. A pair in both directions' candidates is scored
                once; pairs go through the fusion grouped by image, each image's keys and values computed once
                per pass.
            score: what ranks the candidates ([`itm_match_score`]): `"logit"`, the ITM head's raw "match" logit
                alone (X-VLM's `Retrieval.py` ranks by `itm_head(...)[:, 1]`, without the ITC similarity), or
                `"log_odds"` / `"probability"`, its match log-odds / probability (one order, another than the raw
                logit's: the raw logit carries a direction the ITM loss never trains); or `"log_odds+itc"`, the
                match log-odds plus the pair's ITC logit (cosine / temperature, [`itc_logit_scale`]): both heads'
                evidence in the same log units, as BLIP adds the ITC similarity to its ITM score. Where the ITM head
                alone ranks worse than ITC (a head trained on one negative per pair, ITC on the whole batch), the
                sum keeps what ITC knows.

        Returns:
            `(scores_i2t, scores_t2i)`: (num_images, num_texts) and (num_texts, num_images).
        """
        warn_if_dropout_is_on(self, "itm_rerank_scores")
        num_images, num_texts = itc_scores.shape[0], text_states.shape[0]
        chunks = [(0, image_states)] if isinstance(image_states, torch.Tensor) else image_states
        if isinstance(image_states, torch.Tensor) and image_states.shape[0] != num_images:
            raise ValueError(
                f"`itc_scores` has shape {tuple(itc_scores.shape)}; expected ({image_states.shape[0]}, {num_texts})."
            )
        if itc_scores.shape[1] != num_texts:
            raise ValueError(f"`itc_scores` has shape {tuple(itc_scores.shape)}; expected ({num_images}, {num_texts}).")
        if k < 1 or batch_size < 1:
            raise ValueError(f"`k` and `batch_size` must be positive; got k={k}, batch_size={batch_size}.")
        check_itm_score(score, rerank=True)
        add_itc = score == ITM_ITC_SCORE
        head_score = "log_odds" if add_itc else score
        if text_attention_mask is None:
            text_attention_mask = torch.ones(text_states.shape[:2], dtype=torch.long, device=text_states.device)

        # Image -> text: the top-k texts of each image; text -> image: the top-k images of each text. Each pair
        # is keyed image * num_texts + the text's rank by length; their union, sorted, lists every pair once,
        # grouped by image and, within an image, shortest texts first, so that a fusion pass holds texts of
        # about one length and is cut to it (`_without_trailing_padding`).
        top_texts = itc_scores.topk(min(k, num_texts), dim=1).indices
        top_images = itc_scores.t().topk(min(k, num_images), dim=1).indices
        by_length = text_attention_mask.sum(dim=1).argsort(stable=True).to(top_texts.device)
        length_rank = torch.empty_like(by_length)
        length_rank[by_length] = torch.arange(num_texts, device=by_length.device)
        image_ids = torch.arange(num_images, device=top_texts.device)
        text_ids = torch.arange(num_texts, device=top_images.device)
        i2t_keys = (image_ids[:, None] * num_texts + length_rank[top_texts]).flatten()
        t2i_keys = (top_images * num_texts + length_rank[:, None]).flatten()
        i2t_pairs = (image_ids[:, None] * num_texts + top_texts).flatten()  # flat (image, text) indices
        t2i_pairs = (top_images * num_texts + text_ids[:, None]).flatten()
        keys = torch.unique(torch.cat([i2t_keys, t2i_keys]))
        pair_images, pair_texts = keys // num_texts, by_length[keys % num_texts]
        pair_scores = itc_scores.new_full((len(keys),), NOT_RERANKED_SCORE, dtype=torch.float)
        covered = 0
        for first, states in chunks:  # every pair is scored while its image's chunk is at hand
            last = first + states.shape[0]
            begin, end = torch.searchsorted(pair_images, torch.tensor([first, last], device=keys.device)).tolist()
            for start in range(begin, end, batch_size):
                stop = min(start + batch_size, end)
                images, image_index = torch.unique_consecutive(pair_images[start:stop], return_inverse=True)
                texts = pair_texts[start:stop]
                pass_states, pass_mask = _without_trailing_padding(text_states[texts], text_attention_mask[texts])
                pair_scores[start:stop] = self.itm_scores(
                    states[images - first],
                    pass_states,
                    pass_mask,
                    structure_masks,
                    head_score,
                    image_index=image_index,
                )
            covered += states.shape[0]
        if covered != num_images:
            raise ValueError(f"The image state chunks cover {covered} images; `itc_scores` has {num_images}.")
        if add_itc:
            pair_scores += itc_scores[pair_images, pair_texts].float() * self.itc_logit_scale()
        # Each direction's pairs take their scores from the sorted union, found by binary search.
        scores_i2t = itc_scores.new_full((num_images * num_texts,), NOT_RERANKED_SCORE, dtype=torch.float)
        scores_i2t[i2t_pairs] = pair_scores[torch.searchsorted(keys, i2t_keys)]
        scores_t2i = torch.full_like(scores_i2t, NOT_RERANKED_SCORE)
        scores_t2i[t2i_pairs] = pair_scores[torch.searchsorted(keys, t2i_keys)]
        return scores_i2t.view(num_images, num_texts), scores_t2i.view(num_images, num_texts).t().contiguous()


def _without_trailing_padding(states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs, seq, hidden) text states and their (pairs, seq) mask cut to the last column any text uses. Texts
    padded together to the longest of all are shorter in most fusion passes; the columns cut are masked keys
    and query rows no output reads, so the scores are the same and the pass is cheaper."""
    used = attention_mask.any(dim=0).nonzero()
    if len(used) == 0:
        return states, attention_mask
    length = int(used[-1]) + 1
    return states[:, :length], attention_mask[:, :length]


__all__ = [
    "ITM_ITC_SCORE",
    "ITM_SCORES",
    "RERANK_SCORES",
    "NOT_RERANKED_SCORE",
    "EfficientVLMContrastiveMatchingOutput",
    "EfficientVLMForImageTextRetrieval",
    "EfficientVLMImageTextRetrievalOutput",
    "image_text_contrastive_matching",
    "image_text_matching_logits",
    "check_itm_score",
    "itc_embedding",
    "itm_match_score",
]
