# The paired tables of docs/results.md's GPT-2 small section: the best-lr runs (chosen on seed 0, summary.md) of
# runs.jsonl, then precond.ablate.milestones' paired differences against muon and kl_shampoo at steps 192, 320, 640.
# Run from the repository root: bash docs/results/gpt2_small/pairs.sh > docs/results/gpt2_small/pairs.log
set -e
best=$(mktemp)
python - "$best" <<'PY'
import json, sys
best_lr = {"adamw": 5e-4, "muon": 2e-2, "soap": 4e-3, "kl_shampoo": 4e-3, "kl_shampoo fast budget": 4e-3,
           "shampoo": 1e-3, "hb_kl_shampoo": 4e-3,
           # the A/Bs of the session of 2026-12-08, at kl_shampoo's lr
           "kl_shampoo fast budget, Adam ends at 5e-4": 4e-3, "kl_shampoo fast budget, KL ends": 4e-3,
           "kl_shampoo fast budget 10, Adam ends at 5e-4": 4e-3, "kl_shampoo, float64 refresh": 4e-3}
with open("docs/results/gpt2_small/runs.jsonl") as runs, open(sys.argv[1], "w") as out:
    for line in runs:
        record = json.loads(line)
        if abs(record["lr"] - best_lr[record["variant"]]) < 1e-12:
            out.write(line)
PY
for reference in muon kl_shampoo soap; do
    python -m precond.ablate.milestones steps --runs "$best" --at 192,320,640 --reference "$reference"
    echo
done
rm -f "$best"
