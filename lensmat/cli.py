"""The ``lensmat`` command: parses arguments, calls the Python API, prints and writes reports."""

from __future__ import annotations

import argparse
import sys

import lensmat
from lensmat import data, models


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="'reference' (default, bundled), a local HF folder, or a hub name")
    p.add_argument("--dataset", default=None,
                   help="'leipzig-wiki' (default, bundled), a local .txt (one document per line), or hf:name[:config][:split][:column]")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--max-length", type=int, default=data.DEFAULT_MAX_LENGTH, help="tokens per line, BOS included")


def cmd_info(args: argparse.Namespace) -> int:
    model = models.load_model(args.model, device=args.device, dtype=args.dtype)
    info = models.describe(model)
    print(f"model       {info.name}")
    print(f"layers      {info.n_layers} blocks (residual layers 0..{info.n_layers})")
    print(f"d_model     {info.d_model}")
    print(f"vocabulary  {info.d_vocab}")
    print(f"context     {info.n_ctx}")
    print(f"basis       {info.basis} ({'HF weights, no LayerNorm folding' if info.basis == 'raw' else 'folded/centred'})")
    print(f"dtype       {models.model_dtype(model)}   device {models.model_device(model)}")
    spec = args.dataset or data.DEFAULT_CORPUS
    print(f"corpus      {spec}")
    for split in ("train", "heldout"):
        lines = data.load_lines(spec, split)
        seqs = data.tokenize(lines, model.tokenizer, args.max_length)
        print(f"  {split:<9} {len(lines):>7} lines {data.count_tokens(seqs):>9} tokens (BOS excluded)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lensmat",
        description="Fit linear maps between transformer layers and read them through lenses.",
    )
    parser.add_argument("--version", action="version", version=f"lensmat {lensmat.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="describe the model and the corpus")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (data.CorpusError, models.ModelLoadError, ValueError) as err:
        print(f"lensmat {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
