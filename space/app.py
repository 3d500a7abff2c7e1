"""The EfficientVLM app as a Hugging Face Space: every model of `$EFFICIENTVLM_MODELS` (Hub ids or folders,
separated by spaces or commas; a Space variable) or else of `DEFAULT_MODELS`, side by side.

The page is `trainers.app` of the EfficientVLM repository: found next to this file (a Space holding `app.py` and a
copy of `trainers/__init__.py` + `trainers/app/`, see README.md) or one folder up (this file inside a checkout).
The models bring their own code (`trust_remote_code=True`), so the Space does not install the repository.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for root in (HERE, HERE.parent):
    if (root / "trainers" / "app" / "__init__.py").is_file():
        sys.path.insert(0, str(root))
        break

from trainers.app import build_app, load_app_models, models_from_env  # noqa: E402

# Hub ids (or folders) shown when the Space sets no EFFICIENTVLM_MODELS variable: put yours here.
DEFAULT_MODELS: list[str] = []

sources = models_from_env(DEFAULT_MODELS)
if not sources:
    raise SystemExit(
        "No models to show: set the EFFICIENTVLM_MODELS variable (Hub ids or folders, space-separated) or fill "
        "DEFAULT_MODELS in app.py."
    )
demo = build_app(load_app_models(sources))

if __name__ == "__main__":
    # A Space runs this file; its port and address come from Gradio's GRADIO_SERVER_* variables.
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME"))
