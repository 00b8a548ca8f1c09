"""Parameter shape presets: GPT-2 small (as ``nn.Linear`` weights, out × in) and a small one for CPUs."""

from __future__ import annotations

import torch

from precond.tasks.gpt import TinyGPT


def gpt2(layers: int, width: int, vocab: int, context: int) -> list[tuple[int, ...]]:
    """Shapes of a GPT-2 style model (tied LM head): embeddings, then per block two norms, attention and MLP."""
    shapes: list[tuple[int, ...]] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,),
                   (width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


def tiny_gpt(layers: int, width: int, vocab: int, context: int) -> list[tuple[int, ...]]:
    """The parameter shapes of the workbench's :class:`precond.tasks.gpt.TinyGPT` (untied head, no bias on the
    attention's products), read from the module built on the meta device (no memory)."""
    with torch.device("meta"):
        model = TinyGPT(vocab, context, layers, width, max(1, width // 64))
    return [tuple(p.shape) for p in model.parameters()]


PRESETS = {
    "gpt2-small": gpt2(layers=12, width=768, vocab=50257, context=1024),
    "small": gpt2(layers=4, width=128, vocab=2048, context=256),
    # the 25.6M-parameter byte-level GPT of ablations/gpu_long.toml and gpu_fast.toml (char_lm, 8 × 512)
    "char-gpt": gpt2(layers=8, width=512, vocab=256, context=256),
    # the 86M-parameter byte-level GPT of ablations/gpt2_small.toml (GPT-2 small's 12 x 768 blocks, context 1024,
    # vocabulary 256): the optimizer step that model's training pays, 3072-wide MLP factors and all
    "gpt2-bytes": tiny_gpt(layers=12, width=768, vocab=256, context=1024),
    # small's 52 parameters at width 16: next to no arithmetic, so a CPU step is bound by Python and operator
    # dispatch, as a GPU step of the fast configuration is by kernel launches (docs/benchmarks.md, "ops per step")
    "tiny": gpt2(layers=4, width=16, vocab=256, context=32),
}
