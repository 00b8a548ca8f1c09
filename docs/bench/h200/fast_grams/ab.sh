# The A/B of docs/benchmarks.md's TF32 Gram matrices: old code in .bench_old (git archive of the commit before),
# new code in the working tree, side by side on four GPUs, then swapped. Output: train_and_step_ab.log.
export PYTHONPATH=/tmp/site
ROOT=$PWD
T="--train --max-dim 4096 --every 10 --optimizers adamw,kl_shampoo_fast"
S="--max-dim 4096 --every 10 --optimizers kl_shampoo_fast_sync"
run() { (cd $1 && CUDA_VISIBLE_DEVICES=$2 PYTHONPATH=$PWD timeout 150 python -m precond.bench $3 --json $OUT/$4.json > $OUT/$4.log 2>&1); }
run .bench_old 0 "$T" train_old_a & run . 1 "$T" train_new_a & run .bench_old 2 "$S" step_old_a & run . 3 "$S" step_new_a & wait
run . 0 "$T" train_new_b & run .bench_old 1 "$T" train_old_b & run . 2 "$S" step_new_b & run .bench_old 3 "$S" step_old_b & wait
CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$PWD timeout 60 python -m pytest -m gpu -q -p no:cacheprovider tests/test_fast_paths.py 2>&1 | tail -2
for f in train_old_a train_new_a train_old_b train_new_b step_old_a step_new_a step_old_b step_new_b; do echo $f; grep "^| kl\|^| adamw" $OUT/$f.log; done
