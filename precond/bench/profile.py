"""``python -m precond.bench.profile``: where one contender's ``step()`` spends its time (torch profiler table)."""

from __future__ import annotations

import argparse

import torch

from precond.bench.contenders import factory
from precond.bench.shapes import PRESETS


def top_level_ops(prof) -> int:
    """Number of ``aten::`` calls not nested in another ``aten::`` call: what the optimizer itself issued."""
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m precond.bench.profile")
    parser.add_argument("--optimizer", default="kl_shampoo")
    parser.add_argument("--shapes", default="gpt2-small", choices=sorted(PRESETS))
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--max-dim", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in PRESETS[args.shapes]]
    optimizer = factory(args.optimizer, args.every, args.max_dim)(params)
    for _ in range(2 * args.every + 2):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        optimizer.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    print(f"{args.optimizer}: {top_level_ops(prof) / args.steps:.0f} top-level aten ops per step "
          f"(each launches at most a kernel or two on CUDA; views included)")
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
