"""Refresh quality and refresh time on real factors: ``python -m precond.bench.refine_quality --json q.json``.

1. **Capture.** Trains GPT-2 small (CUDA; a tiny GPT elsewhere) with a KL-Shampoo configuration on byte tokens of
   Python's standard library sources (``precond.tasks.corpus``; ``--data random`` for random ids) for ``warmup``
   steps, then snapshots the KL factors ``S_k`` of a few layers every ``T`` steps, ``refreshes + 1`` times.
2. **Quality.** From ``eigh``'s basis of the first snapshot, each refresher refreshes at each later snapshot, as it
   would every ``T`` steps in a run. After every refresh: the orthogonality ``‖QᵀQ − I‖_F``, the off-diagonal
   energy ``‖offdiag(QᵀSQ)‖_F / ‖diag(QᵀSQ)‖₂`` and the error of the inverse root the basis gives
   (:func:`root_error`; all in float64; ``eigh``'s own basis and the never refreshed start as references). The
   off-diagonal energy weighs each direction by its eigenvalue and hardly sees the small ones, which the
   preconditioner scales the most: on the CPU, ``bases.Refine`` leaves less of it than the QR power step but a larger
   root error, which is how the two ranked on the GPU task (``docs/benchmarks.md``).
3. **Time.** One refresh of each refresher on factors of each size (batch 1 and a stack), median of CUDA events.

Matrix products run with TF32 allowed, as inside ``precond.Optimizer(tf32=True)`` (``CholeskyQR`` reads it;
``QRPowerStep`` and ``Refine(precision=...)`` set their own). One JSON with everything, and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch

import bases
from estimators._common import dimension_floor
from precond.bench.contenders import factory
from precond.bench.training import GPT2_SMALL, GPT_TINY, train_step
from precond.precision import tf32_matmuls
from precond.refresh import rayleigh_quotients
from precond.tasks.corpus import read_corpus
from precond.tasks.gpt import TinyGPT

REFRESHERS: dict[str, Callable[[], Any]] = {
    "eigh": lambda: bases.Eigh(every=1),
    "qr": lambda: bases.QRPowerStep(every=1),
    "qr_power2": lambda: bases.QRPowerStep(every=1, power=2),
    "qr_power3": lambda: bases.QRPowerStep(every=1, power=3),
    "cholesky_qr": lambda: bases.CholeskyQR(every=1, warmup=0),
    "cholesky_qr64": lambda: bases.CholeskyQR(every=1, warmup=0, precision="float64"),
    "cholesky_qr64_2pass": lambda: bases.CholeskyQR(every=1, warmup=0, precision="float64", plain_passes=1),
    "refine": lambda: bases.Refine(every=1),
    "refine1": lambda: bases.Refine(every=1, sweeps=1),
    "refine_bf16": lambda: bases.Refine(every=1, precision="bfloat16"),
    "refine_float32": lambda: bases.Refine(every=1, precision="float32"),
}
"""Every refresher compared (``every`` is irrelevant here: each is called once per snapshot)."""

PARAMETERS = ("tokens.weight", "blocks.0.attn.qkv.weight", "blocks.0.fc.weight", "blocks.{mid}.out.weight",
              "blocks.{last}.attn.qkv.weight", "blocks.{last}.fc.weight")
"""The parameters whose factors are captured (``mid``/``last``: the middle and last block)."""


def orthogonality(q: torch.Tensor) -> float:
    q = q.double()
    return float(torch.linalg.matrix_norm(q.mT @ q - torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)).max())


def inverse_root(factor: torch.Tensor) -> torch.Tensor:
    """``S^{-1/2}`` in float64 from ``eigh``, the eigenvalues raised to KL's floor first."""
    values, vectors = torch.linalg.eigh(factor.double())
    return (vectors * values.clamp_min(dimension_floor(factor.shape[-1])).rsqrt()) @ vectors.mT


def root_error(factor: torch.Tensor, basis: torch.Tensor, exact: Optional[torch.Tensor] = None) -> float:
    """``‖Q D^{-1/2} Qᵀ − S^{-1/2}‖_F / ‖S^{-1/2}‖_F`` in float64, ``D = diag(QᵀSQ)``, each spectrum (``D`` and the
    eigenvalues of ``S``) raised to KL's floor ``max(10, min(d, 4000))^{-2}`` first (``estimators.KL``'s default).
    ``exact``: :func:`inverse_root` of ``factor`` when the caller has it (one ``eigh`` per factor, not per basis)."""
    s, q = factor.double(), basis.double()
    exact = inverse_root(s) if exact is None else exact
    diagonal = rayleigh_quotients(s[None], q[None])[0]
    approximate = (q * diagonal.clamp_min(dimension_floor(s.shape[-1])).rsqrt()) @ q.mT
    return (torch.linalg.matrix_norm(approximate - exact) / torch.linalg.matrix_norm(exact)).item()


def off_diagonal_energy(s: torch.Tensor, q: torch.Tensor) -> float:
    q = q.double()
    m = q.mT @ s.double() @ q
    diagonal = torch.diagonal(m, dim1=-2, dim2=-1)
    off = torch.linalg.matrix_norm(m - torch.diag_embed(diagonal))
    return float((off / torch.linalg.vector_norm(diagonal, dim=-1).clamp_min(1e-300)).max())


def _batches(size: dict[str, int], batch: int, length: int, device: torch.device, data: str,
             seed: int) -> Callable[[], torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if data == "random":
        return lambda: torch.randint(0, size["vocab"], (batch, length + 1), generator=gen).to(device)
    text = read_corpus(None, 24_000_000)
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device)

    def draw() -> torch.Tensor:
        starts = torch.randint(0, tokens.numel() - length - 1, (batch,), generator=gen).to(device)
        return tokens[starts[:, None] + torch.arange(length + 1, device=device)].long()

    return draw


def capture(optimizer_name: str, device: torch.device, size: dict[str, int], batch: int, length: int, every: int,
            max_dim: int, warmup: int, refreshes: int, data: str = "text", seed: int = 0
            ) -> tuple[dict[str, list[torch.Tensor]], list[float]]:
    """``{"param:mode (d)": [S at warmup, S at warmup + T, …]}`` (``refreshes + 1`` float32 snapshots each) and
    the training losses."""
    torch.manual_seed(seed)
    model = TinyGPT(**size).to(device)
    optimizer = factory(optimizer_name, every, max_dim)(model.parameters())
    named = dict(model.named_parameters())
    wanted = [p.format(mid=size["layers"] // 2, last=size["layers"] - 1) for p in PARAMETERS]
    draw = _batches(size, batch, length, device, data, seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    snapshots: dict[str, list[torch.Tensor]] = {}
    losses = []
    for step in range(1, warmup + refreshes * every + 1):
        losses.append(train_step(model, optimizer, draw(), autocast))
        if step >= warmup and (step - warmup) % every == 0:
            for name in wanted:
                factors = optimizer.state[named[name]]["estimator"]["S"]
                for mode, factor in factors.items():
                    if factor.shape[-1] >= 8:
                        key = f"{name}:{mode} ({factor.shape[-1]})"
                        snapshots.setdefault(key, []).append(factor.detach().float().clone())
    del optimizer, model
    return snapshots, [float(x) for x in losses]


def _measures(s: torch.Tensor, q: torch.Tensor, exact: torch.Tensor) -> list[float]:
    """``[off-diagonal energy, orthogonality, root error]`` of the basis ``q`` (``(1, d, d)``) for the factor ``s``
    (``exact``: its :func:`inverse_root`)."""
    return [off_diagonal_energy(s, q), orthogonality(q), root_error(s[0], q[0], exact)]


def quality(snapshots: dict[str, list[torch.Tensor]], names: list[str]) -> dict[str, Any]:
    """Per factor and refresher: ``[off-diagonal energy, orthogonality, root error]`` after each refresh (index
    k = 1, 2, …)."""
    out: dict[str, Any] = {}
    with tf32_matmuls(True):
        for key, sequence in snapshots.items():
            first = sequence[0].unsqueeze(0)
            start = bases.Eigh(every=1).initialize(first).basis
            current = {name: start.clone() for name in names if name != "eigh"}
            parts = {name: REFRESHERS[name]() for name in current}
            rows: dict[str, list[list[float]]] = {name: [] for name in (*names, "stale")}
            for k, factor in enumerate(sequence[1:], start=1):
                s, root = factor.unsqueeze(0), inverse_root(factor)
                for name, part in parts.items():
                    current[name] = part.refresh(s, current[name], index=k).basis
                    rows[name].append(_measures(s, current[name], root))
                if "eigh" in names:
                    exact = bases.Eigh(every=1).initialize(s).basis
                    rows["eigh"].append(_measures(s, exact, root))
                rows["stale"].append(_measures(s, start, root))
            out[key] = rows
    return out


def _median_ms(run: Callable[[], Any], device: torch.device, repeats: int) -> float:
    run()  # warm-up (workspace, cuSOLVER handles)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def timing(snapshots: dict[str, list[torch.Tensor]], names: list[str], stack: int, repeats: int,
           deadline: float) -> dict[str, dict[str, float]]:
    """``{"d=…, B=…": {refresher: median ms of one refresh}}`` on a captured factor of each size (and that factor
    stacked ``stack`` times), its first snapshot's eigenbasis as the warm start; stops at ``deadline``."""
    by_size: dict[int, torch.Tensor] = {}
    for sequence in snapshots.values():
        by_size.setdefault(sequence[-1].shape[-1], sequence[-1])
    out: dict[str, dict[str, float]] = {}
    with tf32_matmuls(True):
        for d, factor in sorted(by_size.items()):
            for batch in (1, stack):
                s = factor.unsqueeze(0).expand(batch, d, d).contiguous()
                q = bases.Eigh(every=1).initialize(s[:1]).basis.expand(batch, d, d).contiguous()
                row = out.setdefault(f"d={d}, B={batch}", {})
                for name in names:
                    if time.monotonic() > deadline or (name == "eigh" and batch > 1):
                        continue
                    part = REFRESHERS[name]()
                    row[name] = _median_ms(lambda p=part, s=s, q=q: p.refresh(s, q, index=10), factor.device, repeats)
    return out


def summary(result: dict[str, Any], at: tuple[int, ...]) -> str:
    lines = []
    for key, rows in result.items():
        lines.append(f"{key}")
        for name, values in rows.items():
            cells = "  ".join("k={}: off {:.2e} orth {:.1e} root {:.3f}".format(k, *values[k - 1])
                              for k in at if k <= len(values))
            lines.append(f"  {name:15s} {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m precond.bench.refine_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", default="kl_shampoo_fast", help="the run whose factors are captured")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--max-dim", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=50, help="training steps before the first snapshot")
    parser.add_argument("--refreshes", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--data", choices=("text", "random"), default="text")
    parser.add_argument("--refreshers", default=",".join(REFRESHERS))
    parser.add_argument("--stack", type=int, default=12, help="batch of the stacked timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds the refresh timing may take")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default="refine_quality.json")
    args = parser.parse_args(argv)

    begin = time.monotonic()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    size = GPT2_SMALL if device.type == "cuda" else GPT_TINY
    length = min(args.length, size["context"])
    names = args.refreshers.split(",")
    unknown = [n for n in names if n not in REFRESHERS]
    if unknown:
        parser.error(f"unknown refreshers {unknown}; choose from {', '.join(REFRESHERS)}")
    snapshots, losses = capture(args.optimizer, device, size, args.batch, length, args.every, args.max_dim,
                                args.warmup, args.refreshes, args.data)
    captured_s = time.monotonic() - begin
    result = quality(snapshots, names)
    quality_s = time.monotonic() - begin - captured_s
    times = timing(snapshots, names, args.stack, args.repeats, time.monotonic() + args.budget)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "model": size, "batch": args.batch, "length": length, "data": args.data,
            "optimizer": args.optimizer, "every": args.every, "max_dim": args.max_dim, "warmup": args.warmup,
            "refreshes": args.refreshes, "first_loss": losses[0], "last_loss": losses[-1],
            "seconds": {"capture": captured_s, "quality": quality_s,
                        "timing": time.monotonic() - begin - captured_s - quality_s},
            "measures": "per factor and refresher: [off-diagonal energy, orthogonality, root error] after refresh "
                        "k = 1, 2, …"}
    print(json.dumps(meta, indent=1))
    print(summary(result, (1, 5, args.refreshes)))
    for row, values in times.items():
        print(row, "  ".join(f"{name} {ms:.2f} ms" for name, ms in values.items()))
    with open(args.json, "w") as handle:
        json.dump({"meta": meta, "quality": result, "refresh_ms": times, "losses": losses}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
