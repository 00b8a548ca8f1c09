"""Paired differences (bf16 rotations − float32) of the final validation loss, seed by seed, for each optimizer of
``ablations/bf16_rotations.toml``, with the workbench's 95% Student-t interval.

    python docs/results/bf16_rotations/pairs.py [results/bf16_rotations/runs.jsonl]
"""

from __future__ import annotations

import json
import pathlib
import sys

from precond.ablate.stats import paired_interval

path = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).with_name("runs.jsonl"))
final = {}
for line in path.read_text().splitlines():
    run = json.loads(line)
    final[run["variant"], run["seed"]] = run["final_val"]
for base in ("kl_shampoo", "soap"):
    seeds = sorted(seed for name, seed in final if name == base and (f"{base} bf16 rotations", seed) in final)
    differences = [final[f"{base} bf16 rotations", seed] - final[base, seed] for seed in seeds]
    print(f"{base}: per seed {', '.join(f'{d:+.4f}' for d in differences)}; "
          f"mean {paired_interval(differences).text()}")
