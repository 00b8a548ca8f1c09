"""Per-component ablation: start from KL-Shampoo and change one part at a time, on a small byte-level GPT.

Each variant is a composition string of the ablation workbench (``python -m precond.ablate`` takes the same
strings); the baseline ``estimator=kl,basis=qr,...`` is ``precond.kl_shampoo`` written out. Every variant trains
the same model from the same initial weights on the same batches; the table gives its final validation loss.
Swapping in the Shampoo estimator without grafting is expected to diverge (its step no longer has a natural
size: the point of KL-Shampoo); the table says so instead of stopping.

A run that blows up (a validation loss not finite or above twice the initial one) stops there and is reported
as diverged. Runs use one CPU thread each (fastest for a model this small, and immune to a busy machine;
``--threads`` changes it).

Run: python examples/per_component_ablation.py [--steps 150] [--lr 0.01] [--threads 1]
"""

import argparse
import math

import torch

from precond.ablate import Training, parse_variant, train_run
from precond.ablate.threads import thread_count
from precond.tasks import CharLM

BASELINE = "estimator=kl,basis=qr,every=10,applier=power:0.5,graft=none"
CHANGES = [
    ("baseline: KL-Shampoo", ""),
    ("estimator KL -> Shampoo", "estimator=shampoo"),
    ("estimator KL -> Frobenius", "estimator=frobenius"),
    ("basis QR -> eigh", "basis=eigh"),
    ("graft none -> adam", "graft=adam"),
]


def with_change(change: str) -> str:
    """The baseline with the keys of ``change`` replaced."""
    items = dict(item.split("=") for item in BASELINE.split(","))
    items.update(dict(item.split("=") for item in change.split(",") if item))
    return ",".join(f"{key}={value}" for key, value in items.items())


def main(steps: int = 150, lr: float = 1e-2) -> None:
    task = CharLM(layers=1, width=64, heads=4, context=64, batch_size=16)
    device = torch.device("cpu")
    data = task.load(device)
    training = Training(steps=steps, eval_every=steps, eval_batches=4, warmup=0.05)
    results = []
    for label, change in CHANGES:
        variant = parse_variant(with_change(change) + f",name={label}")
        record = train_run(task, data, variant, lr, seed=0, training=training, device=device)
        if not results:
            print(f"initial validation loss {record['curve']['val'][0]:.4f}")
        final = math.inf if record["diverged"] else record["final_val"]
        results.append((label, change or "-", final, record["train_seconds"]))
        print(f"  trained {label} ({steps} steps, lr {lr:g})")

    print(f"\n{'variant':28s} {'change':22s} {'final val':>10s} {'time (s)':>9s}")
    for label, change, final, seconds in results:
        print(f"{label:28s} {change:22s} {'diverged' if math.isinf(final) else f'{final:.4f}':>10s} {seconds:9.1f}")
    best = min(results, key=lambda row: row[2])
    print(f"\nbest: {best[0]}, final validation loss {best[2]:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args, _ = parser.parse_known_args()  # known only: the test suite runs this file under pytest's argv
    with thread_count(args.threads):
        main(args.steps, args.lr)
