"""Command line: ``python -m precond.bench --shapes gpt2-small --every 10 --max-dim 2048``."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from precond.bench import contenders
from precond.bench.contenders import available, factory
from precond.bench.report import table, training_table
from precond.bench.shapes import PRESETS
from precond.bench.timing import time_steps
from precond.bench.training import GPT2_SMALL, GPT_TINY, time_training

DEFAULT = "adamw,kl_shampoo,soap,shampoo,hb_kl_shampoo,hb_soap,po_soap"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m precond.bench", description=__doc__)
    parser.add_argument("--shapes", choices=sorted(PRESETS), default=None,
                        help="parameter shapes (default: gpt2-small on CUDA, small on CPU)")
    parser.add_argument("--optimizers", default=DEFAULT, help=f"comma-separated (default {DEFAULT})")
    parser.add_argument("--every", type=int, default=10, help="refresh period T for every contender")
    parser.add_argument("--max-dim", type=int, default=2048, help="largest preconditioned mode for every contender")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3T)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2T + 2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls for every contender")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    parser.add_argument("--heavyball-compile-mode", default="default",
                        help="torch.compile mode for HeavyBall (its own default: max-autotune-no-cudagraphs)")
    parser.add_argument("--train", action="store_true",
                        help="time forward+backward+step of a GPT (GPT-2 small on CUDA, tiny on CPU) instead of step()")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    shapes_name = args.shapes or ("gpt2-small" if device.type == "cuda" else "small")
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    steps = args.steps or 3 * args.every
    warmup = args.warmup if args.warmup is not None else 2 * args.every + 2
    contenders.HEAVYBALL_COMPILE_MODE = None if args.heavyball_compile_mode == "none" else args.heavyball_compile_mode
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "every": args.every, "max_dim": args.max_dim, "steps": steps, "warmup": warmup,
            "tf32": args.tf32, "heavyball_compile_mode": args.heavyball_compile_mode}
    if args.train:
        size = GPT2_SMALL if device.type == "cuda" else GPT_TINY
        length = min(args.length, size["context"])
        meta.update(model=size, batch=args.batch, length=length)
        results = _each(args, lambda make: time_training(make, device, size, args.batch, length, warmup, steps))
        print(training_table(results, meta))
    else:
        meta.update(shapes=shapes_name)
        results = _each(args, lambda make: time_steps(make, PRESETS[shapes_name], device, warmup, steps))
        print(table(results, meta))
    with open(args.json, "w") as handle:
        json.dump({"meta": meta, "results": results}, handle, indent=2)
    return 0


def _each(args: argparse.Namespace, measure) -> dict[str, dict]:
    """``measure(factory)`` for every optimizer named on the command line; a failing peer is reported, not fatal."""
    results = {}
    for name in args.optimizers.split(","):
        if not available(name):
            print(f"skip {name}: its library is not installed (pip install 'precond[bench]')", flush=True)
            continue
        try:
            results[name] = measure(factory(name, args.every, args.max_dim))
        except Exception as error:  # a peer failing must not hide the others' numbers
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        print(f"{name}: {results[name]}", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
