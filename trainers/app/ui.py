"""The Gradio page: one image (the left one for a pair), four tabs (ask a question, rank captions, judge a statement
about two images, write a caption) and one table with every model's answer, task, size and latency side by side."""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from .inference import (
    CAPTION_PROMPT,
    LATENCY_REPEATS,
    NOT_APPLICABLE,
    RESULT_COLUMNS,
    AppInputError,
    AppModel,
    UnreadableImage,
    UnreadableImageError,
    predict,
)

TITLE = "EfficientVLM: compare models on your image"
INTRO = (
    "Upload an image, then ask a question (VQA models), type candidate captions (retrieval models: ranking by ITC, "
    "with ITM match probabilities), add a second image and a statement (NLVR2 models) or ask for a caption "
    "(captioning models). Every model answers side by side with its size and latency; a model that does not take "
    "the input shows n/a."
)

# What the table shows for an answer that is empty.
EMPTY_ANSWER = "(empty answer)"


def _escape_markdown(text: str) -> str:
    """`text` for a Markdown field, shown as typed: every ASCII punctuation character backslash-escaped (CommonMark
    allows it for each), so a caption such as "# heading", "a *blue* circle" or "<b>bold</b>" is not rendered as a
    heading, emphasis or HTML, nor "$$x$$" as LaTeX."""
    return "".join(f"\\{char}" if char in string.punctuation else char for char in text)


def _shown_answer(answer: str) -> str:
    """An answer as the table's Markdown column shows it: as typed (escaped: captions and answers come from the
    user and the models), and an empty one (a VQA model decoding freely can stop at once) named, not a blank cell
    that looks like nothing happened."""
    return _escape_markdown(answer) if answer.strip() else EMPTY_ANSWER


def run_request(
    models: Sequence[AppModel],
    kind: str,
    image: Any,
    text: Any,
    second_image: Any = None,
    repeats: int = LATENCY_REPEATS,
) -> tuple[list[list[Any]], str]:
    """What one click shows: `(rows, status)`, the answers as the table shows them (an empty one as
    `EMPTY_ANSWER`); a missing input gives no rows and a status that says what is missing, instead of an
    exception."""
    try:
        rows = predict(models, kind, image, text, second_image, repeats=repeats)
    except AppInputError as error:
        heading = "Unreadable image" if isinstance(error, UnreadableImageError) else "Missing input"
        return [], f"**{heading}:** {_escape_markdown(str(error))}"
    latency, answer = RESULT_COLUMNS.index("latency (ms)"), RESULT_COLUMNS.index("answer")
    taking = [row for row in rows if row[answer] != NOT_APPLICABLE]  # the models that take this input kind
    answered = sum(row[latency] != NOT_APPLICABLE for row in taking)  # a failed answer ("error: ...") has none
    failed = len(taking) - answered
    status = f"{answered} of {len(rows)} models answered this input kind"
    if failed:
        status += f"; {failed} failed ({'its row says' if failed == 1 else 'their rows say'} why)"
    return [[*row[:answer], _shown_answer(row[answer]), *row[answer + 1 :]] for row in rows], status + "."


def read_upload(field: Any, payload: Any) -> Any:
    """What an image field's upload is for the models, from its unprocessed `payload` (as gradio sends it): the
    field's own reading (gradio.Image's: upright by its EXIF orientation and, with `image_mode=None`, in its own
    mode), or an `UnreadableImage` naming the file where PIL cannot read it (not an image, HEIC, a decompression
    bomb, a truncated file). The page's handlers take their inputs unprocessed (`preprocess=False`) for this:
    gradio's own processing failed before the handler ran, and the page showed a bare "Error"."""
    import PIL.Image

    if payload is None:
        return None
    data = field.data_model.model_validate(payload)
    try:
        image = field.preprocess(data)
        image.load()  # decode now: a truncated file fails here, not inside every model
        return image
    except (OSError, PIL.Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        return UnreadableImage.from_error(data.orig_name or "the uploaded file", error)


def build_app(models: Sequence[AppModel], title: str = TITLE, repeats: int = LATENCY_REPEATS) -> Any:
    """The `gradio.Blocks` page for `models` (loaded with `load_app_models`); call `.launch()` on it. Latency is
    the median of `repeats` runs of each answer."""
    import gradio as gr

    if not models:
        raise ValueError("The app needs at least one model.")
    models = list(models)
    size_lines = ", ".join(f"{m.name} ({m.task}, {m.parameters_m:.2f}M params)" for m in models)

    with gr.Blocks(title=title) as demo:
        runs = "one run" if repeats == 1 else f"the median of {repeats} runs"
        timing = f"Latency: {runs} of the whole answer (preprocessing included), on this machine."
        gr.Markdown(f"# {title}\n{INTRO} {timing}\n\nModels: {size_lines}")
        with gr.Row():
            image = gr.Image(
                type="pil", image_mode=None, label="Image (the left one for a pair)", elem_id="image", height=260
            )
            with gr.Column():
                with gr.Tab("Ask a question"):
                    question = gr.Textbox(
                        label="Question", placeholder="what color is the circle ?", elem_id="question"
                    )
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                with gr.Tab("Rank captions"):
                    captions = gr.Textbox(
                        label="Candidate captions, one per line",
                        lines=4,
                        elem_id="captions",
                        placeholder="a red circle\na blue square",
                    )
                    rank = gr.Button("Rank", variant="primary", elem_id="rank")
                with gr.Tab("Two images + a statement"):
                    right_image = gr.Image(
                        type="pil", image_mode=None, label="Right image", elem_id="right_image", height=160
                    )
                    statement = gr.Textbox(label="Statement", elem_id="statement", placeholder="both images are red")
                    judge = gr.Button("Judge", variant="primary", elem_id="judge")
                with gr.Tab("Write a caption"):
                    prompt = gr.Textbox(label="Prompt", value=CAPTION_PROMPT, elem_id="prompt")
                    write = gr.Button("Caption", variant="primary", elem_id="caption")
        status = gr.Markdown("", elem_id="status")
        results = gr.Dataframe(
            headers=list(RESULT_COLUMNS),
            # The answer as Markdown for its line breaks (a caption ranking: one caption per line); run_request
            # escapes it, so it shows as typed.
            datatype=["str", "str", "str", "str", "markdown"],
            line_breaks=True,
            interactive=False,
            wrap=True,
            column_widths=["15%", "9%", "9%", "10%", "57%"],
            elem_id="results",
            label="Answers, side by side",
        )
        outputs = [results, status]

        def respond(kind: str):
            def answer(image_payload: Any, text: Any, right_payload: Any = None) -> tuple[list[list[Any]], str]:
                left, right = read_upload(image, image_payload), read_upload(right_image, right_payload)
                return run_request(models, kind, left, text, right, repeats)

            return answer

        # preprocess=False: the images come unprocessed, for `read_upload` to read (texts arrive as typed).
        listen = {"outputs": outputs, "preprocess": False}
        for trigger in (ask.click, question.submit):
            trigger(respond("question"), inputs=[image, question], **listen)
        rank.click(respond("captions"), inputs=[image, captions], **listen)
        for trigger in (judge.click, statement.submit):
            trigger(respond("pair"), inputs=[image, statement, right_image], **listen)
        for trigger in (write.click, prompt.submit):
            trigger(respond("caption"), inputs=[image, prompt], **listen)
    return demo
