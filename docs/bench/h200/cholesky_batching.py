"""Batched ``torch.linalg.cholesky_ex`` against a loop over the batch, and three ways of ``Y L⁻ᵀ`` (docs/benchmarks.md,
the H200 section). Run on one GPU: ``python docs/bench/h200/cholesky_batching.py``.

On the H200 of that section (the lines of the other sizes were cut from the device's output by MAGMA's warnings):

    n=4096 B=12: cholesky batched 30.75 ms, looped 21.68 ms | trsm batched 25.15, looped 34.34, inv+mm 264.62
    n=2048 B=12: cholesky batched 6.82 ms, looped 9.03 ms | trsm batched 4.58, looped 10.77, inv+mm 68.44
"""

import time

import torch


def milliseconds(fn, reps: int = 5) -> float:
    """Mean time of ``fn()`` over ``reps`` calls after one warm-up call, device-synchronised."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    for n, b in [(768, 12), (768, 48), (3072, 12), (3072, 24), (4096, 12), (2048, 12)]:
        y = torch.randn(b, n, n, device="cuda")
        a = y @ y.mT / n + torch.eye(n, device="cuda")
        batched = milliseconds(lambda a=a: torch.linalg.cholesky_ex(a))
        looped = milliseconds(lambda a=a: [torch.linalg.cholesky_ex(m) for m in a])
        chol = torch.linalg.cholesky(a)
        solve_batched = milliseconds(
            lambda chol=chol, y=y: torch.linalg.solve_triangular(chol.mT, y, upper=True, left=False))
        solve_looped = milliseconds(
            lambda chol=chol, y=y: [torch.linalg.solve_triangular(c.mT, m, upper=True, left=False)
                                    for c, m in zip(chol, y, strict=True)])
        inverse = milliseconds(lambda chol=chol, y=y: y @ torch.linalg.inv_ex(chol.mT)[0])
        print(f"n={n} B={b}: cholesky batched {batched:.2f} ms, looped {looped:.2f} ms | trsm batched "
              f"{solve_batched:.2f}, looped {solve_looped:.2f}, inv+mm {inverse:.2f}", flush=True)


if __name__ == "__main__":
    main()
