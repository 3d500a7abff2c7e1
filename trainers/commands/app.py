"""`efficientvlm app`: try saved models side by side in a browser (a Gradio page on this machine).

    efficientvlm app --models pruned_vqa teacher_vqa pruned_retrieval --port 7860
    efficientvlm app --models you/evlm-demo-pruned_vqa --share yes     # Hub ids too; a public gradio.live link

Upload an image; ask a question (VQA models), type candidate captions (retrieval models) or add a second image
and a statement (NLVR2 models); every model answers with its latency and size. `space/` holds the same page as a
Hugging Face Space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainers.app.inference import LATENCY_REPEATS
from trainers.commands.common import check_model_folder, check_not_mask_checkpoint, parse_arguments


@dataclass
class AppArguments:
    models: list[str] = field(
        default_factory=list,
        metadata={"help": "Required: saved model folders or Hub ids (any task), shown side by side."},
    )
    port: int | None = field(default=None, metadata={"help": "Port of the page (default: Gradio's, 7860 or next)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to serve on (0.0.0.0: every interface)."})
    latency_repeats: int = field(
        default=LATENCY_REPEATS, metadata={"help": "Timed runs of each answer; the page shows their median latency."}
    )
    share: bool = field(default=False, metadata={"help": "Also open a public gradio.live link (needs internet)."})


def main(argv: list[str] | None = None, block: bool = True) -> Any:
    """Loads the models, launches the page and (with `block`) serves until interrupted; returns the app."""
    (args,) = parse_arguments(
        "app", (AppArguments,), argv, "Try saved models side by side in a browser (a Gradio page)."
    )
    if not args.models:
        raise ValueError("Give --models: one or more saved model folders or Hub ids.")
    for model in args.models:
        check_model_folder(model, "--models")
        check_not_mask_checkpoint(model, "--models")
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise ImportError('`efficientvlm app` needs Gradio: pip install -e ".[app]"') from error
    from trainers.app import build_app, load_app_models

    if args.latency_repeats < 1:
        raise ValueError(f"--latency_repeats must be at least 1; got {args.latency_repeats}.")
    demo = build_app(load_app_models(args.models), repeats=args.latency_repeats)
    try:
        # quiet: gradio's own lines name its launch() arguments (`share=True`, ...), not this command's options.
        demo.launch(
            server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True, quiet=True
        )
    except OSError as error:
        if "Cannot find empty port" not in str(error):
            raise
        # gradio's message goes on to name `server_port` in launch(); the first sentence holds the ports tried.
        tried = str(error).split(". ")[0].rstrip(".")
        raise OSError(f"{tried} on {args.host}: give a free port with --port.") from error
    print(f"* Running on local URL:  {demo.local_url}")
    if not args.share:
        print("* A public gradio.live link as well: --share yes")
    if block:
        demo.block_thread()
    return demo


if __name__ == "__main__":
    main()
