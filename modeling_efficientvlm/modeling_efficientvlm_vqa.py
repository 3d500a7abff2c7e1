"""EfficientVLM / X-VLM visual question answering: an encoder fuses image and question, an answer decoder
generates (or ranks) answers.

The answer decoder is X-VLM's: a BERT stack of `num_answer_decoder_layers` layers (default: as many as the
fusion layers) that all run causal self-attention, cross-attention to the fused question states and an FFN,
with its own embeddings and an LM head tied to them. It is an [`EfficientVLMTextModel`] built from a text
config derived from the main config (see `answer_decoder_config`), so checkpoints need nothing extra. Like the
encoders it can be pruned (the `decoder_*` structure-mask keys, asked for with `include_decoder=True`); its
per-layer sizes are then kept in the main config (`answer_decoder_*_per_layer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig
from transformers.utils import ModelOutput

from .checks_efficientvlm import check_tensor, warn_if_dropout_is_on
from .configuration_efficientvlm import EfficientVLMConfig
from .modeling_efficientvlm import (
    DECODER_MASK_KEYS,
    EfficientVLMLMHead,
    EfficientVLMModel,
    EfficientVLMPreTrainedModel,
    EfficientVLMTaskOutput,
    EfficientVLMTextModel,
    EncoderOutput,
    StructureMasks,
    check_finite_masks,
    check_pad_multiple,
    check_prunable_masks,
    commit_prune_plan,
    decoder_stack_masks,
    decoder_structures,
)
from .modeling_efficientvlm_decoder import (
    EfficientVLMDecoderGenerationMixin,
    TextDecoderGenerationConfig,
    answer_decoder_config,
    causal_lm_labels,
    causal_lm_loss,
    sequence_log_likelihood,
)


@dataclass
class EfficientVLMQuestionAnsweringOutput(EfficientVLMTaskOutput):
    """
    The fields of [`EfficientVLMTaskOutput`], and `decoder_output`:

    loss (`torch.FloatTensor` of shape `()`):
        X-VLM's weighted answer loss: for each answer the sum of its token cross-entropies times its weight,
        summed over all answers and divided by the number of questions. Given when answers are.
    logits (`torch.FloatTensor` of shape `(num_answers, answer_length, vocab_size)`):
        Answer-decoder predictions; position t predicts answer token t + 1.
    vision_output, text_output, fusion_output ([`EncoderOutput`]):
        The encoders on the images and questions (`None` when `question_states` were passed in).
    decoder_output ([`EncoderOutput`]):
        The answer decoder's output (its `cross_attentions` read the fused question states).
    """

    decoder_output: EncoderOutput | None = None


@dataclass
class EfficientVLMAnswerRankingOutput(ModelOutput):
    """
    answer_index (`torch.LongTensor` of shape `(batch_size,)`):
        Index (into the candidate list) of the best answer to each question.
    topk_indices (`torch.LongTensor` of shape `(batch_size, k)`):
        The k candidates kept by their first-token probability, re-ranked best first.
    topk_scores (`torch.FloatTensor` of shape `(batch_size, k)`):
        Their scores: the log-likelihood of the whole answer sequence (see `rank_answers`).
    topk_probs (`torch.FloatTensor` of shape `(batch_size, k)`):
        Softmax of the scores over the k candidates (X-VLM's `topk_probs`).
    answers (`list[str]` of length `batch_size`):
        The best answer to each question, when ranking the saved `config.answer_candidates`.
    """

    answer_index: torch.LongTensor | None = None
    topk_indices: torch.LongTensor | None = None
    topk_scores: torch.FloatTensor | None = None
    topk_probs: torch.FloatTensor | None = None
    answers: list[str] | None = None


def answer_candidate_ids(answers: list[str], tokenizer: Any, max_length: int | None = None) -> list[list[int]]:
    """The token ids "[CLS] answer [SEP]" of each candidate answer (`tokenizer`: a tokenizer, or a processor holding
    one). Raises for an empty list, an answer that is not a non-empty string, one longer than `max_length` tokens,
    and for answers that tokenize alike (words the vocabulary lacks become [UNK]: "yes" and "maybe" as
    "[CLS] [UNK] [SEP]"), which the ranking could never tell apart: all but the first could never be predicted."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if not answers or not all(isinstance(answer, str) and answer.strip() for answer in answers):
        raise ValueError("`answers` must be a non-empty list of non-empty strings.")
    ids = [list(sequence) for sequence in tokenizer(list(answers), add_special_tokens=True)["input_ids"]]
    if max_length is not None:
        too_long = [answer for answer, sequence in zip(answers, ids) if len(sequence) > max_length]
        if too_long:
            raise ValueError(f"{len(too_long)} answers are longer than {max_length} tokens (first: {too_long[0]!r}).")
    first_with: dict[tuple[int, ...], str] = {}
    alike = []
    for answer, sequence in zip(answers, ids):
        earlier = first_with.setdefault(tuple(sequence), answer)
        if earlier != answer:
            alike.append((earlier, answer, sequence))
    if alike:
        earlier, answer, sequence = alike[0]
        tokens = " ".join(tokenizer.convert_ids_to_tokens(sequence))
        raise ValueError(
            f"{len(alike)} candidate answer(s) tokenize like an earlier one, e.g. {answer!r} like {earlier!r} "
            f"({tokens}): the ranking cannot tell them apart. Their words are missing from the vocabulary: train the "
            "processor on the answer list too (`efficientvlm processor --train_files ... answer_list.json`), or "
            "leave them out."
        )
    return ids


class EfficientVLMForQuestionAnswering(EfficientVLMPreTrainedModel, EfficientVLMDecoderGenerationMixin):
    """X-VLM VQA: encoder (vision, text and fusion layers, prunable) + answer decoder (prunable on request:
    `structure_sizes(include_decoder=True)` adds its `decoder_*` structures).

    Training: answers are decoded from the fused question states with the weighted loss of X-VLM.

    Inference: `rank_answers` (X-VLM's k-test ranking over a fixed answer list) or `generate(pixel_values=...,
    input_ids=question_ids, attention_mask=question_mask)`, which returns answer ids starting with the start
    token ([CLS]). A checkpoint carries its answer list when `set_answer_candidates` was called before saving
    (`config.answer_candidates`): then `rank_answers` ranks it by default and `generate` returns the best
    candidate (so `pipeline("image-text-to-text", ...)` answers from the list); without one, or with
    `use_answer_candidates=False`, `generate` decodes freely.
    """

    generation_config_class = TextDecoderGenerationConfig
    _tied_weights_keys = {"answer_head.decoder.weight": "answer_decoder.embeddings.word_embeddings.weight"}
    lm_head_name = "answer_head"
    # The `image-text-to-text` pipeline loads it through `AutoModelForImageTextToText`.
    auto_classes = ("AutoModelForVisualQuestionAnswering", "AutoModelForImageTextToText")

    def __init__(self, config: EfficientVLMConfig) -> None:
        super().__init__(config)
        self.efficientvlm = EfficientVLMModel(config)
        # Derived from `config` every time (its pruned sizes included), so save / load rebuild it.
        self.answer_decoder = EfficientVLMTextModel(answer_decoder_config(config))
        self.answer_head = EfficientVLMLMHead(self.answer_decoder.config)
        self.post_init()
        # A total length, so that a `max_length` or a `max_new_tokens` given to `generate` wins.
        self.generation_config.max_length = self._default_max_length()

    def _default_max_length(self) -> int:
        # Answers are a few words: [CLS] and up to 10 tokens.
        return 1 + self._legacy_max_new_tokens()

    def _legacy_max_new_tokens(self) -> int:
        return 10

    @torch.no_grad()
    def init_answer_decoder_from_fusion(self, mlm_head: EfficientVLMLMHead | None = None) -> list[str]:
        """Initialises the answer decoder as X-VLM does: embeddings from the text embeddings, decoder layer i
        from fusion layer i (self-attention, cross-attention, FFN, LayerNorms), and the LM head from a
        pre-trained `mlm_head` when given.

        A sub-module (a Linear's weight and bias, a LayerNorm) is copied only when the source has one with the
        same names and shapes. Fusion cross-attention keys/values read the vision width, the decoder's read the
        text width: when the two differ (as X-VLM, which then skips them), or a fusion layer was pruned, or the
        decoder has more layers than there are fusion layers, those decoder tensors keep their fresh
        initialisation. Returns the names of the tensors not copied.
        """
        text_model = self.efficientvlm.text_model
        fusion_layers = [text_model.encoder.layer[i] for i in text_model.config.layout.fusion_layers]
        pairs: list[tuple[str, nn.Module, nn.Module | None]] = [
            ("answer_decoder.embeddings.", self.answer_decoder.embeddings, text_model.embeddings)
        ]
        for i, layer in enumerate(self.answer_decoder.encoder.layer):
            source = fusion_layers[i] if i < len(fusion_layers) else None
            pairs.append((f"answer_decoder.encoder.layer.{i}.", layer, source))
        if mlm_head is not None:
            pairs.append(("answer_head.", self.answer_head, mlm_head))

        not_copied = []
        for prefix, target, source in pairs:
            source_state = source.state_dict() if source is not None else {}
            # Whole sub-modules (a Linear's weight and bias together), as X-VLM drops both for key/value.
            groups: dict[str, list[str]] = {}
            for name in target.state_dict():
                groups.setdefault(name.rpartition(".")[0], []).append(name)
            target_state = target.state_dict()
            for names in groups.values():
                fits = all(
                    name in source_state and source_state[name].shape == target_state[name].shape for name in names
                )
                for name in names:
                    if fits:
                        target_state[name].copy_(source_state[name])
                    else:
                        not_copied.append(prefix + name)
        return not_copied

    # -- building blocks --------------------------------------------------------------------------------------
    def encode_question(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        structure_masks: StructureMasks | None = None,
        **flags: bool,
    ) -> tuple[EncoderOutput, EncoderOutput, EncoderOutput, torch.Tensor]:
        """Images (batch, channels, height, width) and questions (batch, seq) -> vision, text and fusion
        outputs and the question attention mask (all ones when none was given). `flags`
        (`output_attentions`, `output_hidden_states`, `interpolate_pos_encoding`) as in
        [`EfficientVLMModel.encode_image_text`]."""
        model = self.efficientvlm
        vision, text, attention_mask = model.encode_image_text(
            pixel_values, input_ids, attention_mask, structure_masks, **flags
        )
        fusion = model.fuse(
            text.last_hidden_state,
            attention_mask,
            vision.last_hidden_state,
            structure_masks=structure_masks,
            output_attentions=flags.get("output_attentions", False),
            output_hidden_states=flags.get("output_hidden_states", False),
        )
        return vision, text, fusion, attention_mask

    def decode(
        self,
        answer_input_ids: torch.Tensor,
        answer_attention_mask: torch.Tensor | None,
        question_states: torch.Tensor,
        question_attention_mask: torch.Tensor | None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        structure_masks: StructureMasks | None = None,
        question_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, EncoderOutput]:
        """Runs the answer decoder causally over answers (num_answers, length) cross-attending to their
        question's fused states (num_answers, question_length, hidden), with the `decoder_*` entries of
        `structure_masks` (other keys are the encoders'). With `question_index` (num_answers,), answer `i`
        attends to question `question_index[i]` of question_states (num_questions, question_length, hidden),
        each question's keys and values computed once. Returns logits and the decoder output."""
        check_finite_masks(structure_masks, DECODER_MASK_KEYS)  # under the model's names, not the stack's
        decoder = self.answer_decoder(
            answer_input_ids,
            answer_attention_mask,
            encoder_hidden_states=question_states,
            encoder_attention_mask=question_attention_mask,
            mode="multimodal",
            is_causal=True,
            **self.answer_decoder.layer_masks(decoder_stack_masks(structure_masks)),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            encoder_index=question_index,
        )
        return self.answer_head(decoder.last_hidden_state), decoder

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        answer_input_ids: torch.Tensor | None = None,
        answer_attention_mask: torch.Tensor | None = None,
        answer_weights: torch.Tensor | None = None,
        answer_counts: torch.Tensor | None = None,
        question_states: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        structure_masks: StructureMasks | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        return_loss: bool = True,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> EfficientVLMQuestionAnsweringOutput:
        """
        pixel_values: (batch, channels, height, width); input_ids / attention_mask: (batch, seq) questions.
        answer_input_ids / answer_attention_mask: (num_answers, answer_length), "[CLS] answer [SEP]" + padding;
        the answers of question 0 first, then those of question 1, ...
        answer_counts: (batch,) answers per question (default: one each); answer_weights: (num_answers,)
        (default: ones). question_states / question_attention_mask: pre-computed fused question states
        (batch, seq, hidden) used instead of encoding (generation passes them).
        structure_masks: masks of the encoders (vision, text, fusion) and of the answer decoder (`decoder_*`).
        return_loss: compute the answer loss when answers are given; without answers (or with
        `return_loss=False`) nothing is trained or sampled: the encoders (and the decoder on given answers) only.
        token_type_ids: (batch, seq) of the questions, as BERT tokenizers emit them (default all 0).
        """
        vision = text = fusion = None
        if question_states is None:
            if pixel_values is None or input_ids is None:
                raise ValueError("Pass `pixel_values` and the question's `input_ids` (or `question_states`).")
            vision, text, fusion, question_attention_mask = self.encode_question(
                pixel_values,
                input_ids,
                attention_mask,
                structure_masks,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                interpolate_pos_encoding=interpolate_pos_encoding,
                token_type_ids=token_type_ids,
            )
            question_states = fusion.last_hidden_state
        if answer_input_ids is None:
            return EfficientVLMQuestionAnsweringOutput(vision_output=vision, text_output=text, fusion_output=fusion)

        num_questions, num_answers = question_states.shape[0], answer_input_ids.shape[0]
        if answer_counts is None:
            if num_answers != num_questions:
                raise ValueError(
                    f"{num_answers} answers for {num_questions} questions: pass `answer_counts` (answers per question)."
                )
            answer_counts = torch.ones(num_questions, dtype=torch.long, device=answer_input_ids.device)
        answer_counts = torch.as_tensor(answer_counts, device=question_states.device)
        if answer_counts.shape != (num_questions,) or int(answer_counts.sum()) != num_answers:
            raise ValueError(
                f"`answer_counts` {answer_counts.tolist()} must give one count per question ({num_questions}) "
                f"summing to the number of answers ({num_answers})."
            )
        # Each answer cross-attends to its own question's fused states.
        expanded_states = question_states.repeat_interleave(answer_counts, dim=0)
        expanded_mask = None
        if question_attention_mask is not None:
            expanded_mask = question_attention_mask.repeat_interleave(answer_counts, dim=0)
        logits, decoder = self.decode(
            answer_input_ids,
            answer_attention_mask,
            expanded_states,
            expanded_mask,
            output_attentions,
            output_hidden_states,
            structure_masks,
        )

        loss = None
        if return_loss:
            labels = causal_lm_labels(answer_input_ids, answer_attention_mask, self.config.text_config.pad_token_id)
            per_answer = causal_lm_loss(logits, labels, reduction="sum")
            if answer_weights is None:
                answer_weights = torch.ones_like(per_answer)
            if answer_weights.shape != per_answer.shape:
                raise ValueError(
                    f"`answer_weights` has shape {tuple(answer_weights.shape)}; expected ({num_answers},)."
                )
            loss = (answer_weights.to(per_answer.dtype) * per_answer).sum() / num_questions
        return EfficientVLMQuestionAnsweringOutput(
            loss=loss,
            logits=logits,
            vision_output=vision,
            text_output=text,
            fusion_output=fusion,
            decoder_output=decoder,
        )

    # -- inference --------------------------------------------------------------------------------------------
    def set_answer_candidates(self, answers: list[str], tokenizer: Any) -> None:
        """Saves the answer list this model ranks in its config (`answer_candidates`, and their token ids
        "[CLS] answer [SEP]" from `tokenizer` as `answer_candidates_ids`), so `save_pretrained` ships it and
        `rank_answers` / `generate` use it with no other file. `tokenizer`: the model's tokenizer, or a
        processor holding one (`.tokenizer`). Answers are checked by [`answer_candidate_ids`]."""
        answers = list(answers)
        ids = answer_candidate_ids(answers, tokenizer, self.answer_decoder.config.max_position_embeddings)
        self.config.answer_candidates, self.config.answer_candidates_ids = answers, ids
        self.config._check_answer_candidates()

    def answer_candidate_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The saved candidates as `(ids, mask)`, each (num_candidates, longest), padded with [PAD]."""
        ids = self.config.answer_candidates_ids
        if ids is None:
            raise ValueError(
                "This model has no saved answer candidates: pass `answer_candidates_ids`, or call "
                "`set_answer_candidates(answers, tokenizer)` (then `save_pretrained` keeps them)."
            )
        device, longest = self.device, max(len(sequence) for sequence in ids)
        pad = self.config.text_config.pad_token_id or 0
        padded = torch.full((len(ids), longest), pad, dtype=torch.long, device=device)
        mask = torch.zeros_like(padded)
        for row, sequence in enumerate(ids):
            padded[row, : len(sequence)] = torch.tensor(sequence, device=device)
            mask[row, : len(sequence)] = 1
        return padded, mask

    def rank_answers(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        answer_candidates_ids: torch.Tensor | None = None,
        answer_candidates_mask: torch.Tensor | None = None,
        k: int = 128,
        structure_masks: StructureMasks | None = None,
        xvlm_scoring: bool = False,
        interpolate_pos_encoding: bool = False,
        token_type_ids: torch.Tensor | None = None,
    ) -> EfficientVLMAnswerRankingOutput:
        """X-VLM's k-test: picks each question's answer from a fixed candidate list.

        The probability of every candidate's first token after the start token selects the top `k` candidates
        (all of them when there are fewer); each of those is then scored by the log-likelihood of its whole
        sequence (every token after the start, [SEP] included), and the best one wins.

        answer_candidates_ids / answer_candidates_mask: (num_candidates, length), each "[CLS] answer [SEP]"
        + padding; by default the checkpoint's saved `config.answer_candidates` (then the output's `answers`
        holds the winning strings). `xvlm_scoring=True` reproduces the official code exactly: it adds the
        first token's log-probability once more (the official score counts it twice); the default is the
        plain likelihood. Call it in eval mode (dropout off), as X-VLM does.
        """
        warn_if_dropout_is_on(self, "rank_answers")
        saved = answer_candidates_ids is None
        if saved:
            answer_candidates_ids, answer_candidates_mask = self.answer_candidate_tensors()
        if answer_candidates_ids.dim() != 2 or answer_candidates_ids.shape[1] < 2:
            raise ValueError(
                "`answer_candidates_ids` must have shape (num_candidates, length >= 2) with a start token then "
                f"the answer; got {tuple(answer_candidates_ids.shape)}."
            )
        check_tensor(
            (answer_candidates_ids[:, 0] == answer_candidates_ids[0, 0]).all(),
            "Every answer candidate must begin with the same start token (e.g. [CLS]).",
        )
        if k < 1:
            raise ValueError(f"`k` must be at least 1, got {k}.")
        if answer_candidates_mask is None:
            answer_candidates_mask = (answer_candidates_ids != self.config.text_config.pad_token_id).long()
        # Gradients off only here: a check above that fails under torch.compile must not leave them off.
        with torch.no_grad():
            _, _, fusion, question_mask = self.encode_question(
                pixel_values,
                input_ids,
                attention_mask,
                structure_masks,
                interpolate_pos_encoding=interpolate_pos_encoding,
                token_type_ids=token_type_ids,
            )
            states = fusion.last_hidden_state
            batch = states.shape[0]

            # First answer token, for every candidate at once.
            start = answer_candidates_ids[:1, :1].expand(batch, 1)
            start_logits, _ = self.decode(start, None, states, question_mask, structure_masks=structure_masks)
            first_log_probs = F.log_softmax(start_logits[:, 0].float(), dim=-1)[:, answer_candidates_ids[:, 1]]
            k = min(k, answer_candidates_ids.shape[0])
            topk_first, topk_indices = first_log_probs.topk(k, dim=1)

            # Full-sequence likelihood of the k survivors of each question.
            sequences = answer_candidates_ids[topk_indices].flatten(0, 1)
            sequence_mask = answer_candidates_mask[topk_indices].flatten(0, 1)
            logits, _ = self.decode(
                sequences,
                sequence_mask,
                states,
                question_mask,
                structure_masks=structure_masks,
                question_index=torch.arange(batch, device=states.device).repeat_interleave(k),
            )
            scores = sequence_log_likelihood(logits, causal_lm_labels(sequences, sequence_mask)).view(batch, k)
            if xvlm_scoring:
                scores = scores + topk_first
            scores, order = scores.sort(dim=1, descending=True)
            topk_indices = topk_indices.gather(1, order)
            return EfficientVLMAnswerRankingOutput(
                answer_index=topk_indices[:, 0],
                topk_indices=topk_indices,
                topk_scores=scores,
                topk_probs=scores.softmax(dim=1),
                answers=[self.config.answer_candidates[i] for i in topk_indices[:, 0].tolist()] if saved else None,
            )

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_answer_candidates: bool | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """Answers each question (batch, seq) about its image: with saved answer candidates (and
        `use_answer_candidates` not False) the best of them by [`rank_answers`] (`k` from the keyword, default
        128), returned as its ids "[CLS] answer [SEP]" padded with [PAD] (batch, length), or the top
        `num_return_sequences` candidates per question (batch * n, length), best first (other generation
        options do not apply to ranking); otherwise free decoding with `GenerationMixin.generate` (all its
        options)."""
        if use_answer_candidates is None:
            use_answer_candidates = self.config.answer_candidates_ids is not None
        if not use_answer_candidates:
            given = dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
            return super().generate(**{key: value for key, value in given.items() if value is not None}, **kwargs)
        generation_config = kwargs.get("generation_config")
        count = kwargs.get("num_return_sequences") or getattr(generation_config, "num_return_sequences", None) or 1
        ranking = self.rank_answers(
            pixel_values,
            input_ids,
            attention_mask,
            k=max(kwargs.get("k", 128), count),
            structure_masks=kwargs.get("structure_masks"),
            interpolate_pos_encoding=kwargs.get("interpolate_pos_encoding", False),
            token_type_ids=kwargs.get("token_type_ids"),
        )
        if count > ranking.topk_indices.shape[1]:
            raise ValueError(
                f"{count} return sequences asked for, but only {ranking.topk_indices.shape[1]} candidates."
            )
        ids, _ = self.answer_candidate_tensors()
        return ids[ranking.topk_indices[:, :count].flatten()]

    def _encode_for_generation(
        self, pixel_values: torch.Tensor, model_kwargs: dict[str, Any], generation_config: GenerationConfig
    ) -> dict[str, Any]:
        input_ids = model_kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("Answer generation needs the question as `input_ids` (and its `attention_mask`).")
        _, _, fusion, question_mask = self.encode_question(
            pixel_values,
            input_ids,
            model_kwargs.pop("attention_mask", None),
            model_kwargs.get("structure_masks"),  # kept: the decoder's masks apply at every step
            interpolate_pos_encoding=model_kwargs.pop("interpolate_pos_encoding", False),
            token_type_ids=model_kwargs.pop("token_type_ids", None),
        )
        model_kwargs["question_states"] = fusion.last_hidden_state
        model_kwargs["question_attention_mask"] = question_mask
        # The sequence `generate` extends is the answer, which starts with the start token.
        model_kwargs["input_ids"] = self._start_ids(input_ids.shape[0], input_ids.device, generation_config)
        return model_kwargs

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        question_states: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        structure_masks: StructureMasks | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        # The whole answer so far (no cache); the fused question states were computed once before decoding.
        return {
            "answer_input_ids": input_ids,
            "question_states": question_states,
            "question_attention_mask": question_attention_mask,
            "structure_masks": structure_masks,
            "return_loss": False,
        }

    # -- structured pruning: the encoders' structures, and the answer decoder's on request -------------------
    def structure_sizes(self, include_decoder: bool = False) -> dict[str, list[int]]:
        """The encoders' structures; with `include_decoder`, also the answer decoder's (`DECODER_MASK_KEYS`)."""
        sizes = self.efficientvlm.structure_sizes()
        if include_decoder:
            sizes.update(decoder_structures(self.answer_decoder.structure_sizes()))
        return sizes

    def structure_unit_parameters(self, include_decoder: bool = False) -> dict[str, list[int]]:
        units = self.efficientvlm.structure_unit_parameters()
        if include_decoder:
            units.update(decoder_structures(self.answer_decoder.structure_unit_parameters()))
        return units

    def prune(self, structure_masks: StructureMasks, pad_to_multiple_of: int = 1) -> None:
        """Prunes the encoders (see [`EfficientVLMModel.prune`]) and, with `decoder_*` masks, the answer decoder
        the same way, recording its new per-layer sizes in `config.answer_decoder_*_per_layer`."""
        check_pad_multiple(pad_to_multiple_of)
        check_prunable_masks(structure_masks, self.structure_sizes(include_decoder=True), type(self).__name__)
        decoder_masks = decoder_stack_masks(structure_masks)
        encoder_masks = {key: masks for key, masks in structure_masks.items() if key not in DECODER_MASK_KEYS}
        # Every pruned module (encoders and decoder) is built before any is swapped in: an error leaves the model whole.
        self._own_config()
        plan = self.efficientvlm.prune_plan(encoder_masks, pad_to_multiple_of)
        if decoder_masks:
            plan += self.answer_decoder.prune_plan(decoder_masks, pad_to_multiple_of)
        commit_prune_plan(plan)
        self.efficientvlm.record_sizes()
        if decoder_masks:
            self.answer_decoder.record_sizes()
            decoder = self.answer_decoder.config
            self.config.answer_decoder_num_attention_heads_per_layer = list(decoder.num_attention_heads_per_layer)
            self.config.answer_decoder_num_cross_attention_heads_per_layer = list(
                decoder.num_cross_attention_heads_per_layer
            )
            self.config.answer_decoder_intermediate_size_per_layer = list(decoder.intermediate_size_per_layer)


__all__ = [
    "EfficientVLMAnswerRankingOutput",
    "EfficientVLMForQuestionAnswering",
    "EfficientVLMQuestionAnsweringOutput",
]
