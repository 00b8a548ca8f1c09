"""Train a small byte-level GPT on Python's standard library sources with KL-Shampoo; the loss falls.

No download: the text is the ``.py`` files of the running Python's standard library (``--data FILE`` for any
text file). Runs on the CPU in a few seconds; ``--device cuda`` (or ``auto``) uses a GPU with bf16 autocast.

``--fast`` adds the speed options that kept KL-Shampoo's loss on GPT-2 small (86M parameters; docs/results.md):
refreshes spread over the T steps (``stagger``) and made by the two-pass float64 Cholesky-QR
(``refresh="cholesky_qr64"``, Householder QR's basis from matrix products; fast on GPUs with fast float64 such as
H100, H200 and A100, slow on consumer cards), and on CUDA TF32 products, refreshes on side streams
(``async_refresh``) and each bucket's update replayed as a CUDA graph (``capture``).

Run: python examples/train_small_gpt.py [--steps 300] [--width 64] [--layers 2] [--data FILE] [--fast]
"""

import argparse
import contextlib
import time

import torch

import precond
from precond.tasks import CharLM


def main(steps: int = 300, layers: int = 2, width: int = 64, data: str = None, device: str = "cpu",
         lr: float = 1e-2, fast: bool = False) -> None:
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    task = CharLM(data=data, layers=layers, width=width, heads=4, context=64, batch_size=16)
    text = task.load(device)
    model = task.build_model(seed=0).to(device)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, {text.train.numel():,} training bytes")

    # weights (matrices) are decayed, vectors (biases, norm scales) are not
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    speed = {}
    if fast:
        speed = {"stagger": True, "refresh": "cholesky_qr64"}
        if device.type == "cuda":
            speed.update(tf32=True, async_refresh=True, capture=True)
    optimizer = precond.kl_shampoo([{"params": decay}, {"params": other, "weight_decay": 0.0}],
                                   lr=lr, betas=(0.9, 0.95), weight_decay=1e-4, every=10, **speed)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    generator = torch.Generator().manual_seed(0)
    validation = text.val_batches(4)

    def validation_loss() -> float:
        model.eval()
        with torch.no_grad(), autocast:
            value = sum(task.loss(model, batch).item() for batch in validation) / len(validation)
        model.train()
        return value

    print(f"step {0:4d}  val loss {validation_loss():.4f}")
    started = time.time()
    for step in range(1, steps + 1):
        with autocast:
            loss = task.loss(model, text.train_batch(generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            print(
                f"step {step:4d}  train {loss.item():.4f}  ({time.time() - started:.1f} s)  "
                f"val loss {validation_loss():.4f}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--data", help="a text file (default: the standard library's sources)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--fast", action="store_true", help="the speed options (see the module docstring)")
    args, _ = parser.parse_known_args()  # known only: the test suite runs this file under pytest's argv
    main(args.steps, args.layers, args.width, args.data, args.device, args.lr, args.fast)
