"""Issue 21 at 2 CPU ranks (gloo, one thread each; ``tests/distributed_parts_workers.py``, spawned once):

- owner and replicate modes work for ``precond.muon``, for a param group with ``bases.Identity()`` (whose
  ``every`` is ``None``: never refreshed), for a third-party basis with exactly the protocol's members, and for
  ``precond.kfac``/``ekfac`` on a model with a ``LayerNorm`` (their Adam part uses ``Identity``): every rank's
  parameters are bitwise one process's (they raised ``AttributeError`` at construction before the ``Basis``
  protocol declared ``every``);
- under DDP, each rank its own samples, ``kfac``/``ekfac`` average their captured statistics over the ranks, so
  they train as one process on the concatenated batch (plain DDP, the capture given the DDP model, owner and
  replicate mode); each rank's own statistics (``group="local"``, the behaviour before) do not.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests import distributed_parts_workers as w
from tests.distributed_harness import spawn

WORLD = 2

DDP_TOLERANCE = 1e-10
"""Largest |Δθ| allowed between a DDP run and one process on the concatenated batch (float64 model and state, 5
steps). Both add the same numbers in another order: DDP averages the ranks' mean gradients and the capture the ranks'
means ``A^{(r)}``, ``G^{(r)}``, where one process takes means over all 8 samples at once; each differs by a few
ε = 1.1e-16 relative (say η = 10 ε). The step ``U = lr (S_G ⊗ S_A + δ)⁻¹ ∇W`` moves by at most κ η |U| for such a
perturbation, with κ ≤ ‖S‖/δ ≈ 10³ (δ = 1e-3, ‖S‖ = O(1) from ``S = I``) and |U| ≤ lr |∇W| / δ ≈ 10 (lr = 1e-2,
|∇W| = O(1)): 5 steps give at most 5 · 10³ · 10 ε · 10 ≈ 6e-11. The runs show ≤ 6e-17; the gap left by each rank's
own statistics is ≈ 5e-4 (asserted below), 10⁶ above the tolerance, so it cannot hide a missing or wrong average."""


@pytest.fixture(scope="module")
def runs():
    return spawn(WORLD, "tests.distributed_parts_workers", "parts_suite")


@functools.cache
def _reference(preset: str, **options) -> list[torch.Tensor]:
    return w.kfac_reference(preset, WORLD, **options)


def _largest_difference(actual, expected) -> float:
    assert len(actual) == len(expected)
    return max((a - b).abs().max().item() for a, b in zip(actual, expected, strict=True))


def _assert_bitwise(actual, expected, what: str) -> None:
    assert len(actual) == len(expected)
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        assert torch.equal(a, b), f"{what}: parameter {i} differs by up to {(a - b).abs().max():.3e}"


@pytest.mark.parametrize("mode", ["owner", "replicate"])
@pytest.mark.parametrize("name", list(w.BUILDERS))
def test_identity_and_protocol_bases_in_owner_and_replicate_modes_equal_one_process(runs, name, mode):
    """``muon`` (both parts ``bases.Identity``), an ``Identity`` param group, and a basis with exactly the
    protocol's members (refreshed twice): 2T+1 steps with gradients missing at some steps, every rank bitwise one
    process."""
    expected = w.trajectory(name)
    for rank, result in enumerate(runs):
        _assert_bitwise(result["same"][f"{name}-{mode}"], expected, f"{name} in {mode} mode at rank {rank}")


@pytest.mark.parametrize("name", list(w.KFAC_SAME))
def test_kfac_with_a_layernorm_in_owner_and_replicate_modes_equals_one_process(runs, name):
    """``kfac``/``ekfac`` on Linear → LayerNorm → tanh → Linear, every rank the same batch: bitwise one process on
    that batch (the ranks' equal statistics average exactly, ``(x + x) / 2 = x``)."""
    preset, _, options = w.KFAC_SAME[name]
    expected = _reference(preset, **options)
    for rank, result in enumerate(runs):
        _assert_bitwise(result["same"][name], expected, f"{name} at rank {rank}")


@pytest.mark.parametrize("name", list(w.KFAC_DDP))
def test_kfac_under_ddp_averages_its_statistics_like_one_process_on_the_whole_batch(runs, name):
    """Each rank 4 of the 8 samples, DDP averaging the gradients, the capture averaging ``A_t``, ``G_t`` (and EKFAC's
    per-example moments, or its summed loss-term count with ``moment="batch"``): every rank within
    :data:`DDP_TOLERANCE` of one process on all 8 samples, and the ranks bitwise equal to each other."""
    preset, _, options, _ = w.KFAC_DDP[name]
    expected = _reference(preset, **options)
    for rank, result in enumerate(runs):
        gap = _largest_difference(result["ddp"][name], expected)
        assert gap <= DDP_TOLERANCE, f"{name} at rank {rank}: {gap:.3e} from one process on the whole batch"
        _assert_bitwise(result["ddp"][name], runs[0]["ddp"][name], f"{name}: ranks agree")


@pytest.mark.parametrize("preset", ["kfac", "ekfac"])
def test_each_ranks_own_statistics_are_far_from_the_whole_batch(runs, preset):
    """The control: ``group="local"`` (no averaging, as before) leaves each rank with the factors of its own half
    of the batch; the parameters then differ from one process on the whole batch by far more than
    :data:`DDP_TOLERANCE`, and the ranks drift apart."""
    expected = _reference(preset)
    for result in runs:
        assert _largest_difference(result["local"][preset], expected) > 1e4 * DDP_TOLERANCE
    assert _largest_difference(runs[0]["local"][preset], runs[1]["local"][preset]) > 1e4 * DDP_TOLERANCE


def test_ekfac_per_example_moments_in_owner_mode_are_refused_at_construction(runs):
    from precond import compatibility

    rule = compatibility.BY_NAME["owner_per_example_moment"]
    assert runs[0]["refused"] == f"Incompatible: {rule.message()}"  # the table's rule (a ValueError)


def test_overlap_backward_is_refused_where_the_statistics_are_averaged(runs):
    """Under plain DDP (no ``DataParallel``) ``precond.kfac(..., overlap_backward=True)`` is refused by its capture
    with the run-time rule's message; with ``group="local"`` (nothing averaged) it is accepted."""
    from precond import compatibility

    rule = compatibility.BY_NAME["overlap_averaged_statistics"]
    for result in runs:
        assert result["overlap"]["averaged"] == f"Incompatible: {rule.message()}"
        assert result["overlap"]["local"] == "accepted"


def test_capture_group_is_validated():
    import precond

    with pytest.raises(ValueError, match="group .* must be 'auto', 'local', None"):
        precond.KFACCapture(torch.nn.Linear(2, 2), group="world")
    capture = precond.KFACCapture(torch.nn.Linear(2, 2))
    assert capture.group == "auto"
    if not torch.distributed.is_initialized():  # no process group: nothing to average, no collective
        assert capture.averaging_group() is None
        capture.group = None  # the default group, which does not exist
        with pytest.raises(RuntimeError, match="init_process_group"):
            capture.averaging_group()
