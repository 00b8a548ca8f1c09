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


@pytest.mark.parametrize("text", ["kl_shampoo", "soap", "estimator=kl,basis=eigh"])
def test_embeddings_adam_gives_the_routed_matrices_torch_adamw(text: str) -> None:
    model = _model()
    routed = adam_routed(model)
    assert routed == {"tokens.weight", "head.weight"}
    optimizer = parse_variant(f"{text},embeddings=adam").build(param_groups(model), LR, WEIGHT_DECAY,
                                                               adam_params=routed)
    named = dict(model.named_parameters())
    copies = {name: named[name].detach().clone().requires_grad_() for name in sorted(routed)}
    reference = torch.optim.AdamW(list(copies.values()), lr=LR, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=WEIGHT_DECAY)
    hidden_before = named["hidden.weight"].detach().clone()
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        for name, p in named.items():
            p.grad = torch.randn(p.shape, dtype=F64, generator=generator)
            if name in copies:
                copies[name].grad = p.grad.clone()
        optimizer.step()
        reference.step()
        for name, copy in copies.items():
            torch.testing.assert_close(named[name].detach(), copy.detach(), rtol=1e-5, atol=1e-7)
    assert not torch.equal(named["hidden.weight"].detach(), hidden_before)


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


def test_bad_uses_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="adam, one_sided"):
        parse_variant("kl_shampoo,embeddings=sgd")
    model = _model()
    with pytest.raises(ValueError, match="names none"):
        parse_variant("kl_shampoo,embeddings=adam").build(param_groups(model), LR, adam_params=())
    with pytest.raises(ValueError, match="by name"):
        parse_variant("kl_shampoo,embeddings=adam").build(model.parameters(), LR, adam_params=adam_routed(model))
