"""`efficientvlm demo`: the whole method end to end on built-in data (no downloads); see `trainers.demo.run`."""

from __future__ import annotations

from pathlib import Path


def main(argv: list[str] | None = None) -> Path:
    """Runs the demo with the options in `argv` (default: `sys.argv[1:]`); returns the report's path."""
    import sys

    from trainers.commands.common import check_single_process
    from trainers.demo.run import main as run_demo

    check_single_process("demo", sys.argv[1:] if argv is None else argv)
    return run_demo(argv)


if __name__ == "__main__":
    main()
