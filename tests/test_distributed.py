"""``precond.DataParallel``: 2 and 3 CPU processes (gloo, one thread each) give the parameters of one process.

Each world size is spawned once (``distributed_workers.suite``) and every test reads its results; the references
are the single-process optimizer on the same gradients (``distributed=None``), computed here. With the updates
exchanged in the state dtype (float32) the parameters are compared bitwise (``torch.equal``): owner buckets hold
fewer parameters than one process's stacks, and CPU kernels give each stacked entry the bits it gets alone.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import precond
from precond.distributed import owners
from tests import distributed_workers as w
from tests.distributed_harness import spawn

MODULE = "tests.distributed_workers"
WORLDS = (2, 3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dcp"))


@pytest.fixture(scope="module")
def runs(checkpoints):
    """W=2 saves checkpoints that W=3 (and, in ``alone``, W=1) load."""
    return {2: spawn(2, MODULE, "suite", checkpoints, "save"), 3: spawn(3, MODULE, "suite", checkpoints, "load")}


@pytest.fixture(scope="module")
def alone(runs, checkpoints):
    """W=1: loads W=2's checkpoints, runs the distributed benchmark."""
    return spawn(1, MODULE, "alone", checkpoints)[0]


@functools.cache
def reference(name: str, **kwargs):
    case = next(c for c in w.parity_cases() if w.case_name(c) == name)
    return w.trajectory(case)[0]


def _single(case, **kwargs):
    return w.trajectory(case, None, **kwargs)


def _assert_bitwise(actual, expected, what):
    assert len(actual) == len(expected)
    for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        assert torch.equal(a, b), f"{what}: parameter {i} differs by up to {(a.double() - b.double()).abs().max():.3e}"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", [w.case_name(c) for c in w.parity_cases()])
def test_every_rank_equals_one_process_bitwise(runs, world, name):
    """2T+1 steps crossing two refreshes, every preset × stack × stagger × mode: every rank's parameters are
    bitwise those of one process."""
    expected = reference(name)
    for rank, result in enumerate(runs[world]):
        _assert_bitwise(result["parity"][name], expected, f"{name} at rank {rank} of {world}")


@pytest.mark.parametrize("world", WORLDS)
def test_edge_cases_equal_one_process(runs, world):
    """More ranks than parameters, a parameter never given a gradient, vectors and a mode above max_dim, bfloat16
    parameters, one huge parameter (broadcasts instead of an all-gather), several chunks, tensor lr, asynchronous
    refreshes, a param group added mid-run, and a subgroup of ranks 0 and 1 (``group=``): bitwise one process."""
    shampoo = {"preset": "shampoo"}
    expected = {
        "few": _single(shampoo, shapes=[(4, 3)], missing={})[0],
        "frozen": _single(shampoo, shapes=[(5,), (7, 3), (3,), (4, 4)], frozen=(2,))[0],
        "bf16-owner": _single({"preset": "soap"}, dtype=torch.bfloat16)[0],
        "bf16-replicate": _single({"preset": "soap"}, dtype=torch.bfloat16)[0],
        "uneven": _single(shampoo, shapes=[(40, 5), (2, 3), (3,)], missing={})[0],
        "chunks": _single(shampoo)[0],
        "tensor-lr": _single(shampoo)[0],
    }
    subgroup = _single({"preset": "kl_shampoo", "stagger": True})[0]
    expected["async"] = _single({"preset": "shampoo", "stagger": True})[0]
    expected["added-group"] = w._added_group(None)
    for rank, result in enumerate(runs[world]):
        for key, value in expected.items():
            _assert_bitwise(result["edges"][key], value, f"{key} at rank {rank} of {world}")
        for mode in ("owner", "replicate"):
            if rank < 2:
                _assert_bitwise(result["edges"][f"subgroup-{mode}"], subgroup, f"subgroup {mode} at rank {rank}")
    frozen = runs[world][0]["edges"]["frozen"][2]
    assert torch.equal(frozen, w.make_params([(5,), (7, 3), (3,), (4, 4)])[2]), "a parameter without gradient moved"


@pytest.mark.parametrize("world", WORLDS)
def test_chunks_start_while_later_kinds_compute_and_change_nothing(runs, world):
    """Owner mode with one chunk per kind: each chunk's exchange starts as soon as this rank staged its updates
    (before the end of the step on some rank), and the parameters equal one process bitwise."""
    expected = _single({"preset": "kl_shampoo"})[0]
    early = 0
    for rank, result in enumerate(runs[world]):
        pipelined = result["edges"]["pipelined"]
        _assert_bitwise(pipelined["params"], expected, f"pipelined chunks at rank {rank} of {world}")
        assert pipelined["chunks"] > 1 and pipelined["collectives"] >= pipelined["chunks"]
        early += pipelined["early_collectives"]
    assert early > 0, "no chunk was exchanged before the end of the step"


@pytest.mark.parametrize("world", WORLDS)
def test_bf16_communication_rounds_only_the_update(runs, world):
    """Updates sent in bfloat16: every rank still agrees bitwise, and each step's update differs from the float32
    one by bf16 rounding (relative 2⁻⁸ of |ηU|) — measured on the parameters after 7 steps against one process."""
    expected = _single({"preset": "shampoo"})[0]
    first = runs[world][0]["edges"]["bf16-comm"]
    for result in runs[world][1:]:
        _assert_bitwise(result["edges"]["bf16-comm"], first, "bf16 communication")
    start = w.make_params()
    for got, want, p0 in zip(first, expected, start, strict=True):
        moved = (want - p0).abs().max().item()
        assert (got - want).abs().max().item() <= 2**-7 * moved + 1e-6
        assert not torch.equal(got, want) or moved == 0  # the rounding is real: the test can fail


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_nonfinite_gradient_on_its_owner_stops_every_rank(runs, world, policy):
    for result in runs[world]:
        outcome = result["edges"]["nonfinite"][policy]
        assert outcome["unchanged"]
        assert outcome["outcome"] == ("raised" if policy == "raise" else "stepped")
        if policy == "skip":
            assert outcome["stats"].get("nonfinite_skipped") == 1  # agreed, counted once for the whole group


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mode", ["owner", "replicate"])
def test_ddp_end_to_end_equals_one_process_on_the_concatenated_batch(runs, world, mode):
    """Each rank its own samples, DDP averaging the gradients; the reference is one process on all samples. The
    averages are rounded differently (mean of means), so tolerance, not bits: float32's default ``assert_close``
    tolerance on a float64 model (see ``TinyNet`` for why not a float32 model)."""
    expected = _concatenated(world)
    for result in runs[world]:
        for got, want in zip(result["ddp"][mode], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)
        _assert_bitwise(result["ddp"][mode], runs[world][0]["ddp"][mode], "ranks agree")


@functools.cache
def _concatenated(world):
    model = w.TinyNet()
    optimizer = precond.shampoo(model.parameters(), lr=3e-2, every=w.EVERY, state_dtype=torch.float64)
    for step in range(1, w.STEPS + 1):
        x, y = w.batch(step, w.PER_RANK * world)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("world", WORLDS)
def test_owner_mode_splits_the_state(runs, world):
    """Per-rank optimizer state in owner mode ≈ the single-process state / W (within 25%)."""
    shapes = [(12, 12)] * 4 + [(12, 24)] * 4 + [(24,)] * 4
    _, single = _single({"preset": "shampoo"}, shapes=shapes, missing={}, steps=2)
    total = precond.distributed.state_bytes(single)
    per_rank = [result["state"]["bytes"] for result in runs[world]]
    print(f"\nowner-mode state bytes at W={world}: per rank {per_rank}, one process {total}, "
          f"ratio {[round(b * world / total, 3) for b in per_rank]}")
    assert sum(per_rank) == total
    for b in per_rank:
        assert abs(b - total / world) <= 0.25 * total / world
    for result in runs[world]:
        _assert_bitwise(result["state"]["params"], runs[world][0]["state"]["params"], "ranks agree")


# --- FSDP2 (DTensor Shard(0)) ------------------------------------------------------------------------------
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", w.FSDP_CASES, ids=w.case_name)
def test_fsdp_sharded_parameters_equal_one_process_bitwise(runs, world, case):
    """Row-sharded DTensor parameters (4 rows over 3 ranks: 2+2+0; a vector; order 3), gradients missing at some
    steps: the gathered full parameters after 2T+1 steps are bitwise those of one process on full tensors."""
    expected = w.trajectory(case, shapes=w.FSDP_SHAPES)[0]
    for rank, result in enumerate(runs[world]):
        _assert_bitwise(result["fsdp"][f"{w.case_name(case)}-{torch.float32}"]["params"], expected,
                        f"{w.case_name(case)} at rank {rank} of {world}")


@pytest.mark.parametrize("world", WORLDS)
def test_fsdp_bf16_updates_round_only_the_update(runs, world):
    case = {"preset": "shampoo", "stack": True, "stagger": True}
    expected = w.trajectory(case, shapes=w.FSDP_SHAPES)[0]
    got = runs[world][0]["fsdp"][f"{w.case_name(case)}-{torch.bfloat16}"]["params"]
    for g, e, p0 in zip(got, expected, w.make_params(w.FSDP_SHAPES), strict=True):
        moved = (e - p0).abs().max().item()
        assert (g - e).abs().max().item() <= 2**-7 * moved + 1e-6
    assert any(not torch.equal(g, e) for g, e in zip(got, expected, strict=True))


@pytest.mark.parametrize("world", WORLDS)
def test_fully_shard_model_trains_like_one_process_and_resumes_bitwise(runs, world):
    """``fully_shard`` (FSDP2) on CPU gloo, each rank its own samples: the same as one process on all samples to
    float32's default tolerance (a float64 model: the averaged gradients round differently); a DCP checkpoint loaded
    into a freshly sharded model continues bitwise like the uninterrupted run."""
    expected = w.concatenated_reference(world)
    for rank, result in enumerate(runs[world]):
        run = result["fully_sharded"]
        for got, want in zip(run["after"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)
        _assert_bitwise(run["resumed"], run["after"], f"fully_shard resumed at rank {rank} of {world}")


def test_fsdp_refuses_what_it_cannot_shard_with_a_clear_error(runs):
    refused = runs[2][0]["fsdp"]["refused"]
    assert refused["replicate-placement"].startswith("TypeError") and "Shard(0)" in refused["replicate-placement"]
    assert refused["shard-1"].startswith("TypeError") and "Shard(dim=1)" in refused["shard-1"]
    assert refused["mixed"].startswith("TypeError") and "plain tensor" in refused["mixed"]
    assert refused["replicate-mode"].startswith("TypeError") and "mode='owner'" in refused["replicate-mode"]


# --- checkpoints -------------------------------------------------------------------------------------------
@functools.cache
def _uninterrupted(case):
    model = w.checkpoint_net()
    optimizer = w.checkpoint_optimizer(model, case[0], None)
    return w.run_steps(model, optimizer, range(1, w.CHECKPOINT_AT + w.AFTER + 1))


@pytest.mark.parametrize("case", w.CHECKPOINT_CASES, ids=w.checkpoint_name)
@pytest.mark.parametrize("world", [1, 3])
def test_dcp_checkpoint_saved_at_two_ranks_resumes_at_one_and_three(runs, alone, case, world):
    """Saved with ``dcp.save`` at W=2 after 2T−1 steps, loaded at W=1 and W=3 (other owners), 3 more steps
    crossing a refresh: bitwise the uninterrupted W=2 run and the uninterrupted single-process run."""
    name = w.checkpoint_name(case)
    uninterrupted = runs[2][0]["checkpoint"][name]["after"]
    _assert_bitwise(uninterrupted, _uninterrupted(case), "uninterrupted W=2 run vs one process")
    resumed = [alone["checkpoint"]] if world == 1 else [r["checkpoint"] for r in runs[3]]
    for rank, result in enumerate(resumed):
        _assert_bitwise(result[name]["after"], uninterrupted, f"{name} resumed at rank {rank} of {world}")


@pytest.mark.parametrize("world", [1, 3])
def test_checkpoint_helpers_and_a_single_process_state_dict_resume(runs, alone, world):
    """``precond.distributed.checkpoint.save``/``load`` at W ranks, and a plain single-process ``state_dict``
    loaded into owner mode (each rank keeps its share): both resume bitwise."""
    expected = _uninterrupted(("shampoo", None, False))[:]
    results = [alone["checkpoint"]] if world == 1 else [r["checkpoint"] for r in runs[3]]
    for rank, result in enumerate(results):
        _assert_bitwise(result["helpers"], expected, f"helpers at rank {rank} of {world}")
        _assert_bitwise(result["plain"], expected, f"plain state_dict at rank {rank} of {world}")


@pytest.mark.parametrize("case", w.CHECKPOINT_CASES, ids=w.checkpoint_name)
def test_dcp_initialised_fresh_optimizer_has_the_keys_of_a_trained_one(runs, case):
    """``get_optimizer_state_dict`` on a fresh optimizer steps it with zero gradients and lr 0: per rank, the
    same tensor keys, shapes and dtypes as the trained optimizer's, and the weights untouched."""
    name = w.checkpoint_name(case)
    for result in runs[2]:
        entry = result["checkpoint"][name]
        assert entry["keys"] and entry["fresh_keys"] == entry["keys"]
        assert entry["fresh_unchanged"]
    if case[1] == "owner":  # each rank saves only what it owns: together everything, once
        keys = [set(result["checkpoint"][name]["keys"]) for result in runs[2]]
        assert not keys[0] & keys[1]
        assert keys[0] | keys[1] == set(_single_process_keys(case))


def _single_process_keys(case):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = w.checkpoint_net()
    optimizer = w.checkpoint_optimizer(model, case[0], None)
    w.run_steps(model, optimizer, range(1, w.CHECKPOINT_AT + 1))
    return w._tensor_keys(get_optimizer_state_dict(model, optimizer, options=w._options(case[2])), case[2])


@pytest.mark.parametrize("preset", w.PRESETS)
def test_zero_gradient_initialisation_creates_the_whole_state_and_moves_nothing(preset):
    """DCP's ``_init_optim_state`` (zero gradients, lr 0, one step) on a single-process optimizer: the trained
    optimizer's keys, finite state, unchanged weights; loading a trained state over it then resumes bitwise."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = w.checkpoint_net()
    optimizer = w.checkpoint_optimizer(model, preset, None)
    fresh = get_optimizer_state_dict(model, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), w.checkpoint_net().parameters(), strict=True))
    assert all(bool(torch.isfinite(t).all()) for state in optimizer.state.values()
               for t in torch.utils._pytree.tree_leaves(state))
    trained_model = w.checkpoint_net()
    trained = w.checkpoint_optimizer(trained_model, preset, None)
    w.run_steps(trained_model, trained, range(1, w.CHECKPOINT_AT + 1))
    saved = get_optimizer_state_dict(trained_model, trained)
    assert w.state_keys(fresh["state"]) == w.state_keys(saved["state"])
    model.load_state_dict(trained_model.state_dict())
    set_optimizer_state_dict(model, optimizer, saved)
    after = w.run_steps(model, optimizer, range(w.CHECKPOINT_AT + 1, w.CHECKPOINT_AT + w.AFTER + 1))
    _assert_bitwise(after, _uninterrupted((preset, None, False)), f"{preset} resumed")


# --- the plan, without processes -----------------------------------------------------------------------
def test_cost_is_refresh_plus_per_step_work():
    p = torch.nn.Parameter(torch.zeros(4, 6))
    layout = precond.shampoo([p], max_dim=5).layout(p)
    # mode 0 (4) dense and refreshed, mode 1 (6 > max_dim) none
    assert layout.dense_modes == (0,)
    assert owners.parameter_cost(layout, [0], every=10) == 4**3 / 10 + 24 * (4 + 1)


@settings(max_examples=200)
@given(st.integers(1, 6), st.lists(st.integers(0, 5), min_size=1, max_size=30),
       st.lists(st.sampled_from([1.0, 2.0, 3.0, 10.0, 50.0, 100.0]), min_size=6, max_size=6))
def test_balance_bounds_the_largest_load(world, kinds, kind_scores):
    """Deterministic, and the largest load is at most the average plus the largest item (list scheduling)."""
    scores = [kind_scores[k] for k in kinds]
    owner = owners.balance(scores, world, kinds)
    assert owner == owners.balance(scores, world, kinds)
    loads = [sum(c for c, o in zip(scores, owner, strict=True) if o == r) for r in range(world)]
    assert max(loads) <= sum(scores) / world + max(scores) + 1e-9


@pytest.mark.parametrize("world", [2, 3, 4])
def test_balance_spreads_equal_shapes(world):
    """Repeated layers (three kinds of 12 equal items) go round the ranks: every rank stacks its share."""
    kinds = [k for _ in range(12) for k in ("qkv", "proj", "mlp")]
    scores = [{"qkv": 3.0, "proj": 1.0, "mlp": 4.0}[k] for k in kinds]
    owner = owners.balance(scores, world, kinds)
    for kind in ("qkv", "proj", "mlp"):
        counts = [sum(1 for k, o in zip(kinds, owner, strict=True) if k == kind and o == r) for r in range(world)]
        assert max(counts) - min(counts) <= 1, (kind, counts)


def test_balance_keeps_fixed_items():
    owner = owners.balance([5.0, 5.0, 5.0, 5.0], 2, fixed={0: 1, 1: 1})
    assert owner[:2] == [1, 1] and owner[2:] == [0, 0]


def test_balance_lets_the_others_make_up_for_a_dominant_item():
    assert owners.balance([100.0, 5.0, 5.0, 5.0, 5.0], 2, ["big", "s", "s", "s", "s"]) == [0, 1, 1, 1, 1]


def test_gpt2_small_owner_plan_halves_state_and_work_at_two_ranks():
    """The plan for GPT-2 small's shapes (meta tensors: nothing allocated) at W=2: each rank's state (Eq. 2) and work
    (Eq. 1) within 5% and 10% of half, although the token embedding alone is 31% of the weights."""
    from precond.bench.shapes import PRESETS
    from precond.distributed.runtime import entries_of

    params = [torch.nn.Parameter(torch.empty(shape, device="meta")) for shape in PRESETS["gpt2-small"]]
    entries = entries_of(precond.kl_shampoo(params, max_dim=2048))
    owner = owners.owner_plan(entries, 2)
    sizes = [owners.state_size(e.layout) for e in entries]
    costs = [owners.parameter_cost(e.layout, e.preconditioner.refreshable_modes(e.layout), 10) for e in entries]
    for values, slack in ((sizes, 0.05), (costs, 0.10)):
        share = sum(v for v, o in zip(values, owner, strict=True) if o == 0) / sum(values)
        assert abs(share - 0.5) <= slack / 2, share


def _gpt2_small_entries():
    from precond.bench.shapes import PRESETS
    from precond.distributed.runtime import entries_of

    params = [torch.nn.Parameter(torch.empty(shape, device="meta")) for shape in PRESETS["gpt2-small"]]
    return entries_of(precond.kl_shampoo(params, max_dim=2048))


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_by_kind_placement_puts_fewer_buckets_on_each_rank(world):
    """GPT-2 small (9 kinds: shapes that stack): ``placement="by_kind"`` leaves no rank with more kinds (buckets,
    so launches) than the balanced plan's busiest, fewer in all, and the loads within list scheduling's bound over
    the units of Eq. (4)."""
    entries = _gpt2_small_entries()
    kinds = [(e.group_index, e.layout.shape, e.param.dtype) for e in entries]

    def kinds_per_rank(owner):
        return [len({k for k, o in zip(kinds, owner, strict=True) if o == r}) for r in range(world)]

    balanced = kinds_per_rank(owners.owner_plan(entries, world))
    by_kind_owner = owners.owner_plan(entries, world, placement="by_kind")
    by_kind = kinds_per_rank(by_kind_owner)
    assert max(by_kind) <= max(balanced) and sum(by_kind) < sum(balanced), (by_kind, balanced)
    costs = [owners.parameter_cost(e.layout, e.preconditioner.refreshable_modes(e.layout), 10) for e in entries]
    sizes = [owners.state_size(e.layout) for e in entries]
    scores = [c / sum(costs) + s / sum(sizes) for c, s in zip(costs, sizes, strict=True)]
    unit = owners.kind_units(scores, kinds, world)
    units = max(unit) + 1
    unit_scores = [2 / units + sum(s for s, u in zip(scores, unit, strict=True) if u == v) for v in range(units)]
    loads = [sum(unit_scores[v] for v in range(units) if by_kind_owner[unit.index(v)] == r) for r in range(world)]
    assert max(loads) <= sum(unit_scores) / world + max(unit_scores) + 1e-9


def test_parity_cases_of_by_kind_placement_use_other_owners():
    """The ``placement="by_kind"`` parity cases are not the balanced plan again: at W=3 the stacked (4, 6) pair
    (parameters 1 and 2) shares one owner, where the balanced plan gives it two."""
    from precond.distributed.runtime import entries_of

    entries = entries_of(w.make_optimizer({"preset": "shampoo"}, w.make_params()))
    balanced, by_kind = owners.owner_plan(entries, 3), owners.owner_plan(entries, 3, placement="by_kind")
    assert balanced[1] != balanced[2] and by_kind[1] == by_kind[2]


def test_kind_units_cut_only_kinds_above_the_average_load():
    """Eq. (4)'s units: a kind of 12 items worth 6 of a total 8 at W=4 (average 2) is cut into ⌈6/2⌉ = 3 units of 4
    consecutive items; a kind below the average stays whole; a fixed item is a unit of its own."""
    scores = [0.5] * 12 + [1.0, 1.0]
    kinds = ["mlp"] * 12 + ["embedding", "embedding"]
    unit = owners.kind_units(scores, kinds, 4)
    assert unit[:12] == [0] * 4 + [1] * 4 + [2] * 4 and unit[12:] == [3, 3]
    unit = owners.kind_units(scores, kinds, 4, fixed={13: 0})
    assert unit[13] == 0 and unit[12] not in unit[:12] and len(set(unit)) == 5


@settings(max_examples=200)
@given(st.integers(1, 6), st.lists(st.integers(0, 4), min_size=1, max_size=40),
       st.lists(st.sampled_from([0.5, 1.0, 3.0, 20.0]), min_size=5, max_size=5))
def test_kind_units_are_runs_of_one_kind_cut_by_the_closed_form(world, kinds, kind_scores):
    """Each unit holds one kind only; a kind of total σ_K is cut into min(n_K, ⌈σ_K / (Σσ/W)⌉) units of consecutive
    members whose sizes differ by at most one (closed form), and by_kind's owners follow their units."""
    scores = [kind_scores[k] for k in kinds]
    unit = owners.kind_units(scores, kinds, world)
    average = sum(scores) / world
    for kind in set(kinds):
        members = [i for i, k in enumerate(kinds) if k == kind]
        units = [unit[i] for i in members]
        expected = min(len(members), max(1, math.ceil(sum(scores[i] for i in members) / average - 1e-9)))
        assert len(set(units)) == expected
        assert units == sorted(units)  # consecutive members, in order
        sizes = [units.count(u) for u in set(units)]
        assert max(sizes) - min(sizes) <= 1
        assert all(kinds[i] == kind for i, u in enumerate(unit) if u in set(units))


def test_refresh_units_of_one_offset_are_spread():
    units = [((i, 0), 8, 4, i % 2) for i in range(8)]
    owner = owners.refresh_owners(units, 2)
    for offset in (0, 1):
        ranks = [owner[(i, 0)] for i in range(8) if i % 2 == offset]
        assert sorted(ranks) == [0, 0, 1, 1]


def test_data_parallel_refuses_bad_input():
    with pytest.raises(ValueError, match="comm_dtype"):
        precond.DataParallel(comm_dtype=torch.int8)
    with pytest.raises(ValueError, match="mode"):
        precond.DataParallel(mode="zero3")
    with pytest.raises(ValueError, match="chunk_elements"):
        precond.DataParallel(chunk_elements=0)
    with pytest.raises(ValueError, match="placement"):
        precond.DataParallel(placement="kinds")
    with pytest.raises(ValueError, match="replicate.*use mode='owner'"):
        precond.DataParallel(mode="replicate", placement="by_kind")
    with pytest.raises(RuntimeError, match="init_process_group"):
        precond.shampoo([torch.nn.Parameter(torch.zeros(3, 3))], distributed=precond.DataParallel())




# --- the benchmark script (issue 14 runs it on GPUs) ---------------------------------------------------------
def _check_bench_report(report, world, what):
    assert report["meta"]["world"] == world and report["meta"]["what"] == what
    assert set(report["results"]) == {"single", "owner-float32", "owner-bfloat16", "replicate"}
    for ranks in report["results"].values():
        assert len(ranks) == world
        for r in ranks:
            assert r["step_ms_median"] > 0 and r["state_bytes"] > 0
    single = report["results"]["single"][0]["state_bytes"]
    if what == "step":
        for r in report["results"]["owner-float32"]:
            assert r["bytes_received_per_step"] >= 0
        if world > 1:
            owner = report["results"]["owner-float32"]
            assert sum(r["state_bytes"] for r in owner) == single  # split, nothing duplicated
            assert max(r["state_bytes"] for r in owner) < single
            half = report["results"]["owner-bfloat16"]
            # the all-gather payload halves (the small check all-reduce stays)
            for r32, r16 in zip(owner, half, strict=True):
                assert r16["bytes_received_per_step"] < 0.6 * r32["bytes_received_per_step"]


@pytest.mark.parametrize("what", ["step", "train"])
def test_distributed_bench_runs_at_world_size_one(alone, what):
    _check_bench_report(alone[f"bench-{what}"], 1, what)


def test_distributed_bench_runs_under_torchrun_on_two_processes(tmp_path):
    """``torchrun --nproc-per-node 2 -m precond.bench.distributed``: the launcher path issue 14 uses (gloo here)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
               "precond.bench.distributed", *w.BENCH_ARGS, "--profile", "--json", str(out)]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    _check_bench_report(report, 2, "step")
    for ranks in report["results"].values():  # --profile: each rank's wall time; no device kernels on gloo/CPU
        for r in ranks:
            profile = r["profile"]
            assert profile["wall_ms_per_step"] > 0 and profile["kernel_ms_per_step"] == 0 == profile["busy"]


# --- four ranks (slow: three spawns, one of 4 processes) ------------------------------------------------------
@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """W=4 saves the checkpoints of ``CHECKPOINT_CASES`` and runs the 2 × 2 mesh; W=2 and W=1 load them."""
    root = str(tmp_path_factory.mktemp("dcp4"))
    return {4: spawn(4, MODULE, "four", root), 2: spawn(2, MODULE, "dcp_resume", root),
            1: spawn(1, MODULE, "dcp_resume", root)}


@pytest.mark.slow
@pytest.mark.parametrize("case", w.CHECKPOINT_CASES, ids=w.checkpoint_name)
def test_dcp_checkpoint_saved_at_four_ranks_resumes_at_two_and_one(four, case):
    """Saved with ``dcp.save`` at W=4 (each owner its quarter) after 2T−1 steps, loaded at W=2 and W=1, 3 more
    steps crossing a refresh: bitwise the uninterrupted W=4 run and the uninterrupted single-process run."""
    name = w.checkpoint_name(case)
    for rank, result in enumerate(four[4]):
        _assert_bitwise(result["checkpoint"][name]["after"], _uninterrupted(case), f"uninterrupted rank {rank} of 4")
    for world in (2, 1):
        for rank, result in enumerate(four[world]):
            _assert_bitwise(result[name]["after"], _uninterrupted(case), f"{name} resumed at rank {rank} of {world}")
    if case[1] == "owner":  # the four ranks saved disjoint shares that make up the whole state
        keys = [set(result["checkpoint"][name]["keys"]) for result in four[4]]
        assert sum(map(len, keys)) == len(set().union(*keys)) == len(_single_process_keys(case))
        assert all(keys)


@pytest.mark.slow
@pytest.mark.parametrize("case", w.HSDP_CASES, ids=w.case_name)
def test_two_by_two_mesh_equals_one_process_bitwise(four, case):
    """A 2 × 2 device mesh (HSDP-like): each rank its own gradients, averaged across the replica groups and then
    within the owner group; owner mode over the owner group (``DataParallel(group=mesh.get_group("owner"))``).
    Every rank equals one process stepping the same average; the two owner groups split their state alike."""
    expected = w.hsdp_trajectory(case)[0]
    runs = [result["hsdp"][w.case_name(case)] for result in four[4]]
    for rank, run in enumerate(runs):
        _assert_bitwise(run["params"], expected, f"rank {rank} of the 2 × 2 mesh")
    assert runs[0]["owned"] == runs[1]["owned"] == runs[2]["owned"] == runs[3]["owned"]
    assert set(runs[0]["owned"]) == {0, 1}
    assert runs[0]["bytes"] == runs[2]["bytes"] and runs[1]["bytes"] == runs[3]["bytes"]
