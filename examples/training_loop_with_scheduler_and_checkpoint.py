"""A preset inside an ordinary PyTorch loop: warmup + cosine via ``LambdaLR``, a checkpoint halfway, a resume.

``precond.kl_shampoo`` is a ``torch.optim.Optimizer``, so nothing in the loop is special. Halfway through, the
model, optimizer, scheduler and data-sampler states are saved to a temporary directory; fresh objects are built,
loaded from it and trained on. The resumed run's losses equal the uninterrupted run's, step for step.

Run: python examples/training_loop_with_scheduler_and_checkpoint.py
"""

import math
import os
import tempfile

import torch

import precond
from precond.tasks import CharLM

STEPS, SAVE_AT, WARMUP, LR = 240, 120, 24, 1e-2
TASK = CharLM(layers=1, width=64, heads=4, context=64, batch_size=16)


def warmup_cosine(step: int) -> float:
    """LambdaLR factor: linear warmup over WARMUP steps, then cosine decay to 10% at STEPS."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, STEPS - WARMUP)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def fresh():
    """New model, optimizer, scheduler and batch sampler, exactly as at the start of training."""
    model = TASK.build_model(seed=0)
    optimizer = precond.kl_shampoo(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=1e-4, every=10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    sampler = torch.Generator().manual_seed(0)
    return model, optimizer, scheduler, sampler


def train(model, optimizer, scheduler, sampler, start: int, stop: int, tag: str) -> list:
    """Steps start+1 … stop of the loop; returns the training losses."""
    data, losses = TASK.load(torch.device("cpu")), []
    for step in range(start + 1, stop + 1):
        loss = TASK.loss(model, data.train_batch(sampler))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step == 1 or step % 40 == 0:
            print(f"{tag} step {step:3d}  lr {scheduler.get_last_lr()[0]:.2e}  loss {loss.item():.4f}")
    return losses


def main() -> None:
    torch.manual_seed(0)
    uninterrupted = train(*fresh(), 0, STEPS, "uninterrupted")

    model, optimizer, scheduler, sampler = fresh()
    first_half = train(model, optimizer, scheduler, sampler, 0, SAVE_AT, "first half   ")
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "checkpoint.pt")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "sampler": sampler.get_state(), "step": SAVE_AT}, path)
        print(f"saved a checkpoint at step {SAVE_AT} ({os.path.getsize(path) / 2**20:.1f} MiB); rebuilding everything")
        del model, optimizer, scheduler, sampler

        model, optimizer, scheduler, sampler = fresh()
        checkpoint = torch.load(path, weights_only=True)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        sampler.set_state(checkpoint["sampler"])
    second_half = train(model, optimizer, scheduler, sampler, checkpoint["step"], STEPS, "resumed      ")

    resumed = first_half + second_half
    difference = max(abs(a - b) for a, b in zip(resumed, uninterrupted, strict=True))
    print(f"resumed run equals the uninterrupted one at all {STEPS} steps: {resumed == uninterrupted} "
          f"(largest difference {difference:.1e})")
    assert resumed == uninterrupted, "resuming from the checkpoint changed the training trajectory"
    print(f"final loss {resumed[-1]:.4f}")


if __name__ == "__main__":
    main()
