"""Preset classes in Lightning: checkpoint and resume, bit for bit, with a scheduler and with ``BackboneFinetuning``.

``configure_optimizers`` returns a preset like any ``torch.optim`` optimizer. Two small regression models train for
3 epochs of 4 steps with a checkpoint at every epoch end; ``Trainer.fit(..., ckpt_path=<epoch 1>)`` in a fresh
``Trainer`` must end with exactly the weights of the uninterrupted run:

- ``KLShampoo`` with ``OneCycleLR`` stepped every batch (its momentum cycling drives precond's β₁), logged by
  ``LearningRateMonitor`` under the method's name (``lr-KLShampoo``). Control: the same resume from a copy of the
  checkpoint whose optimizer state was emptied must end elsewhere, so the comparison can fail.
- ``SOAP`` with ``BackboneFinetuning``, which checkpoints a copy of ``optimizer.param_groups`` (live part objects
  included) and unfreezes the backbone at epoch 2 with ``add_param_group``; Lightning loads checkpoints with
  ``weights_only=True``, which works because ``import precond`` lists the part classes as safe. (The resume is
  from before the unfreeze: resumed after it, Lightning's callback restores the param groups but leaves the
  backbone frozen, so no optimizer resumes exactly there, ``torch.optim.AdamW`` included.)
- ``Muon`` with ``BackboneFinetuning``: the unfrozen backbone's group is routed as at construction (its matrices to
  Newton–Schulz, its biases to the Adam part, two param groups), and resumes bit for bit too.

Needs the ``integrations`` extra (``pip install lightning``; CPU is enough).
Run: python examples/lightning.py
"""

from __future__ import annotations

import pathlib
import sys

# This file has the name of the package it shows. Run as a script, its folder comes first on sys.path and
# ``import lightning`` would find this file: take the folder off the path before importing.
_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if pathlib.Path(entry or ".").resolve() != _HERE]

# These imports must come after the sys.path edit above (so that ``lightning`` is the package, not this file).
import csv  # noqa: E402
import tempfile  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import BackboneFinetuning, LearningRateMonitor, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch import nn  # noqa: E402

import precond  # noqa: E402

EPOCHS, BATCHES, BATCH, RESUME_EPOCH = 3, 4, 8, 1


class Regression(L.LightningModule):
    """``y = sin(x · w)`` through a backbone and a head; ``optimizer`` says what ``configure_optimizers`` returns."""

    def __init__(self, optimizer: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.optimizer = optimizer

    def training_step(self, batch, batch_index):
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.backbone(x)), y)
        self.log("loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]  # BackboneFinetuning froze the backbone
        if self.optimizer == "kl_shampoo_one_cycle":
            optimizer = precond.KLShampoo(trainable, lr=1e-2, every=2)
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-2, total_steps=EPOCHS * BATCHES,
                                                           base_momentum=0.85, max_momentum=0.95)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
        if self.optimizer == "muon_backbone_finetuning":
            return precond.Muon(trainable, lr=1e-2, adam_lr=1e-2)
        return precond.SOAP(trainable, lr=1e-2, every=2)


def data() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCHES * BATCH, 6, generator=gen)
    y = torch.sin(x @ torch.randn(6, 1, generator=gen))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def fit(optimizer: str, root: pathlib.Path, name: str, ckpt_path: pathlib.Path | None = None) -> Regression:
    L.seed_everything(0, verbose=False)
    model = Regression(optimizer)
    callbacks = [ModelCheckpoint(dirpath=root / name, every_n_epochs=1, save_top_k=-1, filename="{epoch}"),
                 LearningRateMonitor(logging_interval="step", log_momentum=True)]
    if optimizer.endswith("backbone_finetuning"):
        callbacks.append(BackboneFinetuning(unfreeze_backbone_at_epoch=2))
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, callbacks=callbacks,
                        logger=CSVLogger(root / "logs", name=name, version=0), log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data(), ckpt_path=ckpt_path)
    return model


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def logged_columns(root: pathlib.Path, name: str) -> list[str]:
    with open(root / "logs" / name / "version_0" / "metrics.csv") as handle:
        return next(csv.reader(handle))


def main(root: pathlib.Path) -> dict[str, object]:
    """Both scenarios; returns what the test checks."""
    result: dict[str, object] = {}
    for optimizer in ("kl_shampoo_one_cycle", "soap_backbone_finetuning", "muon_backbone_finetuning"):
        full = fit(optimizer, root, f"{optimizer}-full")
        checkpoint = root / f"{optimizer}-full" / f"epoch={RESUME_EPOCH}.ckpt"
        resumed = fit(optimizer, root, f"{optimizer}-resumed", ckpt_path=checkpoint)
        result[optimizer] = max_difference(full, resumed)
        with open(root / "logs" / f"{optimizer}-full" / "version_0" / "metrics.csv") as handle:
            losses = [float(row["loss"]) for row in csv.DictReader(handle) if row.get("loss")]
        print(f"{optimizer}: first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}")
        print(f"{optimizer}: max |ΔW| resumed at epoch {RESUME_EPOCH} vs uninterrupted: {result[optimizer]:.3e}")

    control_checkpoint = root / "control.ckpt"
    saved = torch.load(root / "kl_shampoo_one_cycle-full" / f"epoch={RESUME_EPOCH}.ckpt", weights_only=True)
    saved["optimizer_states"] = [{**state, "state": {}} for state in saved["optimizer_states"]]
    torch.save(saved, control_checkpoint)
    control = fit("kl_shampoo_one_cycle", root, "control", ckpt_path=control_checkpoint)
    result["control"] = max_difference(fit("kl_shampoo_one_cycle", root, "control-full"), control)
    result["lr_columns"] = [c for c in logged_columns(root, "kl_shampoo_one_cycle-full") if c.startswith("lr-")]
    print(f"control (optimizer state emptied): max |ΔW| {result['control']:.3e}")
    print(f"logged: {result['lr_columns']}")
    return result


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:
        outcome = main(pathlib.Path(directory))
    assert outcome["kl_shampoo_one_cycle"] == 0.0 and outcome["soap_backbone_finetuning"] == 0.0
    assert outcome["muon_backbone_finetuning"] == 0.0
    assert outcome["control"] > 0.0
