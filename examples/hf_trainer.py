"""A preset class in Hugging Face's ``Trainer``: ``optimizer_cls_and_kwargs=(precond.KLShampoo, {...})``.

``Trainer`` builds the optimizer itself from the class, with its own decay / no-decay param groups
(``weight_decay`` from ``TrainingArguments``, 0 for biases and norms), and drives the lr with its warmup schedule.
A tiny GPT-2 trains for 6 steps on random tokens with a checkpoint at step 3; a fresh ``Trainer`` resumes from
that checkpoint (``train(resume_from_checkpoint=...)``) and must end with exactly the weights of the uninterrupted
run. As a control, the same resume from a copy of the checkpoint whose optimizer state was emptied (its groups and
lr kept) must end elsewhere, which shows that the comparison can fail.

Needs the ``integrations`` extra (``pip install transformers accelerate``; CPU is enough).
Run: python examples/hf_trainer.py
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import precond

STEPS, SAVE_AT, BATCH, CONTEXT, VOCAB = 6, 3, 4, 16, 64
OPTIMIZER = (precond.KLShampoo, {"lr": 3e-3, "betas": (0.9, 0.95), "every": 2})


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token sequences (the labels are the inputs: ``GPT2LMHeadModel`` shifts them)."""

    def __init__(self, n: int = STEPS * BATCH, seed: int = 0) -> None:
        self.tokens = torch.randint(0, VOCAB, (n, CONTEXT), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=CONTEXT,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def trainer(output_dir: pathlib.Path) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, save_steps=SAVE_AT, per_device_train_batch_size=BATCH,
        weight_decay=0.1, warmup_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    return Trainer(model=model(), args=args, train_dataset=RandomTokens(), optimizer_cls_and_kwargs=OPTIMIZER)


def weights(run: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.model.parameters()]


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def main(root: pathlib.Path) -> dict[str, object]:
    """Uninterrupted run, resumed run and control; returns what the test checks."""
    full = trainer(root / "full")
    full.train()
    checkpoint = root / "full" / f"checkpoint-{SAVE_AT}"
    for entry in full.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']} loss {entry['loss']:.4f}")

    resumed = trainer(root / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))

    control_checkpoint = root / "control-checkpoint"
    shutil.copytree(checkpoint, control_checkpoint)
    saved = torch.load(control_checkpoint / "optimizer.pt", weights_only=True)
    torch.save({**saved, "state": {}}, control_checkpoint / "optimizer.pt")
    control = trainer(root / "control")
    control.train(resume_from_checkpoint=str(control_checkpoint))

    optimizer = full.optimizer.optimizer if hasattr(full.optimizer, "optimizer") else full.optimizer
    result = {
        "optimizer": type(optimizer).__name__,
        "weight_decays": [group["weight_decay"] for group in optimizer.param_groups],
        "resumed": max_difference(weights(full), weights(resumed)),
        "control": max_difference(weights(full), weights(control)),
    }
    print(f"optimizer {result['optimizer']} built by Trainer, groups with weight decay {result['weight_decays']}")
    print(f"max |ΔW| resumed vs uninterrupted: {result['resumed']:.3e}")
    print(f"max |ΔW| resumed with the optimizer state emptied (control): {result['control']:.3e}")
    return result


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:
        outcome = main(pathlib.Path(directory))
    assert outcome["resumed"] == 0.0, "the resumed run should end with exactly the uninterrupted run's weights"
    assert outcome["control"] > 0.0
