"""`jaxgen convert`: checkpoint conversion from the command line.

    jaxgen convert --from transformers|gguf SRC -o DIR [--quantization TYPE] [--force]

`jaxgen.cli` registers the sub-command with `add_convert_parser(subparsers)`; the parsed
arguments run through `run_convert(args)`, which returns the process exit status.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from typing import Callable, Optional

SOURCES = ("transformers", "gguf")
QUANTIZATIONS = ("int8", "float32", "float16", "bfloat16", "int8_float32", "int8_float16", "int8_bfloat16")


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `convert` sub-command to an `argparse` sub-parsers object and returns its parser."""
    parser = subparsers.add_parser(
        "convert", help="convert a Hugging Face or GGUF checkpoint into a jaxgen model directory",
        description="Convert a checkpoint into a jaxgen model directory (config.json, model.safetensors, "
                    "vocabulary.json and the tokenizer files).")
    parser.add_argument("--from", dest="source_format", choices=SOURCES, required=True,
                        help="checkpoint format: a transformers checkpoint directory or a .gguf file")
    parser.add_argument("source", metavar="SRC", help="the checkpoint directory (transformers) or file (gguf)")
    parser.add_argument("-o", "--output-dir", "--output_dir", dest="output_dir", required=True,
                        help="the jaxgen model directory to write")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="weight type to store (default: the checkpoint's float type; int8 for a "
                             "quantized GGUF)")
    parser.add_argument("--force", action="store_true", help="overwrite the output directory if it exists")
    parser.set_defaults(func=run_convert)
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Runs a conversion from parsed arguments; prints errors to stderr and returns an exit status."""
    if os.path.exists(args.output_dir) and not args.force:
        print(f"jaxgen convert: error: output directory {args.output_dir} already exists "
              f"(use --force to overwrite it)", file=sys.stderr)
        return 2
    progress = _TqdmProgress()
    try:
        converter = make_converter(args.source_format, args.source, progress)
        output = converter.convert(args.output_dir, quantization=args.quantization, force=args.force)
    except (ValueError, RuntimeError, OSError, TypeError) as exc:
        progress.close()
        print(f"jaxgen convert: error: {exc}", file=sys.stderr)
        return 2
    progress.close()
    print(f"Converted {args.source} to {output}")
    return 0


def make_converter(source_format: str, source: str, progress: Optional[Callable[[int, int], None]] = None):
    """The converter for a source format, given `progress` when its constructor accepts one."""
    from jaxgen import converters

    if source_format == "transformers":
        cls = converters.TransformersConverter
    elif source_format == "gguf":
        cls = converters.GGUFConverter
    else:
        raise ValueError(f"unknown source format {source_format!r}; expected one of {SOURCES}")
    if progress is not None and _accepts_progress(cls):
        return cls(source, progress=progress)
    return cls(source)


def _accepts_progress(cls) -> bool:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return "progress" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class _TqdmProgress:
    """`progress(done, total)` callback drawing a tqdm bar over the converted tensors."""

    def __init__(self):
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="tensor", desc="Converting", file=sys.stderr)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
