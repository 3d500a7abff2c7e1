"""A Gradio app to try saved models side by side in a browser (`efficientvlm app`, or `space/app.py` as a Hugging Face
Space): `inference` computes (no UI), `ui` builds the page. Only torch, transformers, PIL and gradio are imported,
never the rest of this repository, so the package can ship inside a Space next to `app.py`."""

from __future__ import annotations

from .inference import (
    INPUT_KINDS,
    MODELS_ENV,
    NOT_APPLICABLE,
    RESULT_COLUMNS,
    AppInputError,
    AppModel,
    load_app_model,
    load_app_models,
    models_from_env,
    predict,
)
from .ui import build_app, run_request

__all__ = [
    "INPUT_KINDS",
    "MODELS_ENV",
    "NOT_APPLICABLE",
    "RESULT_COLUMNS",
    "AppInputError",
    "AppModel",
    "build_app",
    "load_app_model",
    "load_app_models",
    "models_from_env",
    "predict",
    "run_request",
]
