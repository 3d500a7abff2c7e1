from setuptools import find_packages, setup

setup(
    name="efficientvlm",
    version="0.1.0",
    description=(
        "EfficientVLM: compress X-VLM-style vision-language models with knowledge distillation and "
        "modal-adaptive pruning, as Hugging Face Transformers models."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_efficientvlm", "trainers", "trainers.*"]),
    # Metric folders are loadable with `evaluate.load(<folder>)`, so their scripts ship as files too; the
    # `--recipe` files ship with the package so a non-editable install has them.
    package_data={
        "trainers": ["evaluation/metrics/*/*.py", "evaluation/metrics/*/README.md"],
        "trainers.recipes": ["*.json"],
    },
    # Lower bounds only: pins that stop installing are a bug we promised our users not to ship.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.23.0",  # tested with 5.23.0 and 5.25.0 (older: no create_subconfig / activation_checkpointing)
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4.3",
        "huggingface_hub>=1.0",
        "pycocoevalcap>=1.2",
        "pillow>=10.0",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "ninja>=1.11",  # attn_implementation="efficientvlm_cpu" builds its CPU kernel on first use
    ],
    extras_require={
        # `efficientvlm export`: ONNX graphs (torch's TorchScript exporter, so no onnxscript), onnxruntime for the
        # parity check, int8 (dynamic quantization) and running the graphs.
        "export": ["onnx>=1.15", "onnxruntime>=1.17"],
        "dev": [
            "onnx>=1.15",  # the export tests run in CI: the `export` extra's packages
            "onnxruntime>=1.17",
            "pytest>=8.0",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",  # setup.cfg runs the tests in parallel
            "ruff>=0.6",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            # The app's browser test (tests/test_app.py) drives Debian's chromium + chromium-driver (.ci/run).
            "gradio>=6.0",
            "selenium>=4.20",
            # The ZeRO-2 resume test (tests/test_distributed.py) runs DeepSpeed's CPU accelerator; its first run
            # on a machine builds a small CPU extension (cached under ~/.cache/torch_extensions).
            "deepspeed>=0.17",
        ],
        # `efficientvlm app` and space/app.py: models side by side in a browser (tested with gradio 6.31).
        "app": ["gradio>=6.0"],
    },
    entry_points={"console_scripts": ["efficientvlm=trainers.commands:console"]},
)
