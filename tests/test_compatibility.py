"""Every rule of the compatibility table (``precond.compatibility.RULES``) refuses its combination at construction,
with the table's whole message (why, and what to use instead), before anything is hooked or changed.

``EXAMPLES`` holds one construction per rule; a rule added to the table without an example fails
:func:`test_every_rule_has_an_example`. The battery (``tests/test_battery.py``) meets the same rules again across
the registry's entries.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

import bases
import estimators
import precond
import structures
from precond import compatibility


def _weight(*shape: int) -> list[tuple[str, nn.Parameter]]:
    return [("w", nn.Parameter(torch.randn(*shape)))]


def _ekfac_owner() -> Any:
    return precond.ekfac(_MODEL, distributed=precond.DataParallel())


def _kfac_blocked() -> Any:
    layer = nn.Linear(7, 5)
    estimator = estimators.KFAC(precond.KFACCapture(layer))
    blocked = precond.Preconditioner(structures.NMode(max_dim=3, large="block"), estimator, bases.Eigh(every=1),
                                     precond.Power(p=1.0))
    return precond.Optimizer([("layer.weight", layer.weight)], preconditioner=blocked)


_MODEL = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
_BLOCKED = dict(max_dim=4, large="block")

EXAMPLES: dict[str, tuple[Callable[[], Any], dict[str, str]]] = {
    "capture_distributed": (lambda: precond.kl_shampoo(_weight(3, 3), capture=True,
                                                       distributed=precond.DataParallel()), {}),
    "overlap_distributed": (lambda: precond.kl_shampoo(_weight(3, 3), overlap_backward=True, on_nonfinite="ignore",
                                                       distributed=precond.DataParallel()), {}),
    "overlap_capture": (lambda: precond.soap(_weight(3, 3), overlap_backward=True, capture="emulate",
                                             on_nonfinite="ignore"), {}),
    "overlap_checks_gradients": (lambda: precond.soap(_weight(3, 3), overlap_backward=True), {}),
    "replicate_async": (lambda: precond.shampoo(_weight(3, 3), async_refresh=True,
                                                distributed=precond.DataParallel(mode="replicate")), {}),
    "replicate_by_kind": (lambda: precond.DataParallel(mode="replicate", placement="by_kind"), {}),
    "owner_per_example_moment": (_ekfac_owner, {}),
    "block_structure": (lambda: precond.one_sided_shampoo(_weight(7, 3), **_BLOCKED),
                        {"structure": "OneSided"}),
    "blocked_layer_statistics": (_kfac_blocked, {"params": "layer.weight", "estimator": "KFAC"}),
    "blocked_overlap": (lambda: precond.kl_shampoo(_weight(7, 3), overlap_backward=True, on_nonfinite="ignore",
                                                   **_BLOCKED), {"params": "w"}),
    "blocked_distributed": (lambda: precond.kl_shampoo(_weight(7, 3), distributed=precond.DataParallel(),
                                                       **_BLOCKED), {"params": "w"}),
    "drift_overlap": (lambda: precond.kl_shampoo(_weight(3, 3), overlap_backward=True, on_nonfinite="ignore",
                                                 drift_tolerance=0.1), {}),
    "drift_distributed": (lambda: precond.kl_shampoo(_weight(3, 3), drift_tolerance=0.1,
                                                     distributed=precond.DataParallel()), {}),
}
"""Rule name → a construction the rule refuses, and the details its message names."""


def test_every_rule_has_an_example():
    names = [rule.name for rule in compatibility.RULES]
    assert len(set(names)) == len(names), "two rules of the table share a name"
    assert set(EXAMPLES) == set(names), (f"rules without an example: {sorted(set(names) - set(EXAMPLES))} (add one "
                                         f"to EXAMPLES); examples of no rule: {sorted(set(EXAMPLES) - set(names))}")


@pytest.mark.parametrize("name", [rule.name for rule in compatibility.RULES])
def test_refused_at_construction_with_the_tables_message(name):
    """The whole message: the reason, then what to use instead (with the parameter, estimator or structure named)."""
    rule = compatibility.BY_NAME[name]
    construct, details = EXAMPLES[name]
    with pytest.raises(compatibility.Incompatible) as refused:
        construct()
    assert refused.value.rule is rule
    assert str(refused.value) == rule.message(**details)
    assert isinstance(refused.value, ValueError)  # what the constructors raised before the table


def test_a_refused_kfac_leaves_no_hooks():
    """The table refuses an EKFAC in owner mode before its capture hooks the model for good."""
    with pytest.raises(compatibility.Incompatible):
        _ekfac_owner()
    assert not any(module._forward_hooks for module in _MODEL.modules())


def test_a_refused_group_leaves_the_optimizer_unchanged():
    """``add_param_group`` asks the table as construction does; a refused group is not added."""
    optimizer = precond.kl_shampoo(_weight(3, 3), overlap_backward=True, on_nonfinite="ignore", max_dim=4)
    groups = list(optimizer.param_groups)
    blocked = precond.Preconditioner(structures.NMode(max_dim=4, large="block"), estimators.KL(),
                                     bases.Eigh(every=1), precond.Power())
    with pytest.raises(compatibility.Incompatible, match="overlap_backward=True does not support yet"):
        optimizer.add_param_group({"params": _weight(7, 3), "preconditioner": blocked})
    assert optimizer.param_groups == groups


def test_the_first_rule_that_applies_is_reported():
    """Capture, overlap and distributed together: the table's order decides which reason is given."""
    features = compatibility.option_features(capture=True, overlap_backward=True,
                                             distributed=precond.DataParallel())
    assert compatibility.refusal(features).name == "capture_distributed"
    assert compatibility.refusal(compatibility.option_features(on_nonfinite="ignore")) is None
