"""A ``torch.distributed.checkpoint`` round trip of the distributed optimizer on whatever backend ``torchrun`` gives.

``save`` trains a small MLP (each rank the same gradients) for ``SAVE_AT`` steps in owner mode, saves model and
optimizer with :func:`precond.distributed.checkpoint.save`, goes on ``AFTER`` steps and keeps the parameters (the
uninterrupted run); ``load`` builds afresh at its own world size, loads, takes the same ``AFTER`` steps and reports
the largest difference to the uninterrupted run::

    torchrun --nproc-per-node 2 -m precond.bench.distributed_checkpoint save --dir ckpt
    torchrun --nproc-per-node 1 -m precond.bench.distributed_checkpoint load --dir ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import torch
import torch.distributed as dist

import precond
from precond.distributed import checkpoint

SAVE_AT, AFTER = 4, 3


def _model(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.Tanh(), torch.nn.Linear(48, 48), torch.nn.Tanh(),
                               torch.nn.Linear(48, 4)).to(device)


def _optimizer(model: torch.nn.Module, preset: str) -> torch.optim.Optimizer:
    return getattr(precond, preset)(model.parameters(), lr=1e-2, every=2, distributed=precond.DataParallel())


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> list[torch.Tensor]:
    for step in steps:
        for i, p in enumerate(model.parameters()):
            gen = torch.Generator().manual_seed(100 * step + i)
            p.grad = torch.randn(p.shape, generator=gen).to(p.device)
        optimizer.step()
    return [p.detach().cpu().clone() for p in model.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("save", "load"))
    parser.add_argument("--dir", required=True)
    parser.add_argument("--presets", default="kl_shampoo,soap,shampoo")
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{dist.get_rank() % torch.cuda.device_count()}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    root = pathlib.Path(args.dir)
    report = {}
    try:
        for preset in args.presets.split(","):
            model = _model(device)
            optimizer = _optimizer(model, preset)
            if args.what == "save":
                _steps(model, optimizer, range(1, SAVE_AT + 1))
                checkpoint.save(model, optimizer, str(root / preset))
                after = _steps(model, optimizer, range(SAVE_AT + 1, SAVE_AT + AFTER + 1))
                if dist.get_rank() == 0:
                    torch.save(after, root / f"{preset}-uninterrupted.pt")
                continue
            checkpoint.load(model, optimizer, str(root / preset))
            after = _steps(model, optimizer, range(SAVE_AT + 1, SAVE_AT + AFTER + 1))
            expected = torch.load(root / f"{preset}-uninterrupted.pt")
            report[preset] = {"bitwise": all(torch.equal(a, b) for a, b in zip(after, expected, strict=True)),
                              "max_abs": max(float((a - b).abs().max()) for a, b in zip(after, expected, strict=True))}
        if report and dist.get_rank() == 0:
            print(json.dumps({"world": dist.get_world_size(), "backend": dist.get_backend(), "resumed": report}))
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
