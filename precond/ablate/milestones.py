"""Two tables the summary does not make, read from an ablation's ``runs.jsonl``.

- ``steps``: the validation loss at chosen steps (the early phase): per variant the mean ± standard deviation over
  seeds at each step, and its paired difference from a reference variant, seed by seed, with the 95 % Student-t
  interval of :func:`precond.ablate.stats.paired_interval`.
- ``period``: what a longer refresh period ``T`` costs each method (the seed paper's robustness claim). For a
  method run at ``T₀ < T₁ < …`` (one variant each), its loss increase ``L(T) − L(T₀)`` paired by seed; for two
  methods A and B, the difference of their increases ``[L_A(T) − L_A(T₀)] − [L_B(T) − L_B(T₀)]`` paired by seed:
  below 0 means A loses less than B as ``T`` grows.
- ``refreshes``: with ``drift_tolerance``, the due refreshes checked and made per 1000 steps, per variant and per
  parameter and mode (each such run records them, ``"refreshes"``).
- ``race``: every run's steady step time and training time to a reference's mean final loss (the race "who
  reaches AdamW's final loss first"), one row per run with the machine instance it ran on (``machine.boot``) and
  when it finished, so that times are compared within one machine: two lent GPUs of one model differ.

Command line::

    python -m precond.ablate.milestones steps --runs R/runs.jsonl --at 25,50,100,200 --reference kl_shampoo
    python -m precond.ablate.milestones period --runs R/runs.jsonl \\
        --method "KL=kl_shampoo fast@10,kl_shampoo fast T=32@32" --method "SOAP=soap fast@10,soap fast T=32@32"
    python -m precond.ablate.milestones refreshes --runs R/runs.jsonl
    python -m precond.ablate.milestones race --runs R/runs.jsonl --reference adamw

Every number comes from the records (``curve.step`` and ``curve.val``, ``final_val``); a step that a run did not
validate at is an error, not an interpolation.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from precond.ablate import wallclock
from precond.ablate.stats import paired_interval

Record = Mapping[str, Any]


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``runs.jsonl``, finished runs only (no ``error``, not diverged)."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if not r.get("error") and not r.get("diverged")]


def by_seed(records: Iterable[Record], variant: str) -> dict[int, Record]:
    """``{seed: record}`` of ``variant``; two records of one seed (two lrs) are refused: name a fixed-lr variant."""
    found: dict[int, Record] = {}
    for record in records:
        if record["variant"] != variant:
            continue
        if record["seed"] in found:
            raise ValueError(f"variant {variant!r} has several runs of seed {record['seed']} (several lrs?); these "
                             "tables take one run per seed")
        found[record["seed"]] = record
    if not found:
        raise ValueError(f"no finished run of variant {variant!r}")
    return found


def loss_at(record: Record, step: int) -> float:
    """The validation loss ``record`` measured after ``step`` updates."""
    steps, losses = record["curve"]["step"], record["curve"]["val"]
    if step not in steps:
        raise ValueError(f"run {record['variant']!r} seed {record['seed']} did not validate at step {step} "
                         f"(it validated at {steps[:6]}…)")
    return float(losses[steps.index(step)])


def _spread(values: Sequence[float]) -> str:
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {deviation:.4f}"


def _paired(mine: Mapping[int, float], theirs: Mapping[int, float]) -> str:
    seeds = sorted(set(mine) & set(theirs))
    interval = paired_interval([mine[s] - theirs[s] for s in seeds])
    return "—" if interval is None else interval.text()


def steps_table(records: Sequence[Record], at: Sequence[int], reference: str) -> str:
    """Markdown: the validation loss of every variant at each step of ``at`` and its paired Δ vs ``reference``."""
    variants = list(dict.fromkeys(r["variant"] for r in records))
    base = {s: {step: loss_at(r, step) for step in at} for s, r in by_seed(records, reference).items()}
    lines = ["| variant | " + " | ".join(f"step {step}" for step in at) + " |",
             "|---|" + "---|" * len(at)]
    for variant in variants:
        runs = by_seed(records, variant)
        cells = []
        for step in at:
            losses = {seed: loss_at(record, step) for seed, record in runs.items()}
            cell = _spread(list(losses.values()))
            if variant != reference:
                cell += f"<br>Δ {_paired(losses, {s: v[step] for s, v in base.items()})}"
            cells.append(cell)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_method(text: str) -> tuple[str, list[tuple[str, int]]]:
    """``"KL=kl_shampoo fast@10,kl_shampoo fast T=32@32"`` → ``("KL", [("kl_shampoo fast", 10), …])``."""
    name, equals, items = text.partition("=")
    if not equals or not items.strip():
        raise ValueError(f"--method {text!r}: expected NAME=VARIANT@T,VARIANT@T,...")
    pairs = []
    for item in items.split(","):
        variant, at, period = item.rpartition("@")
        if not at or not period.strip().isdigit():
            raise ValueError(f"--method {text!r}: item {item!r} is not VARIANT@T (T a positive integer)")
        pairs.append((variant.strip(), int(period)))
    return name.strip(), sorted(pairs, key=lambda pair: pair[1])


def period_table(records: Sequence[Record], methods: Sequence[tuple[str, list[tuple[str, int]]]]) -> str:
    """Markdown: each method's final loss at each ``T``, its paired increase over its smallest ``T``, and (two
    methods of the same periods) the paired difference of the two increases."""
    finals = {name: {period: {s: float(r["final_val"]) for s, r in by_seed(records, variant).items()}
                     for variant, period in pairs} for name, pairs in methods}
    lines = ["| method | T | final val loss | increase over its smallest T (95% CI) |", "|---|---|---|---|"]
    for name, per_period in finals.items():
        first = min(per_period)
        for period, losses in sorted(per_period.items()):
            increase = "reference" if period == first else _paired(losses, per_period[first])
            lines.append(f"| {name} | {period} | {_spread(list(losses.values()))} | {increase} |")
    if len(finals) == 2:
        (a, of_a), (b, of_b) = finals.items()
        shared = sorted(set(of_a) & set(of_b))
        if len(shared) > 1:
            lines += ["", f"| T | [{a}(T) − {a}({shared[0]})] − [{b}(T) − {b}({shared[0]})] (95% CI; below 0: {a} "
                          f"loses less) |", "|---|---|"]
            for period in shared[1:]:
                seeds = sorted(set(of_a[period]) & set(of_a[shared[0]]) & set(of_b[period]) & set(of_b[shared[0]]))
                gap = {s: (of_a[period][s] - of_a[shared[0]][s]) - (of_b[period][s] - of_b[shared[0]][s])
                       for s in seeds}
                lines.append(f"| {period} | {_paired(gap, dict.fromkeys(seeds, 0.0))} |")
    return "\n".join(lines)


def refresh_table(records: Sequence[Record]) -> str:
    """Markdown: for each variant whose runs recorded their refreshes (``drift_tolerance``), the due refreshes
    checked and made per 1000 steps (mean over seeds), the fraction made and the drifted ones a ``refresh_budget``
    passed over; then per parameter, the refreshes made
    per 1000 steps of each mode."""
    counted = [r for r in records if r.get("refreshes")]
    if not counted:
        raise ValueError("no finished run recorded its refreshes (only runs with drift_tolerance do)")
    variants = list(dict.fromkeys(r["variant"] for r in counted))
    lines = ["| variant | seeds | checks / 1000 steps | refreshes / 1000 steps | fraction made | deferred by the "
             "budget / 1000 steps |", "|---|---|---|---|---|---|"]
    per_parameter: dict[str, dict[str, dict[str, list[float]]]] = {}
    for variant in variants:
        runs = list(by_seed(counted, variant).values())
        checks, made, deferred = [], [], []
        for run in runs:
            scale = 1000.0 / run["steps_done"]
            counts = [c for modes in run["refreshes"].values() for c in modes.values()]
            checks.append(scale * sum(c["checks"] for c in counts))
            made.append(scale * sum(c["refreshes"] for c in counts))
            deferred.append(scale * sum(c.get("deferred", 0) for c in counts))  # older records: no budget
            for name, modes in run["refreshes"].items():
                for mode, c in modes.items():
                    per_parameter.setdefault(variant, {}).setdefault(name, {}).setdefault(mode, []).append(
                        scale * c["refreshes"])
        fraction = sum(made) / sum(checks) if sum(checks) else float("nan")
        lines.append(f"| {variant} | {len(runs)} | {statistics.mean(checks):.0f} | {statistics.mean(made):.0f} | "
                     f"{fraction:.2f} | {statistics.mean(deferred):.0f} |")
    for variant, names in per_parameter.items():
        lines += ["", f"{variant}: refreshes made per 1000 steps, by parameter and mode (mean over seeds)", "",
                  "| parameter | " + " | ".join(f"mode {m}" for m in _modes(names)) + " |",
                  "|---|" + "---|" * len(_modes(names))]
        for name, modes in names.items():
            cells = [f"{statistics.mean(modes[m]):.0f}" if m in modes else "—" for m in _modes(names)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def race_table(records: Sequence[Record], reference: str) -> str:
    """Markdown: per run (variants in the order of the records, then by seed) its machine instance, finish time,
    final loss, steady ms per step and training time (:func:`precond.ablate.wallclock.time_to`) to the mean final
    loss of ``reference``'s runs."""
    target = statistics.mean(float(r["final_val"]) for r in by_seed(records, reference).values())
    order = list(dict.fromkeys(r["variant"] for r in records))
    lines = [f"Target: {target:.4f}, the mean final loss of {reference!r} over its seeds.", "",
             "| variant | seed | machine instance | finished (UTC) | final val loss | ms / step | time to target (s) |",
             "|---|---|---|---|---|---|---|"]
    for variant in order:
        for seed, record in sorted(by_seed(records, variant).items()):
            boot = (record.get("machine") or {}).get("boot") or "—"
            ms = wallclock.ms_per_step(record)
            reached = wallclock.time_to(record, target)
            lines.append(f"| {variant} | {seed} | {boot} | {str(record.get('finished', '—'))[:16]} | "
                         f"{float(record['final_val']):.4f} | {'—' if ms is None else f'{ms:.1f}'} | "
                         f"{'not reached' if reached is None else f'{reached:.1f}'} |")
    return "\n".join(lines + [""] + _same_machine_ratios(records, reference, target, order))


def _same_machine_ratios(records: Sequence[Record], reference: str, target: float, order: Sequence[str]) -> list[str]:
    """Per machine instance that ran ``reference``: each variant's mean time to ``target`` there over the
    reference's (its time to the target, or its whole run where it did not reach its own mean), and how many of the
    variant's runs reached it. Only records that name their instance (``machine.boot``) take part."""
    by_instance: dict[str, dict[str, list[Record]]] = {}
    for record in records:
        boot = (record.get("machine") or {}).get("boot")
        if boot:
            by_instance.setdefault(boot, {}).setdefault(record["variant"], []).append(record)
    if not by_instance:
        return ["No record names its machine instance (`machine.boot`, kept since the race of issue 23): times of "
                "different device calls may come from different machines; compare within one call."]
    lines = ["Within each machine instance, against the reference's time there (its time to the target, or its "
             "whole run where it did not reach it):", "",
             "| machine instance | variant | runs reaching the target | mean time to target (s) | × reference |",
             "|---|---|---|---|---|"]
    for boot, runs in sorted(by_instance.items()):
        if reference not in runs:
            continue
        own = [wallclock.total_seconds(r) if (t := wallclock.time_to(r, target)) is None else t
               for r in runs[reference]]
        baseline = statistics.mean(own)
        for variant in order:
            if variant not in runs:
                continue
            times = [t for r in runs[variant] if (t := wallclock.time_to(r, target)) is not None]
            mean = statistics.mean(times) if times else None
            lines.append(f"| {boot} | {variant} | {len(times)} of {len(runs[variant])} | "
                         f"{'—' if mean is None else f'{mean:.1f}'} | "
                         f"{'—' if mean is None else f'{mean / baseline:.2f}'} |")
    return lines


def _modes(names: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return sorted({mode for modes in names.values() for mode in modes}, key=int)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m precond.ablate.milestones", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    steps = commands.add_parser("steps", help="the validation loss at chosen steps, paired against a reference")
    steps.add_argument("--runs", required=True)
    steps.add_argument("--at", required=True, help="comma-separated steps, e.g. 25,50,100,200")
    steps.add_argument("--reference", required=True, help="the variant the differences are taken against")
    period = commands.add_parser("period", help="what a longer refresh period costs each method")
    period.add_argument("--runs", required=True)
    period.add_argument("--method", action="append", required=True, help="NAME=VARIANT@T,VARIANT@T,...")
    refreshes = commands.add_parser("refreshes", help="the refreshes that drift_tolerance made, per variant and "
                                                      "per parameter")
    refreshes.add_argument("--runs", required=True)
    race = commands.add_parser("race", help="every run's step time and time to a reference's mean final loss")
    race.add_argument("--runs", required=True)
    race.add_argument("--reference", required=True, help="the variant whose mean final loss is the target")
    args = parser.parse_args(argv)
    records = read_runs(args.runs)
    if args.command == "steps":
        print(steps_table(records, [int(s) for s in args.at.split(",")], args.reference))
    elif args.command == "refreshes":
        print(refresh_table(records))
    elif args.command == "race":
        print(race_table(records, args.reference))
    else:
        print(period_table(records, [parse_method(text) for text in args.method]))


if __name__ == "__main__":
    main()
