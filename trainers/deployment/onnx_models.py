"""Task models that run an export folder's ONNX graphs with onnxruntime, with the inference methods of the PyTorch
models (`embed_images` / `itm_rerank_scores`, `rank_answers`, `__call__(...).logits` and `predict`, `generate`), so
the task evaluation routines (`trainers.evaluation.tasks`) score them unchanged and a user has a reference of how the
graphs chain. The ranking and re-ranking logic is the PyTorch model's own method, run on these graphs.

    model = load_onnx_model("onnx_out")              # or int8=True for the quantized graphs
    logits = model(pixel_values, input_ids, attention_mask).logits   # NLVR2
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modeling_efficientvlm import (
    EfficientVLMConfig,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForQuestionAnswering,
    EfficientVLMForVisualReasoning,
)
from modeling_efficientvlm.modeling_efficientvlm import EncoderOutput, check_text_length
from modeling_efficientvlm.modeling_efficientvlm_captioning import generation_prompt
from modeling_efficientvlm.modeling_efficientvlm_decoder import position_table_error
from modeling_efficientvlm.modeling_efficientvlm_nlvr2 import EfficientVLMVisualReasoningOutput
from modeling_efficientvlm.modeling_efficientvlm_retrieval import check_itm_score, itm_match_score
from trainers.deployment.onnx_export import ort_session, read_manifest, session_feed


class OnnxTaskModel(nn.Module):
    """The graphs of an export folder in onnxruntime sessions (fp32, or the int8 files with `int8=True`). Runs on
    the CPU; takes and returns torch tensors. No structure masks: an exported model is already pruned."""

    device = torch.device("cpu")

    def __init__(self, folder: str | os.PathLike, int8: bool = False, num_threads: int | None = None) -> None:
        super().__init__()
        self.folder = folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.config = EfficientVLMConfig.from_pretrained(folder)
        self.int8 = int8
        # The text length the graphs take (exports before it was written: the config's, which they carry too).
        self.max_positions = int(
            self.manifest.get("max_position_embeddings", self.config.text_config.max_position_embeddings)
        )
        self.sessions = {}
        for name, entry in self.manifest["graphs"].items():
            if int8 and "int8_file" not in entry:
                raise ValueError(f"{folder} has no int8 graphs; export with --int8 (efficientvlm export ... --int8).")
            self.sessions[name] = ort_session(folder / entry["int8_file" if int8 else "file"], num_threads)
        self.eval()

    def run(self, graph: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Runs `graph` on `tensors` (in the order of its manifest inputs); its outputs as torch tensors."""
        inputs = self.manifest["graphs"][graph]["inputs"]
        feed = {}
        for spec, tensor in zip(inputs, tensors):
            if spec["name"].endswith("input_ids"):  # as PyTorch, before onnxruntime fails deep in the graph
                check_text_length(tensor.shape[-1], self.max_positions)
            dtype = np.int64 if spec["dtype"] == "int64" else np.float32
            feed[spec["name"]] = np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=dtype)
        session = self.sessions[graph]
        return [torch.from_numpy(output) for output in session.run(None, session_feed(session, feed))]

    @staticmethod
    def _no_masks(structure_masks: Any) -> None:
        if structure_masks is not None:
            raise ValueError("An exported model takes no structure masks: prune the model before exporting it.")


class OnnxRetrievalModel(OnnxTaskModel):
    """Retrieval on `image_features`, `text_features` and `itm_scores` (X-VLM's re-ranking as in PyTorch)."""

    itc_scores = staticmethod(EfficientVLMForImageTextRetrieval.itc_scores)
    itm_rerank_scores = EfficientVLMForImageTextRetrieval.itm_rerank_scores

    def embed_images(
        self, pixel_values: torch.Tensor, structure_masks: Any = None, interpolate_pos_encoding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._no_masks(structure_masks)
        if interpolate_pos_encoding:
            raise ValueError("The exported image graphs take the model's image size only.")
        states, embeds = self.run("image_features", pixel_values)
        return states, embeds

    def embed_texts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, structure_masks: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._no_masks(structure_masks)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        states, embeds = self.run("text_features", input_ids, mask)
        return states, embeds

    def itc_logit_scale(self) -> float:
        """1 / the exported model's learned ITC temperature (see the PyTorch model's `itc_logit_scale`)."""
        if "itc_logit_scale" not in self.manifest:
            raise ValueError(
                f"{self.folder} holds no ITC temperature (exported before re-ranking could add the ITC logit); "
                "export the model again, or re-rank by another score."
            )
        return float(self.manifest["itc_logit_scale"])

    def itm_scores(
        self,
        image_states: torch.Tensor,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        structure_masks: Any = None,
        score: str = "probability",
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._no_masks(structure_masks)
        check_itm_score(score)  # before the session runs, not after
        mask = torch.ones(text_states.shape[:2], dtype=torch.long) if attention_mask is None else attention_mask
        if image_index is not None:  # the exported graph takes one image per text
            image_states = image_states.index_select(0, image_index)
        (logits,) = self.run("itm_scores", image_states, text_states, mask)
        return itm_match_score(logits, score)


class OnnxQuestionAnsweringModel(OnnxTaskModel):
    """VQA on `vqa_encoder` and `vqa_decoder`: `rank_answers` is X-VLM's k-test ranking, as in PyTorch."""

    rank_answers = EfficientVLMForQuestionAnswering.rank_answers

    def answer_candidate_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidates exported in `config.json`, as the PyTorch model's; an export without them says what to do
        here (an ONNX model has no `set_answer_candidates`)."""
        if self.config.answer_candidates_ids is None:
            raise ValueError(
                f"{self.folder} holds no answer candidates (its model had none when exported): pass "
                "`answer_candidates_ids` (and `answer_candidates_mask`) to `rank_answers`, or export a model that "
                "has them (`set_answer_candidates(answers, processor)` on the PyTorch model, then export it again)."
            )
        return EfficientVLMForQuestionAnswering.answer_candidate_tensors(self)

    def encode_question(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        structure_masks: Any = None,
        **flags: Any,
    ) -> tuple[None, None, EncoderOutput, torch.Tensor]:
        self._no_masks(structure_masks)
        if flags.get("interpolate_pos_encoding") or flags.get("token_type_ids") is not None:
            raise ValueError("The exported VQA encoder takes the model's image size and no token_type_ids.")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        (states,) = self.run("vqa_encoder", pixel_values, input_ids, mask)
        return None, None, EncoderOutput(last_hidden_state=states), mask

    def decode(
        self,
        answer_input_ids: torch.Tensor,
        answer_attention_mask: torch.Tensor | None,
        question_states: torch.Tensor,
        question_attention_mask: torch.Tensor | None,
        *flags: Any,
        structure_masks: Any = None,
        question_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        self._no_masks(structure_masks)
        if question_index is not None:  # the exported graph takes one question per answer
            question_states = question_states.index_select(0, question_index)
            if question_attention_mask is not None:
                question_attention_mask = question_attention_mask.index_select(0, question_index)
        answer_mask = torch.ones_like(answer_input_ids) if answer_attention_mask is None else answer_attention_mask
        question_mask = question_attention_mask
        if question_mask is None:
            question_mask = torch.ones(question_states.shape[:2], dtype=torch.long)
        (logits,) = self.run("vqa_decoder", answer_input_ids, answer_mask, question_states, question_mask)
        return logits, None


class OnnxVisualReasoningModel(OnnxTaskModel):
    """NLVR2 on the `nlvr2` graph; `predict` (images and sentences to answers) as in PyTorch."""

    dtype = torch.float32  # the graphs take float32 images
    predict = EfficientVLMForVisualReasoning.predict

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        structure_masks: Any = None,
        **kwargs: Any,
    ) -> EfficientVLMVisualReasoningOutput:
        self._no_masks(structure_masks)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        (logits,) = self.run("nlvr2", pixel_values, input_ids, mask)
        return EfficientVLMVisualReasoningOutput(logits=logits)


class OnnxCaptioningModel(OnnxTaskModel):
    """Captioning on `caption_image_encoder` and `caption_decoder`: greedy decoding."""

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        *,
        input_ids: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        structure_masks: Any = None,
        attention_mask: torch.Tensor | None = None,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy captions (batch, at most `max_length` tokens, prompt included, or prompt + `max_new_tokens`; by
        default `config.max_text_length`, as the PyTorch model's `generate`) after `input_ids` (default: the start
        token; a trailing [SEP] from the processor is dropped and a padded prompt refused, as in PyTorch:
        `generation_prompt`); finished captions are padded with [PAD]. Greedy only: another decoding option
        (`num_beams`, `do_sample`, `min_new_tokens`, ...) is refused rather than ignored. As in PyTorch, the images
        may come first without their name; everything else by name (PyTorch's second positional argument is a
        generation config, which this model has no use for)."""
        self._no_masks(structure_masks)
        # An option at its greedy value changes nothing (evaluation passes them so); no cache either way.
        greedy = {"num_beams": 1, "do_sample": False, "min_new_tokens": 0}
        ignored = {
            key: value
            for key, value in kwargs.items()
            if value is not None and key != "use_cache" and not (key in greedy and value == greedy[key])
        }
        if ignored:
            raise ValueError(
                f"The ONNX captioning model decodes greedily and takes `max_new_tokens` or `max_length`; it cannot "
                f"honour {sorted(ignored)}: use the PyTorch model's `generate` for them."
            )
        if max_new_tokens is not None and max_length is not None:
            raise ValueError("Give `max_new_tokens` or `max_length`, not both.")
        text = self.config.text_config
        batch = pixel_values.shape[0]
        if input_ids is None:
            input_ids = torch.full((batch, 1), text.bos_token_id, dtype=torch.long)
        else:
            input_ids = generation_prompt(input_ids, attention_mask, batch, text.eos_token_id)
        # BERT positions are absolute: fail before decoding (as PyTorch), not at the step that runs out of them.
        prompt, positions, asked_new_tokens = input_ids.shape[1], self.max_positions, max_new_tokens
        if max_new_tokens is None:
            max_length = max_length if max_length is not None else getattr(self.config, "max_text_length", positions)
            max_new_tokens = max(max_length - prompt, 0)
        if prompt >= positions or prompt + max_new_tokens > positions:
            raise position_table_error(prompt, prompt + max_new_tokens, positions, asked_new_tokens)
        (image_embeds,) = self.run("caption_image_encoder", pixel_values)
        finished = torch.zeros(batch, dtype=torch.bool)
        for _ in range(max_new_tokens):
            (logits,) = self.run("caption_decoder", input_ids, image_embeds)
            next_token = logits[:, -1].argmax(-1)
            next_token = next_token.masked_fill(finished, text.pad_token_id)
            input_ids = torch.cat([input_ids, next_token[:, None]], dim=1)
            finished |= next_token == text.eos_token_id
            if bool(finished.all()):
                break
        return input_ids


_ONNX_MODELS = {
    "pretraining": OnnxRetrievalModel,
    "retrieval": OnnxRetrievalModel,
    "vqa": OnnxQuestionAnsweringModel,
    "nlvr2": OnnxVisualReasoningModel,
    "captioning": OnnxCaptioningModel,
}


def load_onnx_model(folder: str | os.PathLike, int8: bool = False, num_threads: int | None = None) -> OnnxTaskModel:
    """The onnxruntime-backed model of an export folder (its task from the manifest)."""
    return _ONNX_MODELS[read_manifest(folder)["task"]](folder, int8=int8, num_threads=num_threads)


__all__ = [
    "OnnxCaptioningModel",
    "OnnxQuestionAnsweringModel",
    "OnnxRetrievalModel",
    "OnnxTaskModel",
    "OnnxVisualReasoningModel",
    "load_onnx_model",
]
