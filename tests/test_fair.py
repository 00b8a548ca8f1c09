"""Fair comparisons in the workbench: peers as variants, grids that bracket the best lr, paired statistics, and
loss against wall-clock time."""

import math

import pytest
import torch

from precond.ablate import AblationConfig, parse_variant, run_ablation
from precond.ablate import peers as peer_table
from precond.ablate.train import adam_routed, param_groups
from precond.tasks import TinyGPT

TINY_LM = {"layers": 1, "width": 16, "heads": 2, "context": 16, "batch_size": 4, "max_bytes": 100_000}
PEERS = ("adamw", "hb_kl_shampoo", "hb_soap", "po_soap", "torch_muon", "muon")


def quiet(_message):
    pass


def tiny_config(out, variants, lrs=(3e-3,), **overrides):
    settings = {"task": "char_lm", "task_options": TINY_LM, "variants": list(variants), "lrs": list(lrs),
                "steps": 6, "eval_every": 3, "eval_batches": 2, "out": str(out), "progress": False, **overrides}
    return AblationConfig.from_mapping(settings)


def needs(name):
    reason = peer_table.missing(name)
    return pytest.mark.skipif(reason is not None, reason=str(reason))


# --- peers as variants ------------------------------------------------------------------------------------------
def _fixed_gradients(model, step):
    """Gradients that depend on the step only (not on the weights), so an optimizer's state evolves the same way
    whatever its learning rate."""
    generator = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


def _trajectory(name, factors):
    """Per-step parameter changes of variant ``name`` at lr 1e-2 under ``LambdaLR`` multipliers ``factors``."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=11, context=4, layers=1, width=8, heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # the change is then the parameter itself: no round-off against a large weight
    optimizer = parse_variant(name).build(param_groups(model), 1e-2, 0.0, adam_params=adam_routed(model))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: factors[min(t, len(factors) - 1)])
    deltas = []
    for step in range(len(factors)):
        before = [p.detach().clone() for p in model.parameters()]
        _fixed_gradients(model, step)
        optimizer.step()
        scheduler.step()
        deltas.append([p.detach() - b for p, b in zip(model.parameters(), before)])
    return deltas


@pytest.mark.parametrize("name", [pytest.param(name, marks=needs(name)) for name in PEERS])
def test_the_schedule_reaches_every_peer(name):
    """With step-only gradients and no weight decay, an optimizer that reads ``group["lr"]`` at every step moves
    by ``f_t · d_t`` at step t under multiplier ``f_t``, where ``d_t`` is its change at ``f = 1``."""
    factors = [1.0, 0.5, 0.25, 1.0, 0.1]
    plain = _trajectory(name, [1.0] * len(factors))
    scheduled = _trajectory(name, factors)
    moved = False
    for f, reference, got in zip(factors, plain, scheduled):
        for d_ref, d in zip(reference, got):
            torch.testing.assert_close(d, f * d_ref, atol=1e-7, rtol=1e-4)
            moved |= bool(d_ref.abs().max() > 0)
    assert moved


@pytest.mark.parametrize("name", [pytest.param(name, marks=needs(name)) for name in PEERS])
def test_every_peer_trains_in_the_workbench(tmp_path, name):
    result = run_ablation(tiny_config(tmp_path, [name], steps=10, eval_every=5), log=quiet)
    (record,) = result.records
    assert not record["diverged"] and record["final_val"] < record["curve"]["val"][0]
    assert record["spec"] == name and len(record["step_ms"]) == 10


def test_adamw_is_fused_on_cuda_and_foreach_on_the_cpu():
    optimizer = parse_variant("adamw").build(torch.nn.Linear(3, 2).parameters(), 1e-3)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]


def test_muon_routes_embeddings_and_head_to_adam():
    model = TinyGPT(vocab=11, context=4, layers=2, width=8, heads=2)
    assert adam_routed(model) == {"tokens.weight", "positions.weight", "head.weight"}
    hidden = {name for name, p in model.named_parameters() if p.ndim == 2} - adam_routed(model)
    ours = parse_variant("muon").build(param_groups(model), 0.02, 0.0, adam_params=adam_routed(model))
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = {names[id(p[1] if isinstance(p, tuple) else p)] for g in ours.param_groups if g["use_muon"]
               for p in g["params"]}
    assert in_muon == hidden
    if peer_table.missing("torch_muon") is None:
        theirs = parse_variant("torch_muon").build(param_groups(model), 0.02, 0.0, adam_params=adam_routed(model))
        muon_part = theirs.parts[0]
        assert isinstance(muon_part, torch.optim.Muon)
        assert {names[id(p)] for g in muon_part.param_groups for p in g["params"]} == hidden


@needs("torch_muon")
def test_our_muon_and_torch_muon_take_the_same_steps_in_the_workbench():
    """Ours against torch's on the same routing: the Adam part to float32 round-off, the Newton–Schulz part to
    bfloat16 round-off (both iterate in bfloat16, each in its own order)."""
    models = []
    for name in ("muon,adam_lr=3e-3", "torch_muon,adam_lr=3e-3"):
        torch.manual_seed(0)
        model = TinyGPT(vocab=11, context=4, layers=1, width=8, heads=2)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = parse_variant(name).build(param_groups(model), 0.02, 0.1, adam_params=adam_routed(model))
        for step in range(3):
            _fixed_gradients(model, step)
            optimizer.step()
        models.append({n: (p.detach() - start[n]) for n, p in model.named_parameters()})
    ours, theirs = models
    for name, delta in theirs.items():
        if name.startswith("blocks.") and delta.ndim == 2:
            assert (ours[name] - delta).norm() <= 2e-2 * delta.norm(), name
        else:
            torch.testing.assert_close(ours[name], delta, atol=1e-6, rtol=1e-5, msg=name)


def test_torch_muon_refuses_a_conv_kernel_with_the_alternative():
    from precond.tasks import make_task
    if peer_table.missing("torch_muon") is not None:
        pytest.skip("no torch.optim.Muon")
    model = make_task("teacher_conv", {"width": 4}).build_model(0)
    with pytest.raises(ValueError, match="only 2-D parameters.*features.0.weight.*variant muon"):
        parse_variant("torch_muon").build(param_groups(model), 0.02, adam_params=adam_routed(model))


def test_peer_keys_are_checked():
    assert parse_variant("hb_kl_shampoo,every=5,max_dim=64,beta2=0.99").options == {
        "every": 5, "max_dim": 64, "beta2": 0.99}
    assert parse_variant("muon,adam_lr=1e-3,beta1=0.9").options == {"beta1": 0.9, "adam_lr": 1e-3}
    for text, fragment in [("muon,every=5", "cannot be changed on the named variant 'muon'"),
                           ("kl_shampoo,adam_lr=1e-3", "cannot be changed"),
                           ("estimator=kl,adam_lr=1e-3", "adam_lr belongs to muon and torch_muon"),
                           ("muon,adam_lr=0", "expected a number > 0"),
                           ("adamw,lr=1e-3,lr_from=kl_shampoo", "not both")]:
        with pytest.raises(ValueError, match=fragment):
            parse_variant(text)


def test_combined_optimizer_steps_saves_and_loads_its_parts():
    from precond.ablate.combined import Combined
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt = Combined([torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), torch.optim.AdamW(b.parameters(), lr=0.1)])
    assert len(opt.param_groups) == 2 and opt.param_groups[0] is opt.parts[0].param_groups[0]
    b(a(torch.randn(4, 3))).sum().backward()
    opt.step()
    assert len(opt.state) == 4  # momentum of a's two tensors, Adam moments of b's two
    saved = opt.state_dict()
    fresh = Combined([torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), torch.optim.AdamW(b.parameters(), lr=0.1)])
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.parts[0].state[a.weight]["momentum_buffer"], opt.parts[0].state[a.weight]["momentum_buffer"])
    opt.zero_grad()
    assert all(p.grad is None for p in [*a.parameters(), *b.parameters()])
    with pytest.raises(ValueError, match="share a parameter"):
        Combined([torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(a.parameters(), lr=0.1)])
    with pytest.raises(ValueError, match="2 parts"):
        fresh.load_state_dict({"parts": [saved["parts"][0]]})


def test_a_missing_peer_library_is_reported_and_skipped(tmp_path, monkeypatch):
    absent = peer_table.Peer(peer_table.SHAMPOO_PEER_KEYS, peer_table.PEERS["hb_soap"].build, "no_such_module_xyz",
                             "pip install no-such-module")
    monkeypatch.setitem(peer_table.PEERS, "hb_soap", absent)
    lines = []
    result = run_ablation(tiny_config(tmp_path, ["hb_soap", "adamw"]), log=lines.append)
    assert [r["variant"] for r in result.records] == ["adamw"]
    assert any("skipping hb_soap: no_such_module_xyz is not installed" in line for line in lines)
    summary = (tmp_path / "summary.md").read_text()
    assert "**skipped: hb_soap**: no_such_module_xyz is not installed (pip install no-such-module)" in summary


def test_epoch_sampling_visits_disjoint_windows_once_before_repeating():
    from precond.tasks.base import TokenWindows
    context, batch, n = 7, 4, 8 * 50 + 3  # 50 windows of 8 tokens, 3 tokens left over
    data = TokenWindows(torch.arange(n), torch.arange(100), context, batch, sampling="epoch")
    stream = data.stream(torch.Generator().manual_seed(0))
    starts = []
    for _ in range(12):  # 48 of the 50 windows: the last partial batch of the epoch is dropped
        inputs, targets = next(stream)
        assert torch.equal(targets, inputs + 1)  # next-token targets of consecutive tokens
        starts += inputs[:, 0].tolist()
    assert len(set(starts)) == 48 and all(s % 8 == 0 and s + 8 <= n for s in starts)
    second = [next(stream)[0][:, 0].tolist() for _ in range(12)]  # the next epoch: all 50 again, reshuffled
    assert len({s for batch in second for s in batch}) == 48 and [s for batch in second for s in batch] != starts
    random = TokenWindows(torch.arange(n), torch.arange(100), context, batch)
    first = next(random.stream(torch.Generator().manual_seed(5)))
    assert torch.equal(first[0], random.train_batch(torch.Generator().manual_seed(5))[0])  # the old draws


def test_sampling_stays_out_of_the_settings_at_its_default():
    from precond.tasks import make_task
    assert "sampling" not in make_task("char_lm", TINY_LM).settings()
    assert make_task("char_lm", {**TINY_LM, "sampling": "epoch"}).settings()["sampling"] == "epoch"


def test_linear_and_cosine_schedules_have_the_stated_end_points():
    from precond.ablate.schedule import multiplier
    for schedule in ("cosine", "linear"):
        f = multiplier(101, schedule, warmup=0.1, min_ratio=0.1)
        assert [f(t) for t in range(10)] == pytest.approx([(t + 1) / 10 for t in range(10)])
        assert (f(10), f(100)) == pytest.approx((1.0, 0.1))
    linear = multiplier(101, "linear", warmup=0.1, min_ratio=0.1)
    assert linear(55) == pytest.approx(1 - 0.9 * 45 / 90)  # halfway through the decay: 0.55
    assert multiplier(101, "cosine", warmup=0.1)(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_step_times_are_recorded_for_every_step(tmp_path):
    result = run_ablation(tiny_config(tmp_path, ["adamw"], steps=7, eval_every=3), log=quiet)
    (record,) = result.records
    assert len(record["step_ms"]) == 7 and all(t > 0 for t in record["step_ms"])
    assert sum(record["step_ms"]) / 1e3 <= record["train_seconds"] + 0.05

