"""``precond.bench.cost_model``: its closed forms against the library's own plan and a real optimizer's state, and
the fit against the two measured points it is fitted to (``docs/scaling.md``, "A cost model")."""

from __future__ import annotations

import pytest
import torch

import precond
from precond.bench import cost_model as cm
from precond.bench.shapes import PRESETS
from precond.distributed import owners
from precond.state import state_bytes


@pytest.mark.parametrize("name", list(cm.MODELS))
def test_closed_forms_equal_the_plans_equations(name):
    """Eq. 1 and Eq. 2 in closed form equal ``owners.parameter_cost`` and ``owners.state_size`` on the layouts
    kl_shampoo gives each shape (meta tensors: nothing allocated)."""
    for e in cm._entries(cm.MODELS[name]):
        assert cm.state_entries(e.layout.shape) == owners.state_size(e.layout), e.layout.shape
        cost = owners.parameter_cost(e.layout, e.preconditioner.refreshable_modes(e.layout), cm.EVERY)
        assert cm.work(e.layout.shape) == pytest.approx(cost, rel=1e-12), e.layout.shape


@pytest.mark.parametrize("max_dim", [8, 64])
def test_state_bytes_of_a_shape_list_equal_a_real_optimizers(max_dim):
    """4 · Σ Eq. 2 over the ``tiny`` shapes (modes above ``max_dim`` keep nothing) equals the bytes a kl_shampoo
    holds after a step (``precond.state.state_bytes``), less its scalar step counters."""
    shapes = PRESETS["tiny"]
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    optimizer = precond.kl_shampoo(params, max_dim=max_dim, every=cm.EVERY, stack=False)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    scalars = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                  for t in torch.utils._pytree.tree_leaves(state) if isinstance(t, torch.Tensor) and t.dim() == 0)
    assert state_bytes(optimizer) - scalars == 4 * sum(cm.state_entries(s, max_dim) for s in shapes)


def test_exchange_and_state_match_the_worked_examples():
    """The bytes table and the state table of ``docs/scaling.md`` (GPT-2 small, max dim 2048)."""
    n = sum(map(cm.numel, cm.MODELS["gpt2-small"]))
    assert [round(cm.exchange_bytes(n, w) / cm.MiB) for w in (2, 4, 8)] == [237, 356, 415]
    assert [round(cm.ddp_bytes(n, w) / cm.MiB) for w in (2, 4, 8)] == [475, 712, 831]
    assert cm.exchange_bytes(n, 1) == 0
    shapes = cm.MODELS["gpt2-small"]  # measured: kl_shampoo's 799,123,024 bytes, a 4-byte step counter per parameter
    assert 4 * sum(map(cm.state_entries, shapes)) + 4 * len(shapes) == 799_123_024
    assert [round(cm.shares(cm.MODELS["gpt2-small"], w)[0], 3) for w in (2, 4, 8)] == [0.515, 0.265, 0.199]


def test_the_fit_reproduces_the_measured_points():
    rows = {r["W"]: r for r in cm.project("gpt2-small", cm.MODELS["gpt2-small"], worlds=(1, 2))}
    assert rows[1]["step_ms"] == pytest.approx(cm.SINGLE_STEP_MS)
    assert rows[2]["step_ms"] == pytest.approx(cm.OWNER_W2_STEP_MS)
    assert rows[2]["state_MiB"] == pytest.approx(392, abs=1)  # measured 370 / 392 MiB
