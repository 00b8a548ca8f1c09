"""``python -m precond.ablate``: the command line of the ablation workbench."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

import attrs

from precond.ablate import board, bracket, keys
from precond.ablate.attempt import run_key
from precond.ablate.config import ALLOWED_KEYS, AblationConfig, load_toml, resolve_device
from precond.ablate.runner import RUNS_FILE, run_ablation
from precond.ablate.schedule import SCHEDULES
from precond.ablate.store import RunStore
from precond.tasks import TASKS, task_options

EPILOG = f"""\
variants: a name ({', '.join(keys.NAMED)}) or a composition of key=value items, e.g.
  --variant kl_shampoo --variant "shampoo,graft=none,name=shampoo (no graft)"
  --variant estimator=shampoo,basis=eigh,every=10,applier=power:1/(2N),graft=adam,lr=1e-3/3e-3
keys: {', '.join(keys.READERS)}, name, lr, lr_from, adam_lr_from, bracket, why, expect
  (see precond/ablate/variants.py or --list)
peers (skipped with a note when their library is missing): adamw, hb_kl_shampoo, hb_soap, po_soap, torch_muon

examples:
  python -m precond.ablate --config ablations/demo.toml
  python -m precond.ablate --config ablations/fair_cpu.toml                    # tuned, 3 seeds, peers, per second
  python -u -m precond.ablate --config ablations/gpu_long.toml --workers 8     # the long GPU run on 8 GPUs
  python -u -m precond.ablate --config ablations/gpu.toml --max-minutes 9      # resumable: rerun to continue
  python -u -m precond.ablate --config ablations/gpu.toml --workers 8          # 8 runs at once, one per GPU
  python -u -m precond.ablate --config ablations/race.toml --only adamw --only "kl_shampoo fast drift 0.2"
  python -m precond.ablate --task teacher_conv --variant kl_shampoo --variant adamw --lrs 1e-3,3e-3 --steps 200
  python -m precond.ablate --config ablations/demo.toml --tensorboard tb   # then: tensorboard --logdir tb
"""


def _csv(kind: type) -> Any:
    def read(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return read


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m precond.ablate", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Train a grid of optimizer variants × learning rates × seeds on a task; resumable; writes "
                    "runs.csv, summary.md and plots into the output directory.")
    p.add_argument("--config", help="TOML file with the settings (command-line options override it)")
    p.add_argument("--variant", action="append", metavar="SPEC", help="a variant (repeat; replaces the config's)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only the config's variant of this name (repeat); its runs keep their keys")
    p.add_argument("--task", choices=sorted(TASKS), help="the training task (default char_lm)")
    p.add_argument("-o", "--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, e.g. -o layers=4 -o width=128 (see --list)")
    p.add_argument("--data", metavar="FILE", help="char_lm: train on this text file instead of the standard library")
    p.add_argument("--lrs", type=_csv(float), metavar="LR,LR", help="learning rates for every variant")
    p.add_argument("--seeds", type=_csv(int), metavar="S,S", help="seeds, e.g. 0,1")
    p.add_argument("--tuning-seeds", type=_csv(int), metavar="S,S",
                   help="tune the learning rates on these seeds only (some of --seeds); the other seeds then run at "
                        "each variant's best lr only (default: every seed runs every lr)")
    p.add_argument("--steps", type=int)
    p.add_argument("--eval-every", type=int, metavar="N")
    p.add_argument("--eval-batches", type=int, metavar="N")
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--warmup", type=float, metavar="FRACTION")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--clip", type=float, metavar="NORM")
    p.add_argument("--target-loss", metavar="LOSS|auto|reference",
                   help="validation loss for 'steps/time to target' (default auto: the weakest variant's best final "
                        "loss; reference: the best baseline's final loss, e.g. who reaches AdamW's loss first)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", metavar="DIR", help="output directory (default results)")
    p.add_argument("--max-minutes", type=float, metavar="M",
                   help="wall-clock budget; unfinished runs are left for next time")
    p.add_argument("--workers", type=int, metavar="N",
                   help="train N runs at once, each in its own process (default 1); with --device cuda and several "
                        "GPUs, worker i uses GPU i mod their number")
    p.add_argument("--extend-lrs", type=int, metavar="N",
                   help="learning rates the workbench may add to a variant's grid to bracket its best lr (default 2; "
                        "0: keep every grid, an edge is reported as not bracketed)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads per run (default 1 on the CPU, which is fastest for these small models and "
                        "immune to a busy machine; torch's own default on a GPU); part of a CPU run's resume key")
    p.add_argument("--timing-steps", type=int, metavar="N",
                   help="steps of the timing pass after the grid: each variant's best lr runs alone, one at a time, "
                        "and times the per-second table (default 200; 0: time it from the grid's runs)")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="log each run's losses, lr and optimizer.stats() to DIR for TensorBoard (needs "
                        "pip install tensorboard)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether each is finished, train nothing")
    p.add_argument("--report-only", action="store_true",
                   help="write the reports of the finished runs, train nothing (runs made on a GPU elsewhere: "
                        "add --device cuda)")
    p.add_argument("--list", action="store_true", help="list named variants, composition keys and task options")
    return p


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The configuration mapping: the TOML file, then every option given on the command line."""
    data: dict[str, Any] = load_toml(args.config) if args.config else {}
    same_task = args.task is None or args.task == data.get("task", "char_lm")
    options = dict(data.get("task_options") or {}) if same_task else {}  # the config's options are its task's
    for item in args.task_option:
        key, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"--task-option expects KEY=VALUE, got {item!r}")
        options[key.strip()] = value.strip()
    if args.data:
        options["data"] = args.data
    data["task_options"] = options
    direct = {"variants": args.variant, "task": args.task, "lrs": args.lrs, "seeds": args.seeds,
              "tuning_seeds": args.tuning_seeds, "steps": args.steps,
              "eval_every": args.eval_every, "eval_batches": args.eval_batches, "schedule": args.schedule,
              "warmup": args.warmup, "weight_decay": args.weight_decay, "clip": args.clip,
              "target_loss": args.target_loss, "device": args.device, "out": args.out, "max_minutes": args.max_minutes,
              "workers": args.workers, "threads": args.threads, "extend_lrs": args.extend_lrs,
              "timing_steps": args.timing_steps, "tensorboard": args.tensorboard}
    data.update({key: value for key, value in direct.items() if value is not None})
    if args.no_progress:
        data["progress"] = False
    return data


def describe_choices() -> str:
    lines = ["named variants: " + ", ".join(keys.NAMED), "composition keys:"]
    lines += [f"  {key}: {keys.describe(key)}" for key in keys.READERS]
    lines.append("  name, lr (label and learning rates, e.g. lr=1e-3/3e-3), lr_from (run at another variant's "
                 "best lr), adam_lr_from (adam_lr = another variant's best lr: a Muon's, or embeddings=adam's), "
                 "bracket (true/false: extend the grid until the best lr is inside), why (alias reason: why the "
                 "variant is there, printed in the summary), expect (diverge: shown to fail, its grid is not "
                 "extended)")
    for name in sorted(TASKS):
        lines.append(f"task {name} options: " + ", ".join(f"{k}={v!r}" for k, v in task_options(name).items()))
    lines.append("configuration keys: " + ", ".join(ALLOWED_KEYS))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    args = parser().parse_args(argv)
    if args.list:
        print(describe_choices())
        return 0
    try:
        config = AblationConfig.from_mapping(settings_from_args(args))
        if args.only:
            config = config.only(args.only)
        if args.lrs:  # a grid on the command line is for every variant
            config = attrs.evolve(config, variants=tuple(attrs.evolve(v, lrs=None) for v in config.variants))
        if config.tensorboard is not None and not args.dry_run:
            board.writer_class()  # a missing tensorboard is said now, not after the first run
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        device = resolve_device(config.device, usable=False)
        store = RunStore(config.out / RUNS_FILE)
        plan = bracket.plan(config, lambda v, lr, seed: store.get(run_key(config, v, lr, seed, device)))
        for variant, lr, seed in plan.grid():
            done = "done" if run_key(config, variant, lr, seed, device) in store else "todo"
            print(f"{done}  {variant.name:32s} lr={lr:<8g} seed={seed}  {variant.spec()}")
        for variant, reason in config.skipped():
            print(f"skip  {variant.name:32s} {reason}")
        for tuning in plan.tunings.values():
            print(f"tuning  {tuning.name}: {tuning.message}")
        return 0
    result = run_ablation(config, train=not args.report_only)
    print()
    print(result.table)
    print()
    print("files: " + ", ".join(str(path) for path in result.files.values()))
    return 0
