"""Parity of the distributed optimizer with one process, on whatever backend ``torchrun`` gives (NCCL on GPUs).

Every rank runs the distributed optimizer and, on its own, the single-process optimizer from the same parameters and
gradients; it reports the largest difference after ``2T + 1`` steps (refreshes crossed, a step with a missing
gradient). Cases: every Kronecker preset in owner and replicate mode on small shapes of orders 1–3, and exact owner
mode on ``Shard(0)`` DTensor parameters of GPT-2-small shapes (``fully_shard``'s layout)::

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 -m precond.bench.distributed_parity --json parity.json
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

import precond
from precond.bench.shapes import PRESETS as SHAPE_PRESETS

KRONECKER = ("eshampoo", "idealized_kl_shampoo", "kl_shampoo", "kl_soap", "one_sided_shampoo", "shampoo", "soap")
SMALL = [(5,), (4, 6), (4, 6), (3, 4, 5), (6, 40)]
EVERY = 3
STEPS = 2 * EVERY + 1
MISSING = {2: (1,), 4: (0, 3)}


def _gradient(shape, step: int, i: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + i)
    return torch.randn(shape, generator=gen).to(device)


def _run(preset: str, shapes, device, distributed: Optional[precond.DataParallel], shard=None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=gen).to(device) for s in shapes]
    params = [torch.nn.Parameter(shard(t) if shard else t.clone()) for t in full]
    opt = getattr(precond, preset)(params, lr=1e-3, every=EVERY, max_dim=32 if shard is None else 2048,
                                   distributed=distributed)
    for step in range(1, STEPS + 1):
        for i, p in enumerate(params):
            grad = _gradient(shapes[i], step, i, device)
            p.grad = None if i in MISSING.get(step, ()) else (shard(grad) if shard else grad)
        opt.step()
    return [p.detach().full_tensor() if hasattr(p.detach(), "full_tensor") else p.detach() for p in params]


def _difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, Any]:
    return {"bitwise": all(torch.equal(x, y) for x, y in zip(a, b, strict=True)),
            "max_abs": max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)),
            "max_rel": max(float(((x - y).abs() / y.abs().clamp_min(1e-30)).max()) for x, y in zip(a, b, strict=True))}


def run(presets: tuple[str, ...], sharded_preset: str, sharded_shapes: str) -> dict[str, Any]:
    rank = dist.get_rank()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if torch.cuda.is_available() else \
        torch.device("cpu")
    out: dict[str, Any] = {}
    for preset in presets:
        alone = _run(preset, SMALL, device, None)
        for mode in ("owner", "replicate"):
            out[f"{preset}-{mode}"] = _difference(_run(preset, SMALL, device, precond.DataParallel(mode=mode)), alone)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    shapes = SHAPE_PRESETS[sharded_shapes]
    alone = _run(sharded_preset, shapes, device, None, shard=lambda t: t)
    sharded = _run(sharded_preset, shapes, device, precond.DataParallel(),
                   shard=lambda t: distribute_tensor(t, mesh, [Shard(0)]))
    out[f"fsdp-{sharded_preset}-{sharded_shapes}"] = _difference(sharded, alone)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(KRONECKER))
    parser.add_argument("--sharded-preset", default="kl_shampoo")
    parser.add_argument("--sharded-shapes", choices=sorted(SHAPE_PRESETS), default="gpt2-small")
    parser.add_argument("--json", default="parity.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    try:
        result = run(tuple(args.presets.split(",")), args.sharded_preset, args.sharded_shapes)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        if dist.get_rank() == 0:
            report = {"world": dist.get_world_size(), "backend": dist.get_backend(), "ranks": gathered}
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=1)
            for name in gathered[0]:
                worst = max(r[name]["max_abs"] for r in gathered)
                bitwise = all(r[name]["bitwise"] for r in gathered)
                print(f"{name}: bitwise {bitwise}, max |Δ| {worst:.3e}")
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
