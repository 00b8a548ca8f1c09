"""torch.optim conventions (property 6, docs/design.md) and training with a KL-Shampoo composed from parts."""

from __future__ import annotations

import io

import pytest
import torch

import bases
import estimators
import precond
import structures


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 5 * 5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).to(dtype)


def _batch(i, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(16, 2, 5, 5, generator=gen)
    return x.to(dtype), x.mean(dim=(1, 2, 3), keepdim=False).unsqueeze(1).sin().to(dtype)


def _train(model, opt, steps, start=0, dtype=torch.float32, scheduler=None):
    losses = []
    for i in range(start, start + steps):
        x, y = _batch(i, dtype)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
        if scheduler is not None:
            scheduler.step()
    return losses


def _composed_kl(params, **kw):
    return precond.Optimizer(
        params, lr=kw.pop("lr", 3e-3), momentum=0.9, weight_decay=1e-4, decay_order="after",
        preconditioner=precond.Preconditioner(
            structure=structures.NMode(max_dim=64),
            estimator=estimators.KL(beta=0.95),
            basis=bases.QRPowerStep(every=3),
            applier=precond.Power(p=0.5, eps=1e-8, eps_placement="outside")),
        **kw)


def _fit_fixed_batch(model, opt, steps=60):
    x, y = _batch(0)
    start = torch.nn.functional.mse_loss(model(x), y).item()
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return start, loss.item()


def test_composed_kl_shampoo_trains_a_small_model():
    model = _model()
    start, end = _fit_fixed_batch(model, _composed_kl(model.parameters()))
    assert end < 0.2 * start


@pytest.mark.parametrize("name", [name for name in precond.PRESETS if name != "muon"])  # muon: test_muon.py
def test_every_preset_trains_a_conv_mlp(name):
    model = _model()
    start, end = _fit_fixed_batch(model, getattr(precond, name)(model.parameters(), lr=3e-3, every=3))
    assert end < 0.1 * start


@pytest.mark.parametrize("options", [
    dict(lr=1e-3, p="1/(2N)"),
    # ungrafted Shampoo² is scale-variant (U grows like 1/|G| as G shrinks): it needs a tiny step and soon
    # turns back up here, which is the seed paper's Fig. 1 point about grafting
    dict(lr=3e-5, p=0.5),
])
def test_ungrafted_shampoo_trains_with_a_small_step(options):
    model = _model()
    start, end = _fit_fixed_batch(model, precond.shampoo(model.parameters(), every=3, graft=None, eps=1e-8, **options))
    assert end < 0.6 * start


def _soap(params, **kw):
    return precond.soap(params, every=3, **kw)


def _grafted_shampoo(params, **kw):
    return precond.shampoo(params, every=3, **kw)


@pytest.mark.parametrize("make", [_composed_kl, _soap, _grafted_shampoo])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_bit_for_bit_across_refreshes(dtype, make):
    model = _model(dtype)
    opt = make(model.parameters())
    _train(model, opt, 4, dtype=dtype)  # refreshes at steps 3, 6, ...
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    reference_losses = _train(model, opt, 7, start=4, dtype=dtype)
    reference_params = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    resumed = _model(dtype, seed=123)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = make(resumed.parameters())
    opt2.load_state_dict(checkpoint["opt"])
    for p in resumed.parameters():  # factor state stays float32 for bfloat16 parameters
        state = opt2.state[p]
        for s in state["estimator"]["S"].values():
            assert s.dtype == torch.float32
        assert state["momentum"].dtype == torch.float32
    assert _train(resumed, opt2, 7, start=4, dtype=dtype) == reference_losses
    for a, b in zip(reference_params, resumed.parameters(), strict=True):
        assert torch.equal(a, b.detach())


def test_load_state_dict_refuses_another_configuration():
    model = _model()
    opt = _composed_kl(model.parameters())
    _train(model, opt, 2)
    other = precond.kl_shampoo(model.parameters())
    with pytest.raises(ValueError, match="another preconditioner configuration"):
        other.load_state_dict(opt.state_dict())


def test_state_dict_holds_only_tensors_and_plain_data():
    model = _model()
    opt = _composed_kl(model.parameters())
    _train(model, opt, 2)
    sd = opt.state_dict()

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        else:
            assert isinstance(value, (torch.Tensor, int, float, str, bool, type(None))), type(value)

    walk(sd)
    assert sd["param_groups"][0]["preconditioner"]["estimator"]["class"] == "KL"


def test_float32_and_float64_agree():
    m32, m64 = _model(torch.float32), _model(torch.float64)
    opt32 = _composed_kl(m32.parameters())
    opt64 = _composed_kl(m64.parameters(), state_dtype=torch.float64)
    _train(m32, opt32, 8)
    _train(m64, opt64, 8, dtype=torch.float64)
    for a, b in zip(m32.parameters(), m64.parameters(), strict=True):
        torch.testing.assert_close(a.double(), b.detach(), rtol=2e-3, atol=2e-4)


def test_lr_scheduler_and_tensor_lr():
    model = _model()
    opt = _composed_kl(model.parameters(), lr=torch.tensor(3e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    _train(model, opt, 4, scheduler=scheduler)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(3e-3 * 0.5**4)


def test_zero_lr_and_first_step_fill_do_not_move_weights():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = _composed_kl(model.parameters())
    _train(model, opt, 1)  # the first step only fills statistics
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    opt.param_groups[0]["lr"] = 0.0
    opt.param_groups[0]["weight_decay"] = 0.0
    _train(model, opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_per_group_preconditioner_override_and_describe():
    model = _model()
    conv, *rest = list(model.parameters())
    one_sided = precond.Preconditioner(
        structures.OneSided(), estimators.Shampoo(), bases.Eigh(every=2), precond.Power(p=0.5)
    )
    opt = _composed_kl([{"params": [conv], "preconditioner": one_sided}, {"params": rest}])
    assert opt.layout(conv).kinds.count("dense") == 1
    _train(model, opt, 3)
    text = opt.describe()
    assert "dense" in text and "total factor state" in text
    named = _composed_kl(model.named_parameters())
    assert "0.weight" in named.describe()


def test_per_group_override_of_single_parts():
    model = _model()
    conv, *rest = list(model.parameters())
    opt = _composed_kl([{"params": [conv], "structure": structures.OneSided(), "basis": bases.Eigh(every=2)},
                        {"params": rest}])
    first, second = opt.param_groups
    assert isinstance(first["preconditioner"].structure, structures.OneSided)
    assert isinstance(first["preconditioner"].basis, bases.Eigh)
    assert first["preconditioner"].estimator == second["preconditioner"].estimator  # the rest is inherited
    assert "structure" not in first
    _train(model, opt, 3)
    restored = _composed_kl([{"params": [conv], "structure": structures.OneSided(), "basis": bases.Eigh(every=2)},
                             {"params": rest}])
    restored.load_state_dict(opt.state_dict())


def test_momentum_zero_and_nesterov_paths():
    for kw in ({"momentum": 0.0}, {"momentum": 0.9, "nesterov": True}):
        model = _model()
        opt = precond.Optimizer(model.parameters(), lr=1e-3, preconditioner=precond.Preconditioner(
            structures.Kronecker(), estimators.Shampoo(), bases.Eigh(every=2), precond.Power(p=0.25, eps=1e-6)), **kw)
        losses = _train(model, opt, 20)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert ("momentum" in opt.state[next(model.parameters())]) == (kw["momentum"] > 0)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    cpu, gpu = _model(), _model().cuda()
    opt_cpu, opt_gpu = _composed_kl(cpu.parameters()), _composed_kl(gpu.parameters())
    for i in range(8):
        x, y = _batch(i)
        for model, opt, dev in ((cpu, opt_cpu, "cpu"), (gpu, opt_gpu, "cuda")):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x.to(dev)), y.to(dev)).backward()
            opt.step()
    for a, b in zip(cpu.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach().cpu(), rtol=1e-3, atol=1e-4)


def test_state_bytes_counts_each_view_once_and_stacking_does_not_change_it():
    """``precond.state.state_bytes`` (the one counter behind the benches, the workbench and the distributed stats):
    unstacked, every state tensor is its own storage, so it is the plain sum of ``numel × element_size``; stacked,
    the members' state are views of shared stacks, counted once each, so the total is the same."""
    from precond.state import state_bytes

    def built(stack: bool) -> torch.optim.Optimizer:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 6, generator=gen)) for _ in range(3)]
        opt = precond.kl_shampoo(params, lr=1e-3, every=2, stack=stack)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return opt

    def plain_sum(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(plain_sum(v) for v in value.values())
        return sum(plain_sum(v) for v in value) if isinstance(value, (list, tuple)) else 0

    unstacked, stacked = built(False), built(True)
    expected = sum(plain_sum(s) for s in unstacked.state.values())
    assert expected > 0 and state_bytes(unstacked) == expected == state_bytes(stacked)
