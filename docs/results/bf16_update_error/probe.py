"""How far bf16 rotations move KL-Shampoo's update, as the width grows: a CPU probe for issue 26's GPT-2 A/Bs.

On GPT-2 small the fast configuration (bf16 rotations, ``fold_every=2``, the drift rule) blew up on one seed of two,
where the same method with float32 rotations did not (docs/results.md, part 1). One candidate cause: a bf16 rotation
rounds ``G`` and ``Q`` to 8 significant bits, an error of about ``2⁻⁹‖G‖`` spread over every rotated entry, and
``Power(½)`` then divides each entry by ``√(λ_i λ_j)``, so the error lands hardest where ``λ`` is smallest; a wider
factor has a wider spectrum. This probe measures it: a byte-level GPT of each width trains ``steps`` steps with
``kl_shampoo`` (float32 rotations, T = 10), then one more step is taken from the same state and gradient twice, with
the group's ``rotation_dtype`` None and ``torch.bfloat16`` (on the CPU: each product's operands rounded to bf16,
float32 accumulation, as on a GPU), and the relative difference of the two updates ``‖ΔW_bf16 − ΔW_f32‖/‖ΔW_f32‖``
is printed per weight matrix, with the spread ``λ_max/λ_min`` of each of its factors.

    OMP_NUM_THREADS=2 python docs/results/bf16_update_error/probe.py > docs/results/bf16_update_error/probe.log
"""

import math

import torch

import precond
from precond.tasks import make_task

WIDTHS = (64, 128, 256, 512)
STEPS = 200


def spread(state: dict, mode: str) -> float:
    lam = state["estimator"]["lambda"][mode].double()
    return float(lam.max() / lam.min())


def probe(width: int, steps: int = STEPS, seed: int = 0) -> list[tuple[str, float, str]]:
    task = make_task("char_lm", {"layers": 2, "width": width, "heads": 4, "context": 64, "batch_size": 16,
                                 "max_bytes": 2_000_000})
    data = task.load(torch.device("cpu"))
    model = task.build_model(seed)
    optimizer = precond.kl_shampoo(model.parameters(), lr=4e-3, betas=(0.9, 0.95), every=10)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = task.loss(model, data.train_batch(generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss = task.loss(model, data.train_batch(generator))
    optimizer.zero_grad()
    loss.backward()
    saved_state = optimizer.state_dict()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    deltas = {}
    for dtype in (None, torch.bfloat16):
        optimizer.load_state_dict(saved_state)
        for group in optimizer.param_groups:
            group["rotation_dtype"] = dtype
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(before[name])
        optimizer.step()
        deltas[dtype] = {name: (p.detach() - before[name]).double() for name, p in model.named_parameters()}
    rows = []
    for name, p in model.named_parameters():
        if p.ndim != 2:
            continue
        exact, rounded = deltas[None][name], deltas[torch.bfloat16][name]
        error = float((rounded - exact).norm() / exact.norm())
        state = optimizer.state[p]
        spreads = ", ".join(f"{spread(state, mode):.1e}" for mode in sorted(state["estimator"]["lambda"]))
        rows.append((name, error, spreads))
    return rows


if __name__ == "__main__":
    torch.manual_seed(0)
    for width in WIDTHS:
        rows = probe(width)
        errors = [error for _, error, _ in rows]
        print(f"width {width}: relative update error of bf16 rotations, median {sorted(errors)[len(errors) // 2]:.3g},"
              f" max {max(errors):.3g} (geometric mean {math.exp(sum(map(math.log, errors)) / len(errors)):.3g})")
        for name, error, spreads in rows:
            print(f"    {name:28s} {error:.3g}   λ_max/λ_min per mode: {spreads}")
