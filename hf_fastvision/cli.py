"""The `hf-fastvision` command: `info`, `demo`, `quantize`, `pull`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from hf_fastvision.errors import FastVisionError, InvalidArgumentError
from hf_fastvision.quantize import DTYPES
from hf_fastvision.quantize import argparse_type as _argument

__all__ = ["main", "build_parser", "positive_int", "non_negative_int", "folder_path"]


def _int_at_least(name: str, text: str, low: int, example: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        check = InvalidArgumentError.positive_int if low > 0 else InvalidArgumentError.non_negative_int
        raise check(name, text, example)
    return value


@_argument
def positive_int(text: str) -> int:
    """`--steps`: an integer >= 1."""
    return _int_at_least("--steps", text, 1, 100)


@_argument
def non_negative_int(text: str) -> int:
    """`--seed`: an integer >= 0."""
    return _int_at_least("--seed", text, 0, 0)


@_argument
def folder_path(text: str) -> str:
    """A folder to write into or read from: anything but an existing file."""
    if os.path.isfile(text):
        raise InvalidArgumentError.not_a_folder("folder", text)
    return text


def _info(args: argparse.Namespace) -> int:
    from hf_fastvision.info import describe, format_description

    kwargs: dict[str, Any] = {}
    if args.load_in_16bit:
        kwargs["load_in_16bit"] = True
    if args.keep_vision_16bit:
        kwargs["keep_vision_16bit"] = True
    if args.revision:
        kwargs["revision"] = args.revision
    if args.dtype and args.dtype != "auto":
        kwargs["dtype"] = args.dtype
    d = describe(args.model, **kwargs)
    if args.json:
        plan = d.pop("plan")
        d["plan"] = plan.summary() | {"quantized": plan.quantized, "kept": plan.kept}
        print(json.dumps(d, indent=2, default=str))
    else:
        print(format_description(d))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from hf_fastvision.demo import run_demo

    run_demo(steps=args.steps, seed=args.seed, output_dir=args.output_dir, quick=args.quick)
    return 0


def _pull(args: argparse.Namespace) -> int:
    from hf_fastvision.checkpoint_info import human_bytes
    from hf_fastvision.hub import pull

    snapshot = pull(args.repo_id, revision=args.revision, cache_dir=args.cache_dir)
    print(f"{args.repo_id}{'@' + args.revision if args.revision else ''}: bitsandbytes 4-bit checkpoint, "
          f"{human_bytes(snapshot.size_bytes)}")
    print(str(snapshot))
    return 0


def _quantize(argv: list[str]) -> int:
    from hf_fastvision.quantize import quantize_command

    return quantize_command(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-fastvision", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="resolution, architecture, quantization plan and memory, from the config alone")
    info.add_argument("model", help="Hub id or local folder")
    info.add_argument("--load-in-16bit", action="store_true")
    info.add_argument("--keep-vision-16bit", action="store_true")
    info.add_argument("--revision")
    info.add_argument("--dtype", choices=("auto", *DTYPES),
                      help="compute dtype (default auto: bfloat16 on GPUs that support it, float16 on others, float32 on CPU)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_info)
    demo = sub.add_parser("demo", help="fine-tune the embedded tiny model on a synthetic visual task")
    demo.add_argument("--steps", type=positive_int, default=None, help="training steps (default 200, 100 with --quick)")
    demo.add_argument("--seed", type=non_negative_int, default=0)
    demo.add_argument("--output-dir", type=folder_path, default=None, help="folder for the adapter (default: a temp folder)")
    demo.add_argument("--quick", action="store_true", help="a short run (used by the tests)")
    demo.set_defaults(func=_demo)
    pull = sub.add_parser("pull", help="download a bnb-4bit repo into the HF cache and check it really is one")
    pull.add_argument("repo_id")
    pull.add_argument("--revision")
    pull.add_argument("--cache-dir", type=folder_path)
    pull.set_defaults(func=_pull)
    sub.add_parser("quantize", help="quantize a model to 4-bit and publish it (see --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["quantize"]:
        return _quantize(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FastVisionError, ValueError) as exc:  # bad input, named with its fix: no traceback
        from hf_fastvision.hub import _secrets, scrub

        print(f"error: {scrub(str(exc), _secrets())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
