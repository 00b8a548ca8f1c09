#!/usr/bin/env bash
# The paired table over seeds 0-3 (issue 26, part 4, CPU): the best-lr runs of seeds 0 and 1 from
# docs/results/compositions_cpu (lrs chosen on seed 0) and the runs of seeds 2 and 3 made here at the same lrs,
# then the loss at steps 200, 400 and 800 against each baseline. Run from the repository root.
set -euo pipefail
here=docs/results/compositions_cpu/seeds23
python - "$here" <<'PY'
import json, sys
here = sys.argv[1]
best = {"muon": 0.02, "kl_shampoo": 0.008, "KL, polar, Adam ends": 0.016}
pick = lambda path: [r for r in map(json.loads, open(path)) if r["variant"] in best
                     and abs(r["lr"] - best[r["variant"]]) < 1e-12 and "timing_steps" not in r]
runs = [r for r in pick("docs/results/compositions_cpu/runs.jsonl") if r["seed"] in (0, 1)]
runs += pick(f"{here}/runs.jsonl")
with open(f"{here}/paired_seeds0123.jsonl", "w") as out:
    out.writelines(json.dumps(r) + "\n" for r in runs)
PY
for reference in muon kl_shampoo; do
  python -m precond.ablate.milestones steps --runs "$here/paired_seeds0123.jsonl" --at 200,400,800 --reference "$reference"
done
