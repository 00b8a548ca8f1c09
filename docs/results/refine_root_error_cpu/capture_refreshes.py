"""Save ``(S, Q_old, Q_QR)`` at every refresh of a mode of size >= 256 after step 100 of a budgeted KL-Shampoo run
(the task and rule of ``python -m precond.bench.refresh_drift --rule budget``), for :mod:`damping_offline`.

    OMP_NUM_THREADS=1 python docs/results/refine_root_error_cpu/capture_refreshes.py 128 300 /tmp/cap128.pt
"""

from __future__ import annotations

import sys

import torch

from precond.bench.refresh_drift import TASK, trained


def main(width: int, steps: int, out: str) -> None:
    before: dict[tuple, torch.Tensor] = {}
    captured = []
    for step, optimizer, _ in trained(steps, {**TASK, "width": width}, rule="budget"):
        for param, state in optimizer.state.items():
            if param.dim() != 2 or "Q" not in state.get("basis", {}):
                continue
            for mode, basis in state["basis"]["Q"].items():
                key = (id(param), mode)
                old = before.get(key)
                if old is not None and not torch.equal(old, basis) and basis.shape[-1] >= 256 and step > 100:
                    captured.append((state["estimator"]["S"][mode].clone(), old.clone(), basis.clone()))
                before[key] = basis.clone()
    torch.save(captured, out)
    print(f"{len(captured)} refreshes saved to {out}")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
