"""What the ranks of ``tests/test_distributed_parts.py`` run (issue 21), and the single-process references.

Two kinds of runs, every one ``STEPS = 2T + 1`` steps (T = 2, so bases are refreshed twice):

- **same gradients on every rank** (as ``tests/distributed_workers.py``): ``precond.muon``, a param group with
  ``bases.Identity()``, a third-party basis implementing exactly the ``Basis`` protocol, and ``precond.kfac`` /
  ``precond.ekfac`` on a model with a ``LayerNorm`` (its Adam part uses ``Identity``) in owner and replicate mode;
  every rank must be bitwise one process. For K-FAC every rank feeds the same batch, so the ranks' statistics are
  equal and their average ``(x + x) / 2 = x`` is exact at W = 2;
- **different data per rank** under DDP: ``kfac``/``ekfac`` whose captured statistics are averaged over the ranks,
  compared with one process on the concatenated batch (the test states the tolerance), and the same runs with
  ``group="local"`` (each rank its own statistics: the behaviour before the averaging) to show the comparison can
  fail.
"""

from __future__ import annotations

from typing import Any

import torch

import bases
import estimators
import precond
import structures
from tests.distributed_workers import _refusal, make_params, set_gradients

EVERY = 2
STEPS = 2 * EVERY + 1
SHAPES = [(5,), (4, 6), (4, 6), (3, 4, 5), (6, 4)]
MISSING = {2: (1,), 4: (0, 3)}
PER_RANK = 4


# --- same gradients on every rank ------------------------------------------------------------------------------
def muon(params, distributed):
    """Muon on the matrices, its Adam part on the vector (both with ``bases.Identity``)."""
    return precond.muon(params, lr=0.02, distributed=distributed)


def identity_group(params, distributed):
    """Shampoo with one param group switched to ``bases.Identity()`` (its dense modes become diagonal)."""
    return precond.shampoo([{"params": params[:3]}, {"params": params[3:], "basis": bases.Identity()}], lr=1e-2,
                           every=EVERY, max_dim=5, distributed=distributed)


def protocol_basis(params, distributed):
    """Shampoo's parts with a third-party basis that has exactly the protocol's members (``tests/test_protocols``)."""
    import estimators
    import structures
    from tests.test_protocols import ProtocolEigh

    preconditioner = precond.Preconditioner(structure=structures.NMode(max_dim=5), estimator=estimators.Shampoo(),
                                            basis=ProtocolEigh(EVERY), applier=precond.Power(p=0.5, eps=1e-8))
    return precond.Optimizer(params, lr=1e-2, preconditioner=preconditioner, distributed=distributed)


BUILDERS = {"muon": muon, "identity-group": identity_group, "protocol-basis": protocol_basis}


def trajectory(name: str, distributed=None) -> list[torch.Tensor]:
    params = make_params(SHAPES)
    optimizer = BUILDERS[name](params, distributed)
    for step in range(1, STEPS + 1):
        set_gradients(params, step, MISSING)
        optimizer.step()
    return [p.detach().clone() for p in params]


class LayerNormNet(torch.nn.Module):
    """Float64 ``Linear → LayerNorm → tanh → Linear``: K-FAC hooks the two ``Linear`` layers, the ``LayerNorm``'s
    weight and bias go to the presets' Adam part (``structures.Diagonal`` · ``bases.Identity``)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.hidden = torch.nn.Linear(6, 5)
        self.norm = torch.nn.LayerNorm(5)
        self.out = torch.nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.hidden(x))))


def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    return (torch.randn(size, 6, generator=gen, dtype=torch.float64),
            torch.randn(size, 3, generator=gen, dtype=torch.float64))


def kfac_run(preset: str, rank: int, world: int, distributed=None, ddp: bool = False, own_data: bool = False,
             wrap_for_capture: bool = False, group: Any = None, **options) -> list[torch.Tensor]:
    """``STEPS`` steps of ``precond.<preset>`` on :class:`LayerNormNet`, float64 state. ``own_data``: this rank's
    ``PER_RANK`` samples of a global batch of ``PER_RANK · world`` (else the whole batch, the same on every rank);
    ``ddp``: the gradients averaged by ``DistributedDataParallel``; ``wrap_for_capture``: the preset is given the
    DDP-wrapped model (its process group is then the capture's); ``group``: set on the capture if not None."""
    model = LayerNormNet()
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    optimizer = getattr(precond, preset)(wrapped if wrap_for_capture else model, lr=1e-2, every=EVERY,
                                         state_dtype=torch.float64, distributed=distributed, **options)
    if group is not None:
        optimizer.kfac_capture.group = group
    for step in range(1, STEPS + 1):
        x, y = batch(step, PER_RANK * world)
        if own_data:
            x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        torch.nn.functional.mse_loss(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    optimizer.kfac_capture.remove()
    return [p.detach().clone() for p in model.parameters()]


KFAC_SAME = {  # name: (preset, DataParallel mode, options)
    "kfac-owner": ("kfac", "owner", {}),
    "kfac-replicate": ("kfac", "replicate", {}),
    "ekfac-replicate": ("ekfac", "replicate", {}),
}
"""(EKFAC's ``moment="batch"`` is left out here: its loss-term count is summed over the ranks, so W ranks feeding the
same batch are one process on that batch repeated W times, not on the batch; the DDP runs check it.)"""

KFAC_DDP = {  # name: (preset, DataParallel mode or None: plain DDP, options, the preset gets the DDP model)
    "kfac": ("kfac", None, {}, False),
    "kfac-wrapped": ("kfac", None, {}, True),
    "kfac-owner": ("kfac", "owner", {}, False),
    "kfac-replicate": ("kfac", "replicate", {}, False),
    "ekfac": ("ekfac", None, {}, False),
    "ekfac-replicate": ("ekfac", "replicate", {}, False),
    "ekfac-owner-batch": ("ekfac", "owner", {"moment": "batch"}, False),
}


def parts_suite(rank: int, world: int) -> dict[str, Any]:
    """Everything ``tests/test_distributed_parts.py`` checks, from one spawn."""
    out: dict[str, Any] = {"same": {}, "ddp": {}, "local": {}}
    for name in BUILDERS:
        for mode in ("owner", "replicate"):
            out["same"][f"{name}-{mode}"] = trajectory(name, precond.DataParallel(mode=mode,
                                                                                   comm_dtype=torch.float32))
    for name, (preset, mode, options) in KFAC_SAME.items():
        config = precond.DataParallel(mode=mode, comm_dtype=torch.float64)
        out["same"][name] = kfac_run(preset, rank, world, config, **options)
    for name, (preset, mode, options, wrapped) in KFAC_DDP.items():
        config = None if mode is None else precond.DataParallel(mode=mode, comm_dtype=torch.float64)
        out["ddp"][name] = kfac_run(preset, rank, world, config, ddp=True, own_data=True, wrap_for_capture=wrapped,
                                    **options)
    for preset in ("kfac", "ekfac"):  # each rank its own statistics: what the averaging replaced
        out["local"][preset] = kfac_run(preset, rank, world, ddp=True, own_data=True, group="local")
    out["refused"] = _refusal(lambda: precond.ekfac(LayerNormNet(), distributed=precond.DataParallel(mode="owner")))
    out["overlap"] = {"averaged": _refusal(lambda: precond.kfac(LayerNormNet(), overlap_backward=True,
                                                                on_nonfinite="ignore")),
                      "local": _refusal(lambda: _kfac_overlapped(group="local"))}
    return out


def _kfac_overlapped(group: Any) -> precond.Optimizer:
    """K-FAC's parts with ``overlap_backward=True``, the capture attached (plain DDP: no ``DataParallel``)."""
    model = LayerNormNet()
    capture = precond.KFACCapture(model, group=group)
    applier = precond.Power(p=1.0, eps_placement="outside")
    layers = precond.Preconditioner(structure=structures.LayerMatrix(), estimator=estimators.KFAC(capture),
                                    basis=bases.Eigh(every=EVERY), applier=applier)
    optimizer = precond.Optimizer([{"params": list(capture.params)}], preconditioner=layers, overlap_backward=True,
                                  on_nonfinite="ignore")
    try:
        capture.attach(optimizer)
    finally:
        capture.remove()
    return optimizer


# --- single-process references ---------------------------------------------------------------------------------
def kfac_reference(preset: str, world: int, **options) -> list[torch.Tensor]:
    """One process on the whole batch of ``PER_RANK · world`` samples: what every rank feeds in the same-data runs,
    and the concatenation of the ranks' shares in the DDP runs."""
    return kfac_run(preset, 0, world, **options)
