"""The ablation workbench: train a grid of optimizer variants × learning rates × seeds on a task and compare.

    python -m precond.ablate --config ablations/demo.toml          # or: make demo

A variant is a named preset (``kl_shampoo``, ``soap``, …, ``adamw``) or a composition of the library's four parts
written ``estimator=kl,basis=qr,every=10,applier=power:0.5,graft=none`` (:mod:`precond.ablate.variants`). Runs
are stored one JSON line each in ``<out>/runs.jsonl`` as they finish (with the machine's load and CPU/GPU model),
so an interrupted or time-limited ablation continues where it stopped. After the grid, a timing pass runs each
variant's best lr alone (``<out>/timing.jsonl``, :mod:`precond.ablate.timing`) and times the per-second table;
``runs.csv``, ``summary.md`` and three plots are rewritten at the end. ``--tensorboard DIR`` logs every run for
TensorBoard (:mod:`precond.ablate.board`).

From Python::

    from precond.ablate import AblationConfig, run_ablation
    result = run_ablation(AblationConfig.from_mapping({"task": "teacher_conv", "variants": ["kl_shampoo", "adamw"],
                                                       "lrs": [1e-3], "steps": 100, "out": "results"}))
    print(result.table)
"""

from precond.ablate.config import AblationConfig, load_toml
from precond.ablate.runner import AblationResult, run_ablation
from precond.ablate.train import Training, train_run
from precond.ablate.variants import Variant, parse_variant, variant_from_mapping

__all__ = ["AblationConfig", "AblationResult", "Training", "Variant", "load_toml", "parse_variant", "run_ablation",
           "train_run", "variant_from_mapping"]
