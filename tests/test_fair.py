"""Fair comparisons in the workbench: peers as variants, grids that bracket the best lr, paired statistics, and
loss against wall-clock time."""

import importlib.util
import math

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

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
                "steps": 6, "eval_every": 3, "eval_batches": 2, "out": str(out), "progress": False, "extend_lrs": 0,
                **overrides}
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
        deltas.append([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)])
    return deltas


@pytest.mark.parametrize("name", [pytest.param(name, marks=needs(name)) for name in PEERS])
def test_the_schedule_reaches_every_peer(name):
    """With step-only gradients and no weight decay, an optimizer that reads ``group["lr"]`` at every step moves
    by ``f_t · d_t`` at step t under multiplier ``f_t``, where ``d_t`` is its change at ``f = 1``."""
    factors = [1.0, 0.5, 0.25, 1.0, 0.1]
    plain = _trajectory(name, [1.0] * len(factors))
    scheduled = _trajectory(name, factors)
    moved = False
    for f, reference, got in zip(factors, plain, scheduled, strict=True):
        for d_ref, d in zip(reference, got, strict=True):
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


def _steps_of_tiny_gpt(build, steps):
    """The change of every parameter of a seeded ``TinyGPT`` after ``steps`` steps of ``build(model)`` on
    :func:`_fixed_gradients`."""
    torch.manual_seed(0)
    model = TinyGPT(vocab=11, context=4, layers=1, width=8, heads=2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build(model)
    for step in range(steps):
        _fixed_gradients(model, step)
        optimizer.step()
    return {n: p.detach() - start[n] for n, p in model.named_parameters()}


def _workbench_muon(text):
    return lambda model: parse_variant(text).build(param_groups(model), 0.02, 0.1, adam_params=adam_routed(model))


def _hidden_matrices(deltas):
    return {name: delta for name, delta in deltas.items() if name.startswith("blocks.") and delta.ndim == 2}


@needs("torch_muon")
def test_our_muon_and_torch_muon_take_the_same_steps_in_the_workbench():
    """Ours against torch's on the same routing: the Adam part to float32 round-off, the Newton–Schulz part to
    bfloat16 round-off (both iterate in bfloat16, each in its own order)."""
    ours, theirs = (_steps_of_tiny_gpt(_workbench_muon(name), steps=3)
                    for name in ("muon,adam_lr=3e-3", "torch_muon,adam_lr=3e-3"))
    hidden = _hidden_matrices(theirs)
    for name, delta in theirs.items():
        if name in hidden:
            assert (ours[name] - delta).norm() <= 2e-2 * delta.norm(), name
        else:
            torch.testing.assert_close(ours[name], delta, atol=1e-6, rtol=1e-5, msg=name)


def test_muon_ns_dtype_runs_the_newton_schulz_iteration_in_that_dtype():
    """``muon,ns_dtype=float32`` agrees with the iteration in float64 (whose polynomial test_muon checks against the
    SVD) to float32 round-off; Muon's default bfloat16 iteration does not, so the key reaches the optimizer."""
    import precond

    def float64_iteration(model):
        named = [(n, p) for n, p in model.named_parameters()]
        return precond.muon(named, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, adam_lr=3e-4,
                            adam_betas=(0.9, 0.95), adam_eps=1e-10, adam_params=sorted(adam_routed(model)),
                            ns_dtype=torch.float64)

    reference = _hidden_matrices(_steps_of_tiny_gpt(float64_iteration, steps=2))
    single = _steps_of_tiny_gpt(_workbench_muon("muon,ns_dtype=float32"), steps=2)
    half = _steps_of_tiny_gpt(_workbench_muon("muon"), steps=2)
    for name, delta in reference.items():
        assert (single[name] - delta).norm() <= 1e-5 * delta.norm(), name
    assert max((half[name] - delta).norm() / delta.norm() for name, delta in reference.items()) > 1e-4


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
    assert parse_variant("muon,ns_dtype=float32").spec() == "muon,ns_dtype=float32"
    for text, fragment in [("muon,every=5", "cannot be changed on the named variant 'muon'"),
                           ("kl_shampoo,adam_lr=1e-3", "has neither: add embeddings=adam"),
                           ("estimator=kl,adam_lr=1e-3", "has neither: add embeddings=adam"),
                           ("estimator=kl,embeddings=one_sided,adam_lr=1e-3", "add embeddings=adam"),
                           ("muon,adam_lr=0", "expected a number > 0"),
                           ("muon,ns_dtype=float16", "bfloat16, float32"),
                           ("torch_muon,ns_dtype=float32", "cannot be changed on the named variant 'torch_muon'"),
                           ("kl_shampoo,ns_dtype=float32", "cannot be changed on the named variant 'kl_shampoo'"),
                           ("estimator=kl,ns_dtype=float32", "belongs to muon only.*polar_dtype"),
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
    assert torch.equal(fresh.parts[0].state[a.weight]["momentum_buffer"],
                       opt.parts[0].state[a.weight]["momentum_buffer"])
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



# --- statistics -------------------------------------------------------------------------------------------------
T_975 = {1: 12.706204736174707, 2: 4.302652729749464, 3: 3.182446305284263, 4: 2.7764451051977934,
         5: 2.5705818356363146, 10: 2.2281388519862744, 30: 2.0422724563012373}
"""Two-sided 95% Student-t quantiles (standard tables, e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)."""


@pytest.mark.parametrize("df, expected", sorted(T_975.items()))
def test_t_quantiles_match_the_tables(df, expected):
    from precond.ablate.stats import t_quantile
    assert t_quantile(0.975, df) == pytest.approx(expected, rel=1e-9)
    assert t_quantile(0.025, df) == pytest.approx(-expected, rel=1e-9)


@pytest.mark.parametrize("p", [0.55, 0.8, 0.9, 0.975, 0.999])
def test_t_quantiles_match_closed_forms(p):
    """ν = 1 is the Cauchy distribution, t_p = tan(π(p − ½)); ν = 2 has t_p = (2p − 1)/√(2p(1 − p)); ν → ∞ is the
    normal distribution (``statistics.NormalDist``)."""
    import statistics

    from precond.ablate.stats import t_quantile
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    assert t_quantile(p, 1e7) == pytest.approx(statistics.NormalDist().inv_cdf(p), rel=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="scipy is a test-only reference")
def test_t_quantiles_match_scipy():
    from scipy import stats

    from precond.ablate.stats import t_quantile
    for df in (1, 2, 3, 6, 9, 17, 50, 0.7, 3.5):
        for p in (0.6, 0.95, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_paired_interval_and_its_verdict():
    from precond.ablate.stats import paired_interval
    d = [0.10, 0.20, 0.05]
    mean, sd = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    interval = paired_interval(d)
    half = T_975[2] * sd / math.sqrt(3)
    assert (interval.low, interval.high) == pytest.approx((mean - half, mean + half), rel=1e-9)
    assert interval.significant is False and interval.text().endswith("not significant")
    worse = paired_interval([0.10, 0.11, 0.12])
    assert worse.significant and worse.text().endswith("worse")
    assert paired_interval([-0.3, -0.31, -0.29]).text().endswith("better")
    assert paired_interval([0.2]).text() == "+0.2000 (1 seed: no interval)" and paired_interval([]) is None


def _run(variant, lr, seed, final, seconds=1.0, steps=4):
    vals = [5.0] + [5.0 - (5.0 - final) * k / steps for k in range(1, steps + 1)] if final is not None else [5.0, None]
    return {"variant": variant, "lr": lr, "seed": seed, "final_val": final, "diverged": final is None,
            "steps_done": steps, "curve": {"step": list(range(len(vals))), "train": [None] * len(vals), "val": vals,
                                           "seconds": [seconds * k for k in range(len(vals))]},
            "step_ms": [1000.0 * seconds] * steps, "wall_seconds": steps * seconds}


def test_the_per_step_table_gives_paired_differences_to_the_best_baseline():
    from precond.ablate.report import markdown_table
    from precond.ablate.summary import reference_of, summarize
    runs = [_run("adamw", 1e-3, s, f) for s, f in enumerate([2.00, 2.10, 2.05])]
    runs += [_run("hb", 1e-3, s, f) for s, f in enumerate([2.20, 2.30, 2.25])]
    runs += [_run("ours", 1e-3, s, f) for s, f in enumerate([1.99, 2.12, 2.02])]  # -0.01, +0.02, -0.03
    runs += [_run("bad", 1e-3, s, f) for s, f in enumerate([2.50, 2.61, 2.54])]
    summaries = summarize(runs, ["adamw", "hb", "ours", "bad"])
    reference = reference_of(summaries, ["adamw", "hb"])
    assert reference.name == "adamw"
    table = markdown_table(summaries, None, False, reference)
    assert "Δ vs adamw (95% CI)" in table and "| adamw | 0.001 | 2.0500 ± 0.0500 | reference |" in table
    mean, sd = -0.02 / 3, math.sqrt(((-0.01 + 0.02 / 3) ** 2 + (0.02 + 0.02 / 3) ** 2 + (-0.03 + 0.02 / 3) ** 2) / 2)
    half = T_975[2] * sd / math.sqrt(3)
    assert f"| {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] not significant |" in table
    half = T_975[2] * 0.01 / math.sqrt(3)  # bad − adamw = 0.50, 0.51, 0.49
    assert f"+0.5000 [{0.5 - half:+.4f}, {0.5 + half:+.4f}] worse" in table
    assert reference_of(summaries, []).name == "ours"  # no baseline: the best variant


# --- bracketing -------------------------------------------------------------------------------------------------
def test_extension_steps_beyond_the_edge_at_the_grid_ratio():
    from precond.ablate.bracket import extension
    assert extension({1e-3: 2.0, 2e-3: 1.5, 4e-3: 1.8}) == (2e-3, [], "")
    assert extension({1e-3: 2.0, 2e-3: 1.5, 4e-3: 1.4}) == (4e-3, [8e-3], "upper")
    assert extension({1e-3: 1.0, 3e-3: 1.5}) == (1e-3, [0.0003333], "lower")
    assert extension({1e-3: 1.0}) == (1e-3, [5e-4, 2e-3], "lower and upper")
    assert extension({1e-3: 1.0, 2e-3: math.inf}) == (1e-3, [5e-4], "lower")  # a diverged neighbour brackets above
    assert extension({1e-3: 2.0, 2e-3: 1.0, 4e-3: math.inf}) == (2e-3, [], "")
    assert extension({1e-3: math.inf, 2e-3: math.inf}) == (None, [5e-4], "every lr diverged")


class _Synthetic:
    """Finished runs made on demand: final loss (log10 lr + 2.7)² + 1 + 0.01·seed, minimum at lr ≈ 2e-3."""

    def __init__(self):
        self.done = {}

    def lookup(self, variant, lr, seed):
        return self.done.get((variant.spec(), lr, seed))

    def finish(self, grid):
        for variant, lr, seed in grid:
            loss = (math.log10(lr) + 2.7) ** 2 + 1 + 0.01 * seed
            self.done[(variant.spec(), lr, seed)] = _run(variant.name, lr, seed, loss)


def _plan_to_the_end(config, runs):
    """Plan, finish every run still to do, and plan again until none is left: the last plan and each round's
    runs."""
    from precond.ablate.bracket import plan
    rounds = []
    while True:
        current = plan(config, runs.lookup)
        todo = [run for run in current.grid() if runs.lookup(*run) is None]
        if not todo:
            return current, rounds
        rounds.append(todo)
        runs.finish(todo)


def test_the_plan_extends_a_grid_until_the_best_lr_is_inside(tmp_path):
    from precond.ablate.bracket import plan
    config = tiny_config(tmp_path, [{"spec": "adamw", "lrs": [1e-5, 1e-4]},
                                    {"spec": "kl_shampoo", "lrs": [1e-3, 1e-2], "bracket": False},
                                    {"spec": "kl_shampoo,every=50", "name": "T=50", "lr_from": "adamw"}],
                         seeds=[0, 1, 2], extend_lrs=5)
    current, rounds = _plan_to_the_end(config, _Synthetic())
    rounds = [sorted({(v.name, lr) for v, lr, _ in todo}) for todo in rounds]
    tunings = current.tunings
    assert tunings["adamw"].state == "inside" and tunings["adamw"].added == (0.001, 0.01)
    assert tunings["adamw"].best_lr == 1e-3 and "inside the grid 1e-05, 0.0001, 0.001, 0.01" in tunings["adamw"].message
    assert tunings["kl_shampoo"].state == "fixed" and "kept as given" in tunings["kl_shampoo"].message
    assert tunings["T=50"].lrs == (1e-3,) and "best lr of adamw (0.001)" in tunings["T=50"].message
    assert rounds[1] == [("adamw", 0.001)] and rounds[2] == [("adamw", 0.01)] and rounds[3] == [("T=50", 0.001)]

    tight = tiny_config(tmp_path, [{"spec": "adamw", "lrs": [1e-5, 1e-4]}], seeds=[0], extend_lrs=1)
    runs = _Synthetic()
    for _ in range(4):
        runs.finish(plan(tight, runs.lookup).grid())
    tuning = plan(tight, runs.lookup).tunings["adamw"]
    assert tuning.state == "limit" and tuning.message.startswith("NOT BRACKETED: best lr 0.001 is at the upper edge")


def test_tuning_seeds_tune_on_their_seeds_and_replicate_only_the_settled_best_lr(tmp_path):
    from precond.ablate.bracket import plan
    variants = [{"spec": "adamw", "lrs": [1e-5, 1e-4]}, {"spec": "kl_shampoo,every=50", "name": "T=50",
                                                          "lr_from": "adamw"}]
    config = tiny_config(tmp_path, variants, seeds=[0, 1], tuning_seeds=[0], extend_lrs=5)
    runs = _Synthetic()
    current, rounds = _plan_to_the_end(config, runs)
    rounds = [sorted({(v.name, lr, seed) for v, lr, seed in todo}) for todo in rounds]
    # seed 1 waits until adamw is bracketed on seed 0 (1e-5, 1e-4, then 1e-3, then 1e-2), then runs at 1e-3 only
    assert rounds == [[("adamw", 1e-5, 0), ("adamw", 1e-4, 0)], [("adamw", 1e-3, 0)], [("adamw", 1e-2, 0)],
                      [("T=50", 1e-3, 0), ("T=50", 1e-3, 1), ("adamw", 1e-3, 1)]]
    alone = plan(tiny_config(tmp_path, variants, seeds=[0], extend_lrs=5), runs.lookup).tunings["adamw"]
    assert current.tunings["adamw"] == alone  # the same tuning as seed 0 alone
    assert [(lr, seed) for _, lr, seed in current.grid(every_lr=True)][:4] == [(1e-5, 0), (1e-4, 0), (1e-3, 0),
                                                                               (1e-2, 0)]

    with pytest.raises(ValueError, match=r"tuning_seeds must be some of the seeds \[0, 1\]; \[2\] are not"):
        tiny_config(tmp_path, variants, seeds=[0, 1], tuning_seeds=[2])


def test_a_replica_seed_never_chooses_the_best_lr():
    from precond.ablate.summary import summarize
    runs = [_run("a", 1e-3, 0, 1.00), _run("a", 2e-3, 0, 1.10),  # seed 0 (tuning): 1e-3 is best
            _run("a", 1e-3, 1, 1.30), _run("a", 2e-3, 1, 0.90)]  # seed 1 alone would choose 2e-3
    (tuned,) = summarize(runs, ["a"], tuning_seeds=(0,))
    assert tuned.best_lr == 1e-3 and tuned.final_mean == pytest.approx(1.15)
    assert sorted(r["seed"] for r in tuned.best_runs) == [0, 1]
    (pooled,) = summarize(runs, ["a"])
    assert pooled.best_lr == 2e-3 and pooled.final_mean == pytest.approx(1.00)
    lone = [_run("b", 1e-3, 0, 1.0), _run("b", 5e-4, 1, 0.5)]  # an lr that only a replica seed ran
    assert summarize(lone, ["b"], tuning_seeds=(0,))[0].best_lr == 1e-3


def test_runs_made_before_tuning_seeds_stay_in_the_report(tmp_path):
    every = tiny_config(tmp_path, [{"spec": "adamw", "lrs": [1e-5, 3e-5]}], seeds=[0, 1])
    assert run_ablation(every, log=quiet).executed == 4
    later = attrs.evolve(every, tuning_seeds=(0,))
    result = run_ablation(later, log=quiet)
    assert (result.executed, result.remaining, len(result.records)) == (0, 0, 4)
    summary = (tmp_path / "summary.md").read_text()
    assert "| adamw | 1e-05 |" in summary and "learning rates tuned on seed(s) 0 alone (`tuning_seeds`)" in summary


def test_an_ablation_extends_its_grid_resumes_and_reports_the_same_plan(tmp_path):
    config = tiny_config(tmp_path, [{"spec": "adamw", "lrs": [1e-5, 3e-5]}], extend_lrs=1)
    result = run_ablation(config, log=quiet)
    assert sorted(r["lr"] for r in result.records) == [1e-5, 3e-5, 9e-5]  # one step up at the grid's ratio
    summary = (tmp_path / "summary.md").read_text()
    assert "**adamw: NOT BRACKETED: best lr 9e-05 is at the upper edge" in summary
    assert "9e-05 (grid edge: not bracketed)" in summary
    assert run_ablation(config, log=quiet).executed == 0  # the same plan from the finished runs
    (tmp_path / "summary.md").unlink()
    reported = run_ablation(config, log=quiet, train=False)
    assert len(reported.records) == 3 and "NOT BRACKETED" in (tmp_path / "summary.md").read_text()


def test_lr_sources_are_checked(tmp_path):
    with pytest.raises(ValueError, match="lr_from names 'nope'"):
        tiny_config(tmp_path, [{"spec": "adamw", "lr_from": "nope"}])
    with pytest.raises(ValueError, match="takes a learning rate from another variant"):
        tiny_config(tmp_path, ["kl_shampoo", {"spec": "adamw", "lr_from": "kl_shampoo"},
                               {"spec": "soap", "lr_from": "adamw"}])
    with pytest.raises(ValueError, match="adam_lr_from sets the lr of an Adam part.*add embeddings=adam"):
        tiny_config(tmp_path, ["adamw", {"spec": "kl_shampoo", "adam_lr_from": "adamw"}])
    with pytest.raises(ValueError, match="adam_lr_from sets the lr of an Adam part, and adamw has none"):
        parse_variant("adamw,adam_lr_from=kl_shampoo")
    with pytest.raises(ValueError, match="give it or adam_lr, not both"):
        parse_variant("kl_shampoo,embeddings=adam,adam_lr=1e-3,adam_lr_from=adamw")


def test_adam_lr_from_gives_embeddings_adam_the_tuned_adamw_lr(tmp_path):
    """A variant with ``embeddings=adam`` and ``adam_lr_from = "adamw"`` waits until AdamW is bracketed, then runs
    with ``adam_lr`` = AdamW's best lr (part of its identity) and tunes its own grid."""
    from precond.ablate.bracket import plan
    variants = [{"spec": "adamw", "lrs": [1e-5, 1e-4]},
                {"spec": "kl_shampoo,embeddings=adam", "name": "KL, Adam ends", "lrs": [1e-3, 1e-2],
                 "bracket": False, "adam_lr_from": "adamw"}]
    config = tiny_config(tmp_path, variants, seeds=[0], extend_lrs=5)
    runs = _Synthetic()
    first = plan(config, runs.lookup)
    assert "waiting" == first.tunings["KL, Adam ends"].state
    current, _ = _plan_to_the_end(config, runs)
    tuning = current.tunings["KL, Adam ends"]
    assert tuning.lrs == (1e-3, 1e-2) and "adam_lr 0.001, the best lr of adamw" in tuning.message
    ran = {variant.spec() for variant, _, _ in current.grid(every_lr=True) if variant.name == "KL, Adam ends"}
    assert ran == {"kl_shampoo,adam_lr=0.001,embeddings=adam"}
    with pytest.raises(ValueError, match="baselines names 'sgd'"):
        tiny_config(tmp_path, ["adamw"], baselines=["sgd"])


# --- loss against wall-clock time -------------------------------------------------------------------------------
def test_steady_time_counts_the_first_step_at_the_median():
    from precond.ablate import wallclock
    record = {"curve": {"step": [0, 2, 4], "val": [5.0, 4.0, 3.0], "seconds": [0.0, 9.0, 9.5]},
              "step_ms": [8000.0, 300.0, 200.0, 250.0]}
    assert wallclock.steady_seconds(record) == pytest.approx([0.0, 0.55, 1.0])  # 250 ms counted for the first step
    assert wallclock.startup(record) == pytest.approx(7.75) and wallclock.ms_per_step(record) == pytest.approx(250.0)
    assert (wallclock.loss_at(record, 0.5), wallclock.loss_at(record, 0.55),
            wallclock.loss_at(record, 5)) == (5.0, 4.0, 3.0)
    assert wallclock.time_to(record, 3.5) == pytest.approx(1.0) and wallclock.time_to(record, 2.0) is None
    old = {"curve": record["curve"]}  # made before step times were kept: the measured times
    assert wallclock.steady_seconds(old) == [0.0, 9.0, 9.5]
    assert wallclock.equal_time([[record], [old, old]]) == pytest.approx(1.0)


@given(times=st.lists(st.floats(1.0, 5e4), min_size=2, max_size=120))
def test_steady_time_is_the_window_at_the_later_mean_plus_the_later_steps(times):
    """Closed form of the steady time (``precond.ablate.wallclock``'s docstring): with ``W = max(1, min(25, n // 4))``
    and ``t̄`` the mean of the steps after the window, the whole run is ``W t̄ + Σ_{i≥W} t_i``, the per-step time
    is ``t̄``, the startup is ``max(0, Σ_{i<W} t_i − W t̄)``, and the axis never decreases."""
    from precond.ablate import wallclock
    n = len(times)
    window = max(1, min(25, n // 4))
    later = times[window:]
    mean = sum(later) / len(later)
    record = {"curve": {"step": list(range(n + 1)), "val": [1.0] * (n + 1), "seconds": [0.0] * (n + 1)},
              "step_ms": times}
    axis = wallclock.steady_seconds(record)
    assert axis[-1] == pytest.approx((window * mean + sum(later)) / 1e3, rel=1e-9)
    assert all(b >= a for a, b in zip(axis, axis[1:], strict=False))  # axis[1:] is one shorter: the pairs of neighbours
    assert wallclock.ms_per_step(record) == pytest.approx(mean, rel=1e-9)
    assert wallclock.startup(record) == pytest.approx(max(0.0, sum(times[:window]) - window * mean) / 1e3,
                                                      rel=1e-9, abs=1e-9)


def test_steady_time_moves_a_compilation_after_the_first_step_into_startup():
    """HeavyBall under torch.compile spends tens of seconds in its second step and again at its first refresh
    (docs/results/gpu_long): those one-time costs go to ``startup``, not into the steady step time."""
    from precond.ablate import wallclock
    steady = ([50.0] * 9 + [350.0]) * 23  # a refresh every 10 steps; 225 steps keep 20 refreshes after the window
    times = [900.0, 30_000.0] + steady[2:10] + [6_000.0] + steady[11:225]
    record = {"curve": {"step": [0, 100, 200], "val": [5.0, 4.0, 3.0], "seconds": [0.0, 40.0, 50.0]},
              "step_ms": times}
    assert wallclock.ms_per_step(record) == pytest.approx(80.0)  # (9 × 50 + 350) / 10, by hand
    window_excess = sum(times[:25]) - 25 * 80.0
    assert wallclock.startup(record) == pytest.approx(window_excess / 1e3)
    window_at_steady = 25 * 0.080  # the first 25 steps at the steady mean, then the measured steps
    assert wallclock.steady_seconds(record) == pytest.approx(
        [0.0, window_at_steady + sum(times[25:100]) / 1e3, window_at_steady + sum(times[25:200]) / 1e3])


def test_the_per_second_table_compares_at_the_fastest_variants_time():
    from precond.ablate.report import time_table
    from precond.ablate.summary import reference_of, summarize
    fast = [_run("fast", 1e-3, s, 2.0 + 0.01 * s, seconds=1.0) for s in range(3)]  # 4 s per run
    slow = [_run("slow", 1e-3, s, 1.0 + 0.01 * s, seconds=2.0) for s in range(3)]  # 8 s; at 4 s, step 2
    summaries = summarize(fast + slow, ["fast", "slow"])
    table, equal = time_table(summaries, 2.5, reference_of(summaries, ["fast"]))
    assert equal == pytest.approx(4.0)
    # slow at step 2 (4 s): (5 + 1 + 0.01 s)/2 = 3 + 0.005 s; fast at step 4 (4 s): 2 + 0.01 s; Δ = 1 − 0.005 s
    assert "| slow | 2000.0 | 0.00 | 8.0 | 3.0050 ± 0.0050 |" in table
    assert "| fast | 1000.0 | 0.00 | 4.0 | 2.0100 ± 0.0100 | reference | 4.0 |" in table
    half = T_975[2] * 0.005 / math.sqrt(3)
    assert f"| +0.9950 [{0.995 - half:+.4f}, {0.995 + half:+.4f}] worse | 6.0 |" in table  # 2.5 reached at step 3


def test_untuned_variants_run_after_the_tuned_grid(tmp_path):
    from precond.ablate.bracket import plan
    config = tiny_config(tmp_path, [{"spec": "shampoo", "lrs": [2e-3], "bracket": False},
                                    {"spec": "adamw", "lrs": [1e-3, 2e-3]}], seeds=[0, 1])
    order = [(v.name, lr, seed) for v, lr, seed in plan(config, lambda *run: None).grid()]
    assert order == [("adamw", 1e-3, 0), ("adamw", 2e-3, 0), ("adamw", 1e-3, 1), ("adamw", 2e-3, 1),
                     ("shampoo", 2e-3, 0), ("shampoo", 2e-3, 1)]
