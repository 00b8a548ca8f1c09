"""The workbench's ``embeddings`` key (issue 23, lever 3): the embeddings and the output head (the matrices a Muon
gives to Adam) get AdamW or a one-sided version of the variant's parts, every other parameter the variant itself.

The AdamW half is checked against ``torch.optim.AdamW`` in float64 on the same gradients (an independent
implementation); the key leaves the identity of variants that do not give it unchanged (the committed records are
keyed by it).
"""

from __future__ import annotations

import pytest
import torch

from precond.ablate.train import adam_routed, param_groups
from precond.ablate.variants import parse_variant

F64 = torch.float64
LR, WEIGHT_DECAY = 3e-2, 0.1


class _LM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = torch.nn.Embedding(9, 5)
        self.hidden = torch.nn.Linear(5, 6)
        self.head = torch.nn.Linear(6, 9, bias=False)


def _model() -> _LM:
    return _LM().to(F64)


def _schedule(step: int) -> float:
    """A warm-up then decay, so that a group whose lr the schedule failed to scale would drift from the reference."""
    return min(1.0, (step + 1) / 3) * 0.8 ** step


def _train_beside_adamw(text: str, adam_lr: float) -> dict[str, torch.Tensor]:
    """Six steps of the variant under :func:`_schedule`, the routed matrices checked after each against
    ``torch.optim.AdamW`` at ``adam_lr`` under the same schedule; returns the final weights."""
    model = _model()
    routed = adam_routed(model)
    assert routed == {"tokens.weight", "head.weight"}
    optimizer = parse_variant(text).build(param_groups(model), LR, WEIGHT_DECAY, adam_params=routed)
    named = dict(model.named_parameters())
    copies = {name: named[name].detach().clone().requires_grad_() for name in sorted(routed)}
    reference = torch.optim.AdamW(list(copies.values()), lr=adam_lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=WEIGHT_DECAY)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, _schedule) for opt in (optimizer, reference)]
    hidden_before = named["hidden.weight"].detach().clone()
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        for name, p in named.items():
            p.grad = torch.randn(p.shape, dtype=F64, generator=generator)
            if name in copies:
                copies[name].grad = p.grad.clone()
        optimizer.step()
        reference.step()
        for schedule in schedules:
            schedule.step()
        for name, copy in copies.items():
            torch.testing.assert_close(named[name].detach(), copy.detach(), rtol=1e-5, atol=1e-7)
    assert not torch.equal(named["hidden.weight"].detach(), hidden_before)
    return {name: p.detach().clone() for name, p in named.items()}


@pytest.mark.parametrize("text", ["kl_shampoo", "soap", "estimator=kl,basis=eigh"])
def test_embeddings_adam_gives_the_routed_matrices_torch_adamw(text: str) -> None:
    _train_beside_adamw(f"{text},embeddings=adam", LR)


@pytest.mark.parametrize("text", ["kl_shampoo", "estimator=kl,basis=eigh,polar=match_rms_adamw"])
def test_adam_lr_sets_the_routed_adamw_lr_and_nothing_else(text: str) -> None:
    """``adam_lr`` runs the routed AdamW at its own lr (Muon's split: AdamW's tuned lr there, the variant's lr for
    the rest); the other parameters follow the same trajectory as without it."""
    own = _train_beside_adamw(f"{text},embeddings=adam,adam_lr=4e-3", 4e-3)
    shared = _train_beside_adamw(f"{text},embeddings=adam", LR)
    for name in ("hidden.weight", "hidden.bias"):
        torch.testing.assert_close(own[name], shared[name], rtol=0, atol=0)
    assert not torch.equal(own["head.weight"], shared["head.weight"])


def test_embeddings_one_sided_keeps_one_factor_on_the_smaller_side() -> None:
    model = _model()
    optimizer = parse_variant("kl_shampoo,embeddings=one_sided").build(param_groups(model), LR, WEIGHT_DECAY,
                                                                      adam_params=adam_routed(model))
    named = dict(model.named_parameters())
    head, hidden = optimizer.layout(named["head.weight"]), optimizer.layout(named["hidden.weight"])
    assert head.view_shape == (9, 6) and [kind != "none" for kind in head.kinds] == [False, True]
    assert all(kind != "none" for kind in hidden.kinds)  # the variant's own two factors


def test_the_key_is_part_of_the_identity_only_when_given() -> None:
    assert "embeddings" not in parse_variant("kl_shampoo").spec()
    assert parse_variant("kl_shampoo,embeddings=adam").spec() == "kl_shampoo,embeddings=adam"
    assert "embeddings" not in parse_variant("estimator=kl,basis=qr").spec()
    assert "embeddings=one_sided" in parse_variant("estimator=kl,embeddings=one_sided").spec()
    with_lr = parse_variant("kl_shampoo,embeddings=adam,adam_lr=5e-4")
    assert with_lr.spec() == "kl_shampoo,adam_lr=0.0005,embeddings=adam" and parse_variant(with_lr.spec()) == with_lr
    assert "adam_lr" not in parse_variant("estimator=kl,embeddings=adam").spec()


def test_bad_uses_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="adam, one_sided"):
        parse_variant("kl_shampoo,embeddings=sgd")
    model = _model()
    with pytest.raises(ValueError, match="names none"):
        parse_variant("kl_shampoo,embeddings=adam").build(param_groups(model), LR, adam_params=())
    with pytest.raises(ValueError, match="by name"):
        parse_variant("kl_shampoo,embeddings=adam").build(model.parameters(), LR, adam_params=adam_routed(model))
