"""A real ``fully_shard`` (FSDP2) GPT in exact owner mode against one process on the whole batch.

Every rank builds the same GPT (GPT-2 small: 12 layers, width 768, 12 heads, vocabulary 50257, context 1024, untied
head, ``precond.tasks.gpt.TinyGPT``; with ``--small`` the 2-layer, width-64, 256-token one of
``precond.bench.training.GPT_TINY``) from the same seed, applies ``fully_shard`` to each block and then to the root,
and trains ``--steps`` steps with a preset and ``distributed=precond.DataParallel(mode="owner")`` (DTensor
parameters select the FSDP2 exact owner runtime, ``precond/distributed/sharded.py``), each rank on its own
micro-batch of ``--batch`` sequences (``--steps`` 6 at ``T = --every`` 2: refreshes fall inside). On rank 0 two
one-process runs (the ordinary module from the same initialisation, ``distributed=None``) take the same steps on
the concatenation of all ranks' micro-batches:

- ``single``: one forward and backward over the whole batch. The loss is the mean cross-entropy over a batch's
  tokens, so FSDP2's averaging reduce-scatter gives the same gradient, ``∇ (1/W) Σ_r L_r = ∇ L`` for equal
  micro-batches, up to the order of float sums (per-rank partial sums, then the reduce-scatter; one process sums
  all tokens in one matmul): parity means "within round-off growth", not bitwise;
- ``accumulated``: one backward per rank's micro-batch, the gradients summed and divided by ``W`` — FSDP2's
  arithmetic up to the order of that sum (exact at ``W = 2``). Against it the sharded run isolates what the
  distribution does (bitwise on CPU gloo, float32 and float64); ``single`` against ``accumulated`` is how much the
  preset itself amplifies gradient round-off (SOAP's Adam in an eigenbasis that is arbitrary inside a first step's
  degenerate null space turns a 1e-18 gradient difference into O(lr) updates; Shampoo's grafting with ε = 1e-12
  magnifies float32 round-off, as ``tests/distributed_workers.TinyNet`` explains).

After every step rank 0 records, against each: the losses (the sharded one averaged over ranks), the largest
absolute difference of the gradients before the step and of the parameters after it (full tensors gathered from
the shards), per tensor and where it is largest, and, for scale, how far the one-process parameters have moved
from their initialisation. Then, per preset, a fresh sharded run (no reference in memory; ``T = --timing-every``
10, staggered) is timed: median iteration (forward, backward, ``step()``) and ``step()`` alone over ``--timed``
steps after ``--warmup``, with each rank's peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak
resident set) and optimizer state bytes. TF32 is off everywhere. Output: ``--out`` JSON (world size, device, torch
version, per-preset per-step differences, per-rank timings) and a summary on stdout; ``--tolerance`` fails the
exit status when a parameter differs from ``--tolerance-reference`` (``single``) by more.

Launch (one process per GPU, NVLink multicast off)::

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc-per-node 2 \\
        -m precond.bench.fully_shard_parity --out fully_shard_nccl2.json

On CPU (the same code path on gloo; what ``tests/test_fully_shard_parity.py`` runs)::

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m precond.bench.fully_shard_parity \\
        --backend gloo --device cpu --small --out fully_shard_gloo2.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import resource
import statistics
import sys
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.nn import functional as F

import precond
from precond.bench.distributed import timed_iteration
from precond.bench.training import GPT2_SMALL, GPT_TINY
from precond.distributed import state_bytes
from precond.tasks.gpt import TinyGPT

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --- model, data, optimizer ---------------------------------------------------------------------------------
def build_model(size: dict[str, int], seed: int, device: torch.device, dtype: torch.dtype) -> TinyGPT:
    """The GPT initialised on the CPU from ``seed`` (so every rank and the reference get the same bits), then moved."""
    torch.manual_seed(seed)
    return TinyGPT(**size).to(device=device, dtype=dtype)


def shard(model: TinyGPT, mesh) -> TinyGPT:
    """``fully_shard`` each transformer block, then the root (embeddings, final norm and head)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def tokens(step: int, rows: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """The global batch of step ``step``: ``rows`` sequences of ``length + 1`` token ids, the same on every rank."""
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    return torch.randint(0, vocab, (rows, length + 1), generator=gen)


def loss_of(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every token of ``batch``."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def make_optimizer(args, params, distributed: Optional[precond.DataParallel], preset: str, every: int,
                   stagger: bool = False):
    """The preset at ``T = every`` with the run's ``max_dim``, weight decay and dtype; TF32 off."""
    return getattr(precond, preset)(params, every=every, max_dim=args.max_dim, weight_decay=args.weight_decay,
                                    state_dtype=DTYPES[args.dtype], tf32=False, stagger=stagger,
                                    distributed=distributed)


def data_parallel(args) -> precond.DataParallel:
    return precond.DataParallel(mode="owner", comm_dtype=DTYPES[args.dtype])


# --- parity ---------------------------------------------------------------------------------------------------
def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``Shard(0)`` DTensor (a collective: every rank calls it in the same order)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _gather(sharded: list[tuple[str, torch.Tensor]], keep: bool) -> dict[str, torch.Tensor]:
    """The whole tensors of ``sharded`` (a collective: every rank calls it, in the same order); kept where ``keep``."""
    out = {}
    for name, tensor in sharded:
        full = _full(tensor.detach())
        if keep:
            out[name] = full
    return out


def _differences(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """``max |got − reference|`` of each tensor, by name."""
    return {name: float((tensor - reference[name]).abs().max()) for name, tensor in got.items()}


class Reference:
    """A one-process run on rank 0: the ordinary module, ``distributed=None``, the whole global batch each step.

    ``accumulate=False``: one forward and backward over the concatenated batch (the reference the comparison is
    about). ``accumulate=True``: one backward per rank's micro-batch, the gradients summed and divided by ``W``,
    as FSDP2's averaging reduce-scatter does: the same arithmetic as the sharded run up to the order of the sum
    (exact for ``W = 2``), so its difference to the sharded run isolates what the distribution itself does, and its
    difference to the concatenated run shows how much the preset amplifies gradient round-off.
    """

    def __init__(self, args, size: dict[str, int], preset: str, device: torch.device, accumulate: bool) -> None:
        dtype = DTYPES[args.dtype]
        self.model = build_model(size, args.seed, device, dtype)
        self.optimizer = make_optimizer(args, self.model.parameters(), None, preset, args.every)
        self.initial = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.accumulate, self.micro = accumulate, args.batch

    def backward(self, batch: torch.Tensor) -> float:
        """The gradients of the mean loss over ``batch``; returns that loss."""
        if not self.accumulate:
            loss = loss_of(self.model, batch)
            loss.backward()
            return float(loss.detach())
        pieces = batch.split(self.micro)
        losses = []
        for piece in pieces:
            loss = loss_of(self.model, piece)
            loss.backward()
            losses.append(float(loss.detach()))
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.div_(len(pieces))
        return sum(losses) / len(losses)

    def grads(self) -> dict[str, torch.Tensor]:
        return {n: p.grad for n, p in self.model.named_parameters()}

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def moved(self) -> float:
        """``max |W − W₀|``: how far the parameters have moved (the scale a difference is measured against)."""
        return max(float((p - self.initial[n]).abs().max()) for n, p in self.params().items())


def _record(row: dict[str, Any], what: str, reference: str, differences: dict[str, float]) -> None:
    """The largest difference, where it is, and every tensor's (``what``: grad or param) into ``row``."""
    where = max(differences, key=differences.get)
    row[f"{what}_max_abs_diff_{reference}"] = differences[where]
    row[f"{what}_max_abs_diff_param_{reference}"] = where
    row[f"{what}_diffs_{reference}"] = differences


def parity(args, size: dict[str, int], preset: str, device: torch.device, mesh) -> Optional[list[dict[str, Any]]]:
    """Per-step differences of the sharded run to the two one-process runs (rank 0; None elsewhere)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = shard(build_model(size, args.seed, device, DTYPES[args.dtype]), mesh)
    optimizer = make_optimizer(args, model.parameters(), data_parallel(args), preset, args.every)
    references = {}
    if rank == 0:
        references = {"single": Reference(args, size, preset, device, accumulate=False),
                      "accumulated": Reference(args, size, preset, device, accumulate=True)}
    rows = []
    for step in range(1, args.steps + 1):
        batch = tokens(step, world * args.batch, args.length, size["vocab"], args.seed).to(device)
        loss = loss_of(model, batch[rank * args.batch:(rank + 1) * args.batch])
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # SUM (gloo has no AVG); equal micro-batches, so the mean is SUM / W
        row: dict[str, Any] = {"step": step, "loss_fsdp": float(mean_loss) / world}
        grads = _gather([(n, p.grad) for n, p in model.named_parameters()], keep=rank == 0)
        for name, reference in references.items():
            row[f"loss_{name}"] = reference.backward(batch)
            row[f"loss_abs_diff_{name}"] = abs(row["loss_fsdp"] - row[f"loss_{name}"])
            _record(row, "grad", name, _differences(grads, reference.grads()))
        if references:
            row["grad_max_abs"] = max(float(g.abs().max()) for g in references["single"].grads().values())
        del grads
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        params = _gather(list(model.named_parameters()), keep=rank == 0)
        for name, reference in references.items():
            reference.step()
            _record(row, "param", name, _differences(params, reference.params()))
        if references:
            row["param_max_abs_moved"] = references["single"].moved()
            row["param_max_rel_diff_single"] = row["param_max_abs_diff_single"] / max(row["param_max_abs_moved"], 1e-30)
            rows.append(row)
        del params
    del model, optimizer, references
    return rows if rank == 0 else None


# --- timing -------------------------------------------------------------------------------------------------------
def _backward(model: torch.nn.Module, batch: torch.Tensor) -> None:
    loss_of(model, batch).backward()


def timing(args, size: dict[str, int], preset: str, device: torch.device, mesh) -> dict[str, Any]:
    """This rank's steady-state times and memory of a fresh sharded run (no reference model in memory)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = shard(build_model(size, args.seed, device, DTYPES[args.dtype]), mesh)
    optimizer = make_optimizer(args, model.parameters(), data_parallel(args), preset, args.timing_every, stagger=True)
    iterations, steps = [], []
    for i in range(args.warmup + args.timed):
        batch = tokens(10_000 + i, world * args.batch, args.length, size["vocab"], args.seed)
        batch = batch[rank * args.batch:(rank + 1) * args.batch].to(device)
        iteration, step, _ = timed_iteration(device, optimizer, functools.partial(_backward, model, batch))
        if i >= args.warmup:
            iterations.append(iteration)
            steps.append(step)
    out: dict[str, Any] = {
        "iteration_ms_median": statistics.median(iterations) if iterations else None,
        "step_ms_median": statistics.median(steps) if steps else None,
        "step_ms_max": max(steps) if steps else None,
        "state_bytes": state_bytes(optimizer),
        "finite": bool(all(torch.isfinite(p.detach().to_local()).all() for p in model.parameters())),
    }
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    else:  # the whole process's peak resident set (KiB on Linux), the parity phase included
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del model, optimizer
    return out


# --- driver -----------------------------------------------------------------------------------------------------
def summary(report: dict[str, Any]) -> str:
    model = report["model"]
    lines = [f"fully_shard parity on {report['world']} × {report['device']} ({report['backend']}, torch "
             f"{report['torch']}, {report['dtype']}): {model['name']} GPT ({model['layers']} layers, width "
             f"{model['width']}, vocab {model['vocab']}), {report['batch_per_rank']} × {report['length']} tokens per "
             f"rank, {report['steps']} steps at T={report['every']}, max_dim {report['max_dim']}"]
    for preset, result in report["presets"].items():
        rows, ranks = result["steps"], result["timing"]
        lines.append(f"{preset} (moved {rows[-1]['param_max_abs_moved']:.3e}):")
        for name in ("single", "accumulated"):
            lines.append(f"    vs {name:<12} max |Δparam| {max(r[f'param_max_abs_diff_{name}'] for r in rows):.3e} "
                         f"(last step {rows[-1][f'param_max_abs_diff_{name}']:.3e}), "
                         f"step-1 |Δgrad| {rows[0][f'grad_max_abs_diff_{name}']:.3e}, "
                         f"max |Δloss| {max(r[f'loss_abs_diff_{name}'] for r in rows):.3e}")
        if ranks[0]["step_ms_median"] is not None:
            peak = [r.get("peak_allocated_bytes", r.get("peak_rss_bytes")) / 2**20 for r in ranks]
            lines.append("    iteration ms " + " / ".join(f"{r['iteration_ms_median']:.2f}" for r in ranks)
                         + ", step ms " + " / ".join(f"{r['step_ms_median']:.2f}" for r in ranks)
                         + ", peak MiB " + " / ".join(f"{p:.0f}" for p in peak)
                         + ", state MiB " + " / ".join(f"{r['state_bytes'] / 2**20:.1f}" for r in ranks))
    return "\n".join(lines)


def run(args: argparse.Namespace, device: torch.device) -> Optional[dict[str, Any]]:
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    size = GPT_TINY if args.small else GPT2_SMALL
    mesh = init_device_mesh(device.type, (world,))
    report: dict[str, Any] = {
        "world": world, "backend": dist.get_backend(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "dtype": args.dtype, "model": {"name": "tiny" if args.small else "gpt2-small", **size},
        "batch_per_rank": args.batch, "length": args.length, "steps": args.steps, "every": args.every,
        "max_dim": args.max_dim, "weight_decay": args.weight_decay, "seed": args.seed,
        "timing_every": args.timing_every, "warmup": args.warmup, "timed": args.timed, "tf32": False, "presets": {},
    }
    for preset in args.presets.split(","):
        rows = parity(args, size, preset, device, mesh)
        mine = timing(args, size, preset, device, mesh)
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            report["presets"][preset] = {"steps": rows, "timing": everyone}
            print(f"{preset}: max |Δparam| vs single {max(r['param_max_abs_diff_single'] for r in rows):.3e}, "
                  f"vs accumulated {max(r['param_max_abs_diff_accumulated'] for r in rows):.3e}", flush=True)
    return report if rank == 0 else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m precond.bench.fully_shard_parity",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON report (written by rank 0)")
    p.add_argument("--presets", default="kl_shampoo,soap,shampoo", help="comma-separated precond presets")
    p.add_argument("--steps", type=int, default=6, help="compared steps (refreshes every --every fall inside)")
    p.add_argument("--every", type=int, default=2, help="T, the preset's refresh interval")
    p.add_argument("--small", action="store_true", help="the tiny GPT (CPU validation) instead of GPT-2 small")
    p.add_argument("--batch", type=int, default=None, help="sequences per rank (default 4; --small: 2)")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--max-dim", type=int, default=2048)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="parameters, optimizer state and exchanged updates")
    p.add_argument("--timing-every", type=int, default=10, help="T of the timing run (staggered refreshes)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps of the timing run (default 2T + 2)")
    p.add_argument("--timed", type=int, default=None, help="timed steps (default 20; --small: 3; 0 skips timing)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="exit non-zero if any step's max |Δparam| against --tolerance-reference exceeds this")
    p.add_argument("--tolerance-reference", choices=("single", "accumulated"), default="single")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None, help="default: nccl with CUDA, else gloo")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    if args.backend == "nccl" and args.device != "cuda":
        raise ValueError("--backend nccl needs --device cuda")
    size = GPT_TINY if args.small else GPT2_SMALL
    args.batch = args.batch or (2 if args.small else 4)
    args.length = args.length or size["context"]
    args.warmup = args.warmup if args.warmup is not None else 2 * args.timing_every + 2
    args.timed = args.timed if args.timed is not None else (3 if args.small else 20)
    if min(args.steps, args.every, args.timing_every, args.batch, args.length) < 1 or min(args.warmup, args.timed) < 0:
        raise ValueError("--steps, --every, --timing-every, --batch and --length must be positive; --warmup and "
                         "--timed must be ≥ 0")
    if args.length > size["context"]:
        raise ValueError(f"--length {args.length} exceeds the model's context {size['context']}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = resolve(parser().parse_args(argv))
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (docs/scaling.md)
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend)
    failed = False
    try:
        report = run(args, device)
        if report is not None:
            with open(args.out, "w") as handle:
                json.dump(report, handle, indent=1)
            print(summary(report), flush=True)
            key = f"param_max_abs_diff_{args.tolerance_reference}"
            worst = max(r[key] for p in report["presets"].values() for r in p["steps"])
            if args.tolerance is not None and not worst <= args.tolerance:
                print(f"FAILED: max |Δparam| against {args.tolerance_reference} {worst:.3e} > tolerance "
                      f"{args.tolerance:.3e}", flush=True)
                failed = True
        gc.collect()  # FSDP2's modules sit in reference cycles: free them (and their gloo work) while the group lives
        verdict = [failed]
        dist.broadcast_object_list(verdict, src=0)  # every rank exits alike (torchrun ends the others otherwise)
        failed = verdict[0]
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
