"""``python -m precond.bench.profile``: where one contender's ``step()`` spends its time (torch profiler table; the
gradients are drawn outside the profiled region, so the table and the op count are ``step()``'s alone), and on CUDA
whether the step keeps the device busy: wall time, kernel time and their ratio per step
(:func:`precond.bench.device_time.profile_steps`, Eq. 1 there; a captured step's kernels are counted too)."""

from __future__ import annotations

import argparse

import torch

from precond.bench.contenders import factory
from precond.bench.device_time import profile_steps
from precond.bench.op_count import counted, tagged_refreshes
from precond.bench.shapes import PRESETS
from precond.bench.timing import profiler_activities, step_with, sync


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
    grads = [[torch.randn_like(p) * 1e-3 for p in params] for _ in range(args.steps)]  # drawn before profiling
    sync(device)
    with tagged_refreshes(optimizer), torch.profiler.profile(activities=profiler_activities(device)) as prof:
        step_with(optimizer, params, grads)
        sync(device)
    ops = counted(prof, args.steps)
    print(f"{args.optimizer}: {ops.total:.1f} top-level aten ops per step() "
          f"({ops.refresh:.1f} of them in basis refreshes; each launches at most a kernel or two on CUDA; "
          "views included; precond.bench.op_count counts the same)")
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))
    if device.type == "cuda":  # a second pass, timed around the steps alone (the profiler still records them)
        busy = profile_steps(optimizer, params, grads, device)
        print(f"{args.optimizer}: {busy['wall_ms_per_step']:.3f} ms wall and {busy['kernel_ms_per_step']:.3f} ms of "
              f"kernels per step(): busy {busy['busy']:.2f} (below 1: the host, not the device, sets the step)")


if __name__ == "__main__":
    main()
