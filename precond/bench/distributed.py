"""Per-rank cost of ``precond.DataParallel``: ``optimizer.step()`` time, bytes moved, peak memory and state bytes
(and, with ``--train``, a DDP training step of a GPT), for each mode and communication dtype.

Launch one process per GPU (NCCL) or per CPU process (gloo; the same code path)::

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 -m precond.bench.distributed --json dist2.json
    torchrun --nproc-per-node 1 -m precond.bench.distributed --json dist1.json   # the 1-rank baseline

Configurations (``--modes``, ``--comm``): ``single`` (``distributed=None``: every rank does all the work, today's
DDP), ``owner`` and ``replicate``, each owner run once per ``--comm`` dtype. Gradients are the same on every rank
(as after DDP's all-reduce) and fresh every step, drawn outside the timed region. Each timed step starts after a
barrier and ends with a device synchronisation; the medians, the bytes this rank's optimizer collectives sent and
received per step (``precond.distributed.traffic``; DDP's own gradient all-reduce is not included in ``step()``),
the peak memory above the parameters and gradients (CUDA) and the optimizer state bytes are gathered on rank 0,
printed as a table and written to ``--json``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

import precond
from precond.bench.device_time import profile_steps
from precond.bench.op_count import count_step_ops
from precond.bench.shapes import PRESETS as SHAPES
from precond.bench.timing import sync
from precond.bench.training import GPT2_SMALL, GPT_TINY
from precond.distributed import state_bytes, traffic
from precond.distributed.runtime import new_traffic
from precond.tasks.gpt import TinyGPT

COMM = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timed_iteration(device: torch.device, optimizer: torch.optim.Optimizer,
                    backward: Callable[[], Any]) -> tuple[float, float, Any]:
    """One training iteration started together on every rank (a barrier): ``backward()`` (forward and backward),
    then ``optimizer.step()`` and ``zero_grad``; returns (iteration ms, ``step()`` ms, what ``backward`` returned),
    each time ended by a device synchronisation."""
    sync(device)
    dist.barrier()
    start = time.perf_counter()
    returned = backward()
    sync(device)
    middle = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    end = time.perf_counter()
    return (end - start) * 1e3, (end - middle) * 1e3, returned


def _language_model_backward(model: torch.nn.Module, tokens: torch.Tensor, autocast: Any) -> torch.Tensor:
    """Next-token cross-entropy of ``tokens`` (forward under ``autocast``), backpropagated; the loss."""
    with autocast:
        logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss


def _optimizer(args, params, mode: str, comm: str) -> torch.optim.Optimizer:
    placement = args.placement if mode == "owner" else "balanced"
    distributed = None if mode == "single" else precond.DataParallel(mode=mode, comm_dtype=COMM[comm],
                                                                      placement=placement)
    return getattr(precond, args.preset)(params, lr=1e-4, every=args.every, max_dim=args.max_dim, stagger=True,
                                         distributed=distributed)


def _configurations(args) -> list[tuple[str, str]]:
    out = []
    for mode in args.modes.split(","):
        for comm in (args.comm.split(",") if mode == "owner" else ["float32"]):
            out.append((mode, comm))
    return out


def _gradients(params: list[torch.Tensor], steps: int, gen: torch.Generator) -> list[list[torch.Tensor]]:
    """Fresh gradients of ``params`` for ``steps`` steps, drawn before the steps are counted or profiled."""
    return [[torch.randn(p.shape, device=p.device, generator=gen) * 1e-3 for p in params] for _ in range(steps)]


def measure_step(args, device: torch.device, mode: str, comm: str) -> dict[str, Any]:
    """This rank's numbers for ``optimizer.step()`` on the ``--shapes`` parameters."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02) for s in SHAPES[args.shapes]]
    for p in params:
        p.grad = torch.empty_like(p)
    sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = _optimizer(args, params, mode, comm)
    times, moved = [], []
    for i in range(args.warmup + args.steps):
        for p in params:
            p.grad.normal_(generator=gen).mul_(1e-3)
        sync(device)
        dist.barrier()
        start = time.perf_counter()
        optimizer.step()
        sync(device)
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
            moved.append(traffic(optimizer) if mode != "single" else new_traffic())
    result = {
        "step_ms_median": statistics.median(times), "step_ms_mean": statistics.fmean(times), "step_ms_max": max(times),
        "bytes_sent_per_step": statistics.fmean(m["bytes_sent"] for m in moved),
        "bytes_received_per_step": statistics.fmean(m["bytes_received"] for m in moved),
        "collectives_per_step": statistics.fmean(m["collectives"] for m in moved),
        "early_collectives_per_step": statistics.fmean(m["early_collectives"] for m in moved),
        "state_bytes": state_bytes(optimizer),
        "finite": bool(all(torch.isfinite(p).all() for p in params)),
    }
    if args.count_ops:  # over T steps: every stagger phase once
        ops = count_step_ops(optimizer, params, _gradients(params, args.every, gen))
        result.update(ops_per_step=ops.total, ops_per_step_steady=ops.steady)
    if args.profile:
        result["profile"] = profile_steps(optimizer, params, _gradients(params, args.every, gen), device)
    if device.type == "cuda":
        result["peak_extra_bytes"] = torch.cuda.max_memory_allocated(device) - base
    del optimizer, params
    return result


def measure_training(args, device: torch.device, mode: str, comm: str) -> dict[str, Any]:
    """This rank's numbers for a DDP training step (forward, backward with DDP's all-reduce, ``step()``) of a GPT;
    each rank draws its own tokens."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(args.seed)
    size = GPT2_SMALL if args.model == "gpt2-small" else GPT_TINY
    model = TinyGPT(**size).to(device)
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = _optimizer(args, model.parameters(), mode, comm)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1000 * dist.get_rank())
    length = min(args.length, size["context"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, step_times = [], []
    for i in range(args.warmup + args.steps):
        tokens = torch.randint(0, size["vocab"], (args.batch, length + 1), device=device, generator=gen)
        iteration, step, loss = timed_iteration(
            device, optimizer, functools.partial(_language_model_backward, wrapped, tokens, autocast))
        if i >= args.warmup:
            times.append(iteration)
            step_times.append(step)
    result = {"iteration_ms_median": statistics.median(times), "step_ms_median": statistics.median(step_times),
              "tokens_per_s_per_rank": args.batch * length / (statistics.median(times) / 1e3),
              "state_bytes": state_bytes(optimizer), "final_loss": float(loss)}
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    del optimizer, wrapped, model
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration on the current process group; returns rank 0's report (other ranks: their own)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (torch.device(f"cuda:{torch.cuda.current_device()}") if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    measure = measure_training if args.train else measure_step
    meta = {"world": world, "backend": dist.get_backend(), "torch": torch.__version__, "preset": args.preset,
            "every": args.every, "max_dim": args.max_dim, "placement": args.placement, "steps": args.steps,
            "warmup": args.warmup,
            "what": "train" if args.train else "step", "shapes": None if args.train else args.shapes,
            "model": args.model if args.train else None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    results = {}
    for mode, comm in _configurations(args):
        mine = measure(args, device, mode, comm)
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        results[f"{mode}-{comm}" if mode == "owner" else mode] = everyone
        if rank == 0:
            print(f"{mode} {comm}: {everyone}", flush=True)
    report = {"meta": meta, "results": results}
    if rank == 0:
        print(table(report), flush=True)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(report, handle, indent=2)
    return report


def table(report: dict[str, Any]) -> str:
    """One line per configuration: rank-medians of the per-rank numbers."""
    meta = report["meta"]
    key = "iteration_ms_median" if meta["what"] == "train" else "step_ms_median"
    lines = [(f"{meta['what']} on {meta['world']} × {meta['device']} ({meta['backend']}), {meta['preset']}, "
             f"T={meta['every']}, max_dim={meta['max_dim']}"),
             f"{'config':<18}{key:>22}{'MB sent/step':>14}{'MB recv/step':>14}{'state MB':>10}{'peak MB':>10}"]
    for name, ranks in report["results"].items():
        worst = max(r[key] for r in ranks)
        sent = max(r.get("bytes_sent_per_step", 0) for r in ranks) / 2**20
        received = max(r.get("bytes_received_per_step", 0) for r in ranks) / 2**20
        state = max(r["state_bytes"] for r in ranks) / 2**20
        peak = max(r.get("peak_extra_bytes", r.get("peak_bytes", 0)) for r in ranks) / 2**20
        lines.append(f"{name:<18}{worst:>22.2f}{sent:>14.2f}{received:>14.2f}{state:>10.1f}{peak:>10.1f}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m precond.bench.distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="kl_shampoo", choices=precond.PRESETS)
    p.add_argument("--modes", default="single,owner,replicate", help="comma-separated: single, owner, replicate")
    p.add_argument("--comm", default="float32,bfloat16", help="owner mode's comm dtypes: float32, bfloat16")
    p.add_argument("--shapes", choices=sorted(SHAPES), default=None,
                   help="parameter shapes for step timing (default: gpt2-small on CUDA, small on CPU)")
    p.add_argument("--train", action="store_true", help="time a DDP training step of a GPT instead of step()")
    p.add_argument("--model", choices=("gpt2-small", "tiny"), default=None, help="GPT for --train (default by device)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--max-dim", type=int, default=2048)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3T)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2T + 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--placement", choices=("balanced", "by_kind"), default="balanced",
                   help="owner mode's DataParallel(placement=...)")
    p.add_argument("--count-ops", action="store_true",
                   help="also count this rank's top-level aten ops per step() over T more steps "
                        "(precond.bench.op_count)")
    p.add_argument("--profile", action="store_true",
                   help="also profile T more steps: this rank's kernel and collective time against its wall time "
                        "(precond.bench.device_time)")
    p.add_argument("--json", default="bench_distributed.json")
    return p


def resolve(args: argparse.Namespace, cuda: bool) -> argparse.Namespace:
    args.shapes = args.shapes or ("gpt2-small" if cuda else "small")
    args.model = args.model or ("gpt2-small" if cuda else "tiny")
    args.steps = args.steps or 3 * args.every
    args.warmup = args.warmup if args.warmup is not None else 2 * args.every + 2
    return args


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    args = resolve(parser().parse_args(argv), cuda)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (see docs/scaling.md)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        run(args)
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
