"""The app (`efficientvlm app`, `space/app.py`): every model's answer to one input, side by side, computed without a
browser and then used as a person would: a real headless Chromium uploads an image and asks a question."""

from __future__ import annotations

import ast
import os
import re
import runpy
import shutil
import socket
from pathlib import Path

import pytest
import torch

from modeling_efficientvlm import (
    EfficientVLMConfig,
    EfficientVLMForConditionalGeneration,
    EfficientVLMForImageTextRetrieval,
    EfficientVLMForQuestionAnswering,
    EfficientVLMForVisualReasoning,
)
from trainers import commands as cli
from trainers.app import (
    NOT_APPLICABLE,
    RESULT_COLUMNS,
    AppModel,
    load_app_models,
    models_from_env,
    predict,
    run_request,
)
from trainers.app.inference import CAPTION_MAX_NEW_TOKENS, CAPTION_PROMPT, answer_question
from trainers.commands.app import main as app_command
from trainers.pruning.hard_concrete import random_structure_masks
from trainers.saving import save_model_folder

from .data_utils import make_image, make_processor, save_image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from the test

REPO = Path(__file__).resolve().parents[1]
ANSWERS = ["red", "blue", "green square", "yes"]
# Model folder -> task; the pruned VQA model is smaller, so the sizes differ side by side.
FOLDERS = ("vqa", "vqa_pruned", "retrieval", "nlvr2", "captioning")
VQA_FOLDERS = ("vqa", "vqa_pruned")
# Captions a person may type that Markdown, HTML or LaTeX would render otherwise than typed.
TYPED_CAPTIONS = ("# heading", "a *blue* circle_a_", "<b>bold</b> & $$x^2$$", "1. [link](x) `code`")


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("app_models")
    config = EfficientVLMConfig.from_preset("tiny")
    processor = make_processor(tmp / "vocab", image_size=config.vision_config.image_size)
    torch.manual_seed(0)
    vqa = EfficientVLMForQuestionAnswering(config)
    vqa.set_answer_candidates(ANSWERS, processor.tokenizer)
    pruned = EfficientVLMForQuestionAnswering(EfficientVLMConfig.from_preset("tiny"))
    pruned.load_state_dict(vqa.state_dict())
    pruned.set_answer_candidates(ANSWERS, processor.tokenizer)
    pruned.prune(random_structure_masks(pruned, 0.5, torch.Generator().manual_seed(0)))
    models = {
        "vqa": vqa,
        "vqa_pruned": pruned,
        "retrieval": EfficientVLMForImageTextRetrieval(config),
        "nlvr2": EfficientVLMForVisualReasoning(config),
        "captioning": EfficientVLMForConditionalGeneration(config),
    }
    folders = {}
    for name, model in models.items():
        save_model_folder(model, processor, tmp / name)
        folders[name] = str(tmp / name)
    return folders


@pytest.fixture(scope="module")
def app_models(model_folders) -> list[AppModel]:
    return load_app_models(model_folders.values())


def _rows_by_model(rows: list[list]) -> dict[str, dict]:
    return {row[0]: dict(zip(RESULT_COLUMNS, row)) for row in rows}


def test_every_model_answers_the_input_kinds_it_takes_and_says_na_to_the_others(app_models) -> None:
    image = make_image("red", 40)
    assert [m.task for m in app_models] == ["vqa", "vqa", "retrieval", "nlvr2", "captioning"]
    sizes = {m.name: m.model.num_parameters() / 1e6 for m in app_models}
    assert sizes["vqa_pruned"] < sizes["vqa"]

    kinds = {
        "question": ("what color is the square ?", None, VQA_FOLDERS),
        "captions": ("a red square\n\n  a blue circle  \n", None, ("retrieval",)),
        "pair": ("the left image is red", make_image("blue", 40), ("nlvr2",)),
        "caption": ("", None, ("captioning",)),
    }
    for kind, (text, second_image, answering) in kinds.items():
        rows = _rows_by_model(predict(app_models, kind, image, text, second_image))
        assert list(rows) == list(FOLDERS)
        for name, row in rows.items():
            assert row["params (M)"] == round(sizes[name], 2)
            if name in answering:
                assert isinstance(row["latency (ms)"], float) and row["latency (ms)"] > 0, (kind, row)
                assert not row["answer"].startswith("error"), (kind, row)
            else:
                assert row["answer"] == row["latency (ms)"] == NOT_APPLICABLE, (kind, row)

        if kind == "question":
            for name in VQA_FOLDERS:
                answer, probability = re.fullmatch(r"(.+) \((\d\.\d\d)\)", rows[name]["answer"]).groups()
                assert answer in ANSWERS and 0 < float(probability) <= 1
        if kind == "captions":
            # Best first, each caption once (the blank line dropped); ITC probabilities as the model's own
            # inference forward gives them (softmax over the candidates), ITM probabilities in [0, 1].
            ranking = re.findall(r"(\d)\. (.+?) \(ITC (\d\.\d\d), ITM (\d\.\d\d)\)", rows["retrieval"]["answer"])
            assert sorted(caption for _, caption, _, _ in ranking) == ["a blue circle", "a red square"]
            retrieval = app_models[2]
            inputs = retrieval.processor(images=[image, image], text=["a red square", "a blue circle"])
            expected = retrieval.model(**inputs, return_loss=False).logits_per_image[0].softmax(-1)
            expected = dict(zip(["a red square", "a blue circle"], expected.tolist()))
            for _, caption, itc, itm in ranking:
                assert float(itc) == pytest.approx(expected[caption], abs=0.006) and 0 <= float(itm) <= 1
            assert float(ranking[0][2]) >= float(ranking[1][2])
        if kind == "pair":
            nlvr2 = app_models[3]
            [expected] = nlvr2.model.predict(image, second_image, text, nlvr2.processor)
            label = "True" if expected["label"] else "False"
            assert rows["nlvr2"]["answer"] == f"{label} ({expected['probabilities'][label]:.2f})"
        if kind == "caption":
            # No prompt given: the one the captioning trainer writes, continued greedily.
            captioning = app_models[4]
            inputs = captioning.processor(images=[image], text=[CAPTION_PROMPT])
            ids = captioning.model.generate(**inputs, max_new_tokens=CAPTION_MAX_NEW_TOKENS)[0]
            caption = captioning.processor.tokenizer.decode(ids, skip_special_tokens=True)
            assert rows["captioning"]["answer"] == caption.strip() and caption.startswith(CAPTION_PROMPT)
            assert len(ids) > len(inputs["input_ids"][0]) - 1  # words after the prompt (its [SEP] dropped)
            [row] = predict(app_models[4:], "caption", image, "  two red ")  # a prompt of one's own, stripped
            assert row[RESULT_COLUMNS.index("answer")].startswith("two red ")


def test_a_vqa_model_without_saved_answers_decodes_its_answer(app_models) -> None:
    vqa = app_models[0]
    config = EfficientVLMConfig.from_dict(vqa.model.config.to_dict())
    config.answer_candidates = config.answer_candidates_ids = None
    free = EfficientVLMForQuestionAnswering(config).eval()
    free.load_state_dict(vqa.model.state_dict())
    image, question = make_image("red", 40), "what color is the square ?"
    [row] = predict([AppModel("free", free, vqa.processor)], "question", image, question)
    inputs = vqa.processor(images=[image], text=[question])
    ids = free.generate(**inputs, use_answer_candidates=False, max_new_tokens=10)[0]
    assert ids[0] == free.generation_config.bos_token_id  # the start token, which the answer leaves out
    assert row[RESULT_COLUMNS.index("answer")] == vqa.processor.tokenizer.decode(ids[1:], skip_special_tokens=True)


def test_the_table_names_an_empty_answer(app_models, monkeypatch) -> None:
    """A VQA folder without answer candidates can decode an empty answer: it was a blank cell."""
    from trainers.app import inference
    from trainers.app.ui import EMPTY_ANSWER

    monkeypatch.setattr(inference, "answer_question", lambda *args: "")
    rows, status = run_request(app_models[:1], "question", make_image(), "what color ?", repeats=1)
    assert rows[0][RESULT_COLUMNS.index("answer")] == EMPTY_ANSWER == "(empty answer)"
    assert status == "1 of 1 models answered this input kind."


def test_the_processor_sees_the_image_as_given_16_bit_and_transparent_ones_included(app_models, monkeypatch) -> None:
    """The app converted every image to RGB before the processor: a 16-bit grayscale image lost its scaling (another
    answer than the same image in 8 bits) and a transparent one its compositing on white."""
    import numpy as np
    import PIL.Image

    vqa = app_models[0]
    seen = []

    def rank_answers(pixel_values, *args, **kwargs):
        seen.append(pixel_values)
        return type(vqa.model).rank_answers(vqa.model, pixel_values, *args, **kwargs)

    monkeypatch.setattr(vqa.model, "rank_answers", rank_answers)
    gray = (np.arange(40 * 40).reshape(40, 40) % 256).astype(np.uint8)
    eight_bit, sixteen_bit = PIL.Image.fromarray(gray), PIL.Image.fromarray(gray.astype(np.uint16) * 257)
    transparent = PIL.Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    assert sixteen_bit.mode == "I;16"
    for image in (eight_bit, sixteen_bit, transparent):
        answer_question(vqa, image, "what color is the square ?")
    # What reaches the model is the processor's own reading of each image: 16 bits scaled like 8 bits, the
    # transparent red composited on white (a white image, not a red one).
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)
    white = vqa.processor(images=[make_image("white", 40)])["pixel_values"]
    torch.testing.assert_close(seen[2], white, rtol=0, atol=0)
    assert not torch.equal(seen[2], vqa.processor(images=[make_image("red", 40)])["pixel_values"])


def test_the_page_uploads_images_in_their_own_mode(app_models) -> None:
    """gradio converts an upload to `image_mode` ("RGB" by default) before the app sees it; None keeps its mode."""
    import gradio as gr

    from trainers.app.ui import build_app

    images = [block for block in build_app(app_models[:1]).blocks.values() if isinstance(block, gr.Image)]
    assert [image.elem_id for image in images] == ["image", "right_image"]
    assert [image.image_mode for image in images] == [None, None]


def test_an_unreadable_upload_is_a_message_naming_it_and_a_readable_one_comes_as_given(
    app_models, tmp_path, monkeypatch
) -> None:
    """gradio.Image failed on a file PIL cannot read before the app was called: a bare "Error" on the page."""
    import gradio as gr
    import numpy as np
    import PIL.Image

    from trainers.app.ui import build_app, read_upload

    left, right = [block for block in build_app(app_models).blocks.values() if isinstance(block, gr.Image)]

    def upload(field, path: Path):  # what the page's handler reads from that upload
        return read_upload(field, {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}})

    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    whole = save_image(tmp_path / "whole.png", "red", 40).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    save_image(tmp_path / "bomb.png", "red", 40)
    problems = {
        "notes.png": "it is not an image format PIL can read",
        "photo.heic": "it is not an image format PIL can read (HEIC photos among them)",
        "cut.png": "it could not be decoded (OSError: ",
        "bomb.png": "it has too many pixels to open safely",
    }
    for name, problem in problems.items():
        with monkeypatch.context() as patch:
            if name == "bomb.png":  # 40 x 40 pixels: beyond twice this limit, where PIL refuses to open it
                patch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
            uploads = [("question", upload(left, tmp_path / name), None)]
            uploads.append(("pair", make_image(), upload(right, tmp_path / name)))
        for kind, image, second_image in uploads:
            rows, status = run_request(app_models, kind, image, "is it red ?", second_image)
            shown = re.sub(r"\\(.)", r"\1", status)  # the status line is Markdown, escaped to show as typed
            assert rows == [] and shown.startswith(f"**Unreadable image:** Could not read the upload '{name}': ")
            assert problem in shown, shown

    # A readable upload comes as before: upright (its EXIF orientation applied) and in its own mode.
    exif = PIL.Image.Exif()
    exif[274] = 6  # lying on its side
    PIL.Image.fromarray(np.full((24, 40), 40_000, np.uint16)).save(tmp_path / "gray16.png", exif=exif)
    image = upload(left, tmp_path / "gray16.png")
    assert (image.mode, image.size) == ("I;16", (24, 40))


@pytest.mark.parametrize(
    ("kind", "image", "text", "second_image", "message"),
    [
        ("question", None, "what color ?", None, "Upload an image first."),
        ("question", "image", "   ", None, "Type a question first."),
        ("captions", "image", "\n \n", None, "Type at least one candidate caption"),
        ("pair", "image", "both are red", None, "Upload the right image first."),
        ("pair", "image", "", "image", "Type a statement about the two images first."),
    ],
)
def test_a_missing_input_is_a_message_not_a_crash(app_models, kind, image, text, second_image, message) -> None:
    image = make_image() if image else None
    second_image = make_image() if second_image else None
    rows, status = run_request(app_models, kind, image, text, second_image)
    assert rows == []
    status = re.sub(r"\\(.)", r"\1", status)  # the status line is Markdown, escaped to show as typed
    assert status.startswith("**Missing input:**") and message in status


def test_a_broken_model_shows_its_error_and_the_others_still_answer(app_models) -> None:
    broken = AppModel(name="broken", model=app_models[0].model, processor=None)  # no processor to call
    rows = _rows_by_model(predict([broken, *app_models[:2]], "question", make_image(), "what color ?"))
    assert rows["broken"]["answer"].startswith("error: TypeError")
    assert rows["broken"]["latency (ms)"] == NOT_APPLICABLE
    assert all(rows[name]["answer"].split(" (")[0] in ANSWERS for name in VQA_FOLDERS)
    # The status counts only real answers, and says how many failed.
    _, status = run_request([broken, *app_models[:2]], "question", make_image(), "what color ?", repeats=1)
    assert status == "2 of 3 models answered this input kind; 1 failed (its row says why)."
    _, status = run_request([broken, broken, app_models[2]], "question", make_image(), "what color ?", repeats=1)
    assert status == "0 of 3 models answered this input kind; 2 failed (their rows say why)."


def test_models_come_from_the_env_variable_else_the_default(monkeypatch) -> None:
    monkeypatch.setenv("EFFICIENTVLM_MODELS", "you/a, you/b\n  ./c")
    assert models_from_env(["x"]) == ["you/a", "you/b", "./c"]
    monkeypatch.setenv("EFFICIENTVLM_MODELS", "  ")
    assert models_from_env(["x"]) == ["x"]
    with pytest.raises(ValueError, match="`repeats` must be at least 1"):
        predict([], "question", make_image(), "what color ?", repeats=0)
    with pytest.raises(ValueError, match="at least one model"):
        load_app_models([])


def test_a_model_source_that_cannot_load_says_why(model_folders, tmp_path, monkeypatch) -> None:
    """A missing folder got from_pretrained's "Repo id must be in the form ...", a file given instead of the folder
    a raw unpickling traceback."""
    monkeypatch.chdir(tmp_path)
    for missing in (str(tmp_path / "nowhere"), "./nowhere", "~/nowhere", "models/vqa/nowhere", "..\\nowhere"):
        with pytest.raises(ValueError, match=re.escape(f"No such folder: {missing!r} (relative paths start at ")):
            load_app_models([missing])
    weights = str(Path(model_folders["vqa"]) / "model.safetensors")
    for file in (weights, str(Path(model_folders["vqa"]) / "config.json")):
        with pytest.raises(ValueError, match=re.escape(f"{file!r} is a file; give the model folder")):
            load_app_models([file])
    # Other failures keep from_pretrained's own message: here, a folder without a saved model.
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="Could not load an EfficientVLM model and processor from 'empty': .*config"):
        load_app_models(["empty"])


def test_the_app_package_imports_nothing_else_from_this_repository() -> None:
    """A Space ships `trainers/__init__.py` and `trainers/app/` only (space/README.md): they must be enough."""
    outside = []
    for path in [REPO / "trainers" / "__init__.py", *sorted((REPO / "trainers" / "app").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            outside += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "trainers"]
    assert outside == []
    # The one optional import of the model package is guarded: the folders' own code serves without it.
    source = (REPO / "trainers" / "app" / "inference.py").read_text()
    assert "import modeling_efficientvlm  # noqa: F401" in source and "except ImportError" in source


def test_the_space_app_builds_its_page_from_the_env_variable(model_folders, monkeypatch) -> None:
    import gradio as gr

    front_matter = (REPO / "space" / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in front_matter and "app_file: app.py" in front_matter
    requirements = (REPO / "space" / "requirements.txt").read_text()
    assert all(name in requirements for name in ("torch", "transformers", "gradio"))

    monkeypatch.setenv("EFFICIENTVLM_MODELS", f"{model_folders['vqa']},{model_folders['retrieval']}")
    space = runpy.run_path(str(REPO / "space" / "app.py"))
    assert isinstance(space["demo"], gr.Blocks)
    assert space["sources"] == [model_folders["vqa"], model_folders["retrieval"]]
    monkeypatch.delenv("EFFICIENTVLM_MODELS")
    with pytest.raises(SystemExit, match="EFFICIENTVLM_MODELS"):
        runpy.run_path(str(REPO / "space" / "app.py"))


def test_the_app_command_has_help_and_needs_models(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["app", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: efficientvlm app ") and "--models" in out and "--share" in out
    with pytest.raises(ValueError, match="Give --models"):
        cli.main(["app"])


def test_the_app_speaks_of_its_own_options_not_gradios(app_models, model_folders) -> None:
    """A port in use was gradio's message (`server_port` in launch()), and one timed run "the median of 1 runs"."""
    import gradio as gr

    from trainers.app.ui import build_app

    def intro(repeats: int) -> str:
        page = build_app(app_models[:1], repeats=repeats)
        return next(block.value for block in page.blocks.values() if isinstance(block, gr.Markdown))

    assert "Latency: one run of the whole answer" in intro(1) and "median" not in intro(1)
    assert "Latency: the median of 3 runs of the whole answer" in intro(3)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = f"Cannot find empty port in range: {port}-{port} on 127.0.0.1: give a free port with --port."
        with pytest.raises(OSError, match=re.escape(message)):
            app_command(["--models", model_folders["vqa"], "--port", str(port)], block=False)


# -- in a real browser -------------------------------------------------------------------------------------------
def _browser() -> tuple[str, str]:
    """(chromium, chromedriver), or a skip naming what is missing (.ci/run installs Debian's packages)."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        missing = " and ".join(name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path)
        pytest.skip(f"{missing} not found: `apt-get install chromium chromium-driver` (as .ci/run does)")
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _status(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "status").text


def _table(driver) -> list[list[str]]:
    """The body rows of the results table as the page shows them (ARIA grid rows; the header's cells are
    column headers, not grid cells)."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#results [role=row]")
    cells = [[cell.text for cell in row.find_elements(By.CSS_SELECTOR, "[role=gridcell]")] for row in rows]
    return [row for row in cells if row and any(row)]


def test_a_person_uploads_an_image_asks_a_question_and_sees_every_answer(
    model_folders, app_models, tmp_path, capsys
) -> None:
    chromium, chromedriver = _browser()
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    # Launched as a user launches it: the command, on localhost (it returns once the page serves).
    demo = app_command(["--models", *model_folders.values(), "--port", str(port)], block=False)
    # What it prints names this command's options, not gradio's launch() arguments (`share=True`).
    out = capsys.readouterr().out
    assert f"Running on local URL:  http://127.0.0.1:{port}" in out and "--share yes" in out and "share=True" not in out
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        # The page re-renders while it answers: an element read mid-render is read again.
        wait = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,))
        # Gradio renders its components one by one: wait for every one the person uses (under load the upload
        # field can be there before the button).
        for selector in ("#image input[type=file]", "#question textarea", "#ask", "#status"):
            wait.until(lambda d, selector=selector: d.find_elements(By.CSS_SELECTOR, selector))

        # Asking before uploading: a message, no answers.
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("what color is the square ?")
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: "Upload an image first." in _status(d))
        assert _table(driver) == []

        # A file that is not an image: a message naming it, no answers.
        (tmp_path / "notes.png").write_text("not an image")
        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(tmp_path / "notes.png"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: "Unreadable image" in _status(d))
        assert _status(driver).startswith("Unreadable image: Could not read the upload 'notes.png': it is not an image")
        assert _table(driver) == []

        image_path = save_image(tmp_path / "red.png", "red", 64)  # replaces the upload
        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image_path))
        wait.until(
            lambda d: any(
                "red.png" in img.get_attribute("src") for img in d.find_elements(By.CSS_SELECTOR, "#image img")
            )
        )
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: "models answered" in _status(d) and len(_table(d)) == len(FOLDERS))

        table = {row[0]: dict(zip(RESULT_COLUMNS, row)) for row in _table(driver)}
        assert list(table) == list(FOLDERS), table
        assert _status(driver) == f"{len(VQA_FOLDERS)} of {len(FOLDERS)} models answered this input kind."
        uploaded = make_image("red", 64)  # what the browser sent, decoded as the page decodes it
        for model in app_models:
            row = table[model.name]
            assert row["task"] == model.task and float(row["params (M)"]) == round(model.parameters_m, 2)
            if model.name in VQA_FOLDERS:
                # The page shows the model's own answer to that image and question, and how long it took.
                assert row["answer"] == answer_question(model, uploaded, "what color is the square ?"), row
                assert float(row["latency (ms)"]) > 0, row
            else:
                assert row["answer"] == row["latency (ms)"] == NOT_APPLICABLE, row

        # Captions show as typed, not rendered as Markdown / HTML / LaTeX (the answer column is Markdown, for its
        # line breaks).
        next(
            tab for tab in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if tab.text == "Rank captions"
        ).click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#captions textarea").is_displayed())
        driver.find_element(By.CSS_SELECTOR, "#captions textarea").send_keys("\n".join(TYPED_CAPTIONS))
        driver.find_element(By.ID, "rank").click()
        wait.until(lambda d: _status(d).startswith("1 of") and len(_table(d)) == len(FOLDERS))
        shown = {row[0]: dict(zip(RESULT_COLUMNS, row)) for row in _table(driver)}["retrieval"]["answer"]
        ranking = [re.fullmatch(r"\d\. (.+) \(ITC \d\.\d\d, ITM \d\.\d\d\)", line) for line in shown.splitlines()]
        assert all(ranking) and sorted(m.group(1) for m in ranking) == sorted(TYPED_CAPTIONS), shown

        screenshot = tmp_path / "app.png"
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    finally:
        driver.quit()
        demo.close()
