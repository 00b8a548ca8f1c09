"""Compose KL-Shampoo from its four parts (not the preset) and train a small MLP on CPU; the loss falls.

Run: python examples/compose_kl_shampoo.py
"""

import torch

import bases
import estimators
import precond
import structures


def main(steps: int = 300) -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = torch.sin(x @ torch.randn(16, 1)) + 0.1 * x[:, :1] ** 2
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                                torch.nn.GELU(), torch.nn.Linear(64, 1))

    optimizer = precond.Optimizer(
        model.named_parameters(), lr=3e-3, momentum=0.9, weight_decay=1e-4, decay_order="after",
        preconditioner=precond.Preconditioner(
            structure=structures.NMode(max_dim=4096),
            estimator=estimators.KL(beta=0.95),
            basis=bases.QRPowerStep(every=10),
            applier=precond.Power(p=0.5, eps=1e-8, eps_placement="outside")))
    print(optimizer.describe())

    for step in range(steps + 1):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.5f}")


if __name__ == "__main__":
    main()
