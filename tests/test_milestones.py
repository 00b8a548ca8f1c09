"""``precond.ablate.milestones``: the loss at chosen steps and the cost of a longer refresh period, on records
whose numbers are chosen so that every cell has a closed form (2 seeds: the 95 % interval is mean ± t·s/√2 with
t = 12.7062, the 0.975 quantile of Student's t with 1 degree of freedom)."""

from __future__ import annotations

import json
import math

import pytest

from precond.ablate import milestones

T_975_1 = 12.706204736174707  # scipy.stats.t.ppf(0.975, 1)


def _record(variant: str, seed: int, losses: list[float], final: float | None = None) -> dict:
    steps = [0, 25, 50]
    return {"variant": variant, "seed": seed, "curve": {"step": steps, "val": losses},
            "final_val": losses[-1] if final is None else final, "error": None, "diverged": False}


def _interval(differences: list[float]) -> tuple[float, float, float]:
    mean = sum(differences) / 2
    half = T_975_1 * abs(differences[0] - differences[1]) / math.sqrt(2) / math.sqrt(2)  # stdev of 2 = |a−b|/√2
    return mean, mean - half, mean + half


def test_steps_table_gives_means_and_paired_differences() -> None:
    pytest.importorskip("scipy")
    records = [_record("ref", 0, [5.0, 3.0, 2.0]), _record("ref", 1, [5.0, 3.2, 2.2]),
               _record("other", 0, [5.0, 3.5, 2.1]), _record("other", 1, [5.0, 3.6, 2.4])]
    table = milestones.steps_table(records, [25, 50], reference="ref")
    assert "| ref | 3.1000 ± 0.1414 | 2.1000 ± 0.1414 |" in table
    mean, low, high = _interval([0.5, 0.4])
    assert f"Δ {mean:+.4f} [{low:+.4f}, {high:+.4f}]" in table


def test_a_step_without_validation_is_an_error() -> None:
    with pytest.raises(ValueError, match="did not validate at step 30"):
        milestones.loss_at(_record("a", 0, [1.0, 0.9, 0.8]), 30)


def test_two_runs_of_one_seed_are_refused() -> None:
    with pytest.raises(ValueError, match="several runs of seed 0"):
        milestones.by_seed([_record("a", 0, [1.0, 0.9, 0.8]), _record("a", 0, [1.0, 0.9, 0.7])], "a")


def test_period_table_pairs_each_increase_and_their_difference() -> None:
    pytest.importorskip("scipy")
    finals = {("A", 10): (1.00, 1.02), ("A", 100): (1.03, 1.04), ("B", 10): (1.01, 1.00), ("B", 100): (1.10, 1.06)}
    records = [_record(f"{m}@{t}", seed, [2.0, 1.5, value]) for (m, t), values in finals.items()
               for seed, value in enumerate(values)]
    methods = [milestones.parse_method("A=A@10@10,A@100@100"), milestones.parse_method("B=B@10@10,B@100@100")]
    table = milestones.period_table(records, methods)
    increase_a = [1.03 - 1.00, 1.04 - 1.02]
    mean, low, high = _interval(increase_a)
    assert f"| A | 100 | 1.0350 ± 0.0071 | {mean:+.4f} [{low:+.4f}, {high:+.4f}]" in table
    gap = [increase_a[0] - (1.10 - 1.01), increase_a[1] - (1.06 - 1.00)]
    mean, low, high = _interval(gap)
    assert f"| 100 | {mean:+.4f} [{low:+.4f}, {high:+.4f}]" in table


def test_method_text_is_checked() -> None:
    assert milestones.parse_method("K=x T=32@32, x@10") == ("K", [("x", 10), ("x T=32", 32)])
    for bad in ("K", "K=x", "K=x@ten"):
        with pytest.raises(ValueError, match="--method"):
            milestones.parse_method(bad)


def test_read_runs_keeps_finished_runs(tmp_path) -> None:
    path = tmp_path / "runs.jsonl"
    good = _record("a", 0, [1.0, 0.9, 0.8])
    path.write_text("\n".join(json.dumps(r) for r in (good, {**good, "seed": 1, "diverged": True},
                                                         {**good, "seed": 2, "error": "boom"})) + "\n")
    assert [r["seed"] for r in milestones.read_runs(path)] == [0]


def test_refresh_table_counts_per_1000_steps_and_per_parameter() -> None:
    """Two seeds of 500 steps: (10 + 20) and (14 + 16) checks, (4 + 6) and (8 + 2) refreshes made; the first seed
    recorded 3 refreshes the budget deferred, the second is an older record without the count."""
    def run(seed: int, w_checks: int, w_made: int, b_checks: int, b_made: int) -> dict:
        record = _record("drift", seed, [5.0, 3.0, 2.0])
        record["steps_done"] = 500
        record["refreshes"] = {"w": {"0": {"checks": w_checks, "refreshes": w_made},
                                     "1": {"checks": b_checks, "refreshes": b_made}}}
        if seed == 0:
            record["refreshes"]["w"]["0"]["deferred"] = 3
        return record

    records = [run(0, 10, 4, 20, 6), run(1, 14, 8, 16, 2), _record("fixed", 0, [5.0, 3.0, 2.0])]
    table = milestones.refresh_table(records)
    # checks per 1000 steps: 60 and 60; made: 20 and 20; fraction 40 / 120; deferred: 6 and 0
    assert "| drift | 2 | 60 | 20 | 0.33 | 3 |" in table
    assert "| w | 12 | 8 |" in table  # mode 0: 8 and 16 per 1000 steps; mode 1: 12 and 4
    assert "fixed" not in table
    with pytest.raises(ValueError, match="recorded its refreshes"):
        milestones.refresh_table([_record("fixed", 0, [5.0, 3.0, 2.0])])


def _timed(variant: str, seed: int, losses: list[float], ms: float, boot: str | None = None) -> dict:
    """A run of 100 steps at a constant ``ms`` per step, validated at steps 0, 50 and 100."""
    record = _record(variant, seed, losses)
    record["curve"]["step"] = [0, 50, 100]
    record["step_ms"] = [ms] * 100
    record["machine"] = {"boot": boot} if boot else {}
    record["finished"] = f"2026-12-07T01:0{seed}:00"
    return record


def test_race_table_times_every_run_to_the_references_mean_final_loss() -> None:
    """Target = mean of the reference's finals (2.0 and 2.2 → 2.1). At a constant step time the time to a loss is
    (first validated step at or below it) × ms: the reference's seed 0 reaches 2.1 at step 100 (100 × 10 ms = 1 s),
    its seed 1 never does; the fast variant reaches it at step 50 (50 × 30 ms = 1.5 s)."""
    records = [_timed("adamw", 0, [5.0, 3.0, 2.0], 10.0, boot="aaaa0001"),
               _timed("adamw", 1, [5.0, 3.0, 2.2], 10.0, boot="bbbb0002"),
               _timed("kl", 0, [5.0, 2.1, 1.9], 30.0, boot="aaaa0001"),
               _timed("kl", 1, [5.0, 2.5, 2.3], 40.0)]
    table = milestones.race_table(records, reference="adamw")
    assert table.startswith("Target: 2.1000, the mean final loss of 'adamw' over its seeds.")
    assert "| adamw | 0 | aaaa0001 | 2026-12-07T01:00 | 2.0000 | 10.0 | 1.0 |" in table
    assert "| adamw | 1 | bbbb0002 | 2026-12-07T01:01 | 2.2000 | 10.0 | not reached |" in table
    assert "| kl | 0 | aaaa0001 | 2026-12-07T01:00 | 1.9000 | 30.0 | 1.5 |" in table
    assert "| kl | 1 | — | 2026-12-07T01:01 | 2.3000 | 40.0 | not reached |" in table
    assert table.index("| adamw | 0") < table.index("| adamw | 1") < table.index("| kl | 0")
    # within instance aaaa0001 the reference took 1.0 s, kl 1.5 s; on bbbb0002 the reference did not reach its
    # own mean, so its whole run (100 × 10 ms) is its time, and kl has no run there
    assert "| aaaa0001 | adamw | 1 of 1 | 1.0 | 1.00 |" in table
    assert "| aaaa0001 | kl | 1 of 1 | 1.5 | 1.50 |" in table
    assert "| bbbb0002 | adamw | 0 of 1 | — | — |" in table
    assert "| bbbb0002 | kl |" not in table


def test_race_table_cli_prints_it(tmp_path, capsys) -> None:
    runs = tmp_path / "runs.jsonl"
    records = [_timed("adamw", 0, [5.0, 3.0, 2.0], 10.0), _timed("kl", 0, [5.0, 1.5, 1.0], 20.0)]
    runs.write_text("".join(json.dumps(r) + "\n" for r in records))
    milestones.main(["race", "--runs", str(runs), "--reference", "adamw"])
    out = capsys.readouterr().out
    assert "| kl | 0 | — | 2026-12-07T01:00 | 1.0000 | 20.0 | 1.0 |" in out
    assert "No record names its machine instance" in out
