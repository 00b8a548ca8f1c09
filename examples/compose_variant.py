"""A variant no published library ships: KL factors, an exact eigh basis every 10 steps, grafted onto Adam.

It ablates the seed paper's claim that KL-Shampoo needs no grafting: swap `precond.Graft(...)` for the bare
`precond.Power(...)` and compare. Run: python examples/compose_variant.py
"""

import torch

import bases
import estimators
import precond
import structures

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 8 * 8, 10))
images, labels = torch.randn(128, 3, 8, 8), torch.randint(0, 10, (128,))

# the variant, in ten lines
optimizer = precond.Optimizer(
    model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4,
    preconditioner=precond.Preconditioner(
        structure=structures.NMode(max_dim=1024),                 # the 4-D conv kernel gets one factor per mode
        estimator=estimators.KL(beta=0.95),                       # KL-Shampoo's factors and λ-EMA
        basis=bases.Eigh(every=10),                               # exact eigh instead of one QR step
        applier=precond.Graft(precond.Power(p=0.5), onto="adam"),  # ... and Adam grafting on top
    ))

for step in range(101):
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    if step % 20 == 0:
        print(f"step {step:3d}  loss {loss.item():.4f}")
