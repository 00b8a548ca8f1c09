"""Why ungrafted Shampoo (p = 1/2) diverged at every learning rate in docs/results.md: a CPU probe.

Trains a small byte-level GPT with ``shampoo(graft=None)`` at lr 1e-8 and prints, per step, the largest ratio
‖ΔW‖/‖G‖ over the parameters (the preconditioned update's size relative to the gradient, times the lr).

    python docs/results/ungrafted_shampoo_probe.py
"""

import torch

from precond.ablate.train import param_groups
from precond.presets import shampoo
from precond.tasks import make_task

task = make_task("char_lm", {"layers": 2, "width": 64, "heads": 4, "context": 64, "batch_size": 16,
                             "max_bytes": 2_000_000})
data = task.load(torch.device("cpu"))
model = task.build_model(0)
optimizer = shampoo(param_groups(model), lr=1e-8, graft=None)
generator = torch.Generator().manual_seed(0)
for step in range(1, 12):
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = task.loss(model, data.train_batch(generator))
    optimizer.zero_grad()
    loss.backward()
    grad_norms = {name: p.grad.norm().item() for name, p in model.named_parameters()}
    try:
        optimizer.step()
    except FloatingPointError as error:
        print(f"step {step}: refused: {str(error)[:100]}")
        break
    ratio, name = max(((p.detach() - before[n]).norm().item() / max(grad_norms[n], 1e-30), n)
                      for n, p in model.named_parameters())
    print(f"step {step}: loss {loss.item():.3f}; largest |update|/|grad| {ratio:.3g} ({name})")
