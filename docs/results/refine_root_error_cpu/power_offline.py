"""The QR power step with more products (``bases.QRPowerStep(power=p)``, the ``basis_power`` key) against the
inverse-root error, offline on refreshes saved by ``capture_refreshes.py``: for each saved ``(S, Q_old, Q_QR)``, the
root error (``precond.bench.refine_quality.root_error``) of ``qr(S^p Q_old)`` for p = 1 (what was installed), 2, 3.

    OMP_NUM_THREADS=1 python docs/results/refine_root_error_cpu/power_offline.py /tmp/cap128.pt

(The thread count matters: with 2 threads p = 2 and p = 3 move in the third decimal; their float32 products sum in
another order.)
"""

from __future__ import annotations

import collections
import statistics
import sys

import torch

from bases.qr_power_step import power_step
from precond.bench.refine_quality import root_error


def main(path: str) -> None:
    rows: dict[int, dict[int, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for factor, old, _ in torch.load(path):
        for power in (1, 2, 3):
            basis = power_step(factor[None].float(), old[None].float(), power=power)[0]
            rows[factor.shape[-1]][power].append(root_error(factor, basis))
    for size, columns in sorted(rows.items()):
        cells = "  ".join(f"p = {power}: mean {statistics.mean(values):.3f} median {statistics.median(values):.3f}"
                          for power, values in columns.items())
        print(f"d = {size} ({len(columns[1])} refreshes)  {cells}")


if __name__ == "__main__":
    main(sys.argv[1])
