"""`efficientvlm recipes`: the recipes shipped with the package, one line each (`--recipe NAME` on the training
commands fills their options; `trainers/recipes/<name>.json` holds each, with the source of every number)."""

from __future__ import annotations

import argparse
import sys

from trainers.commands.common import check_single_process
from trainers.recipes import RECIPE_DIR, describe_recipes, load_recipe


def main(argv: list[str] | None = None) -> None:
    """Prints the recipes, or with a name the recipe file's contents."""
    check_single_process("recipes", sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="efficientvlm recipes",
        description="List the recipes of `--recipe`, or print one (its options, and the source of each number).",
    )
    parser.add_argument("name", nargs="?", help=f"a recipe to print (its file is in {RECIPE_DIR})")
    # Every command takes it; printing a recipe runs no torch op.
    parser.add_argument("--num_threads", type=int, default=None, help="Accepted as by every command (unused).")
    args = parser.parse_args(argv)
    if args.name is None:
        print(describe_recipes())
    else:
        print(load_recipe(args.name).path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
