# issue 23, lever 1 on the CPU: bases.Refine's sweeps per refresh (1, 2, 3) under the race's budgeted rule, against the
# QR power step; the task and settings of docs/results/refine_cpu (2 x 128 char GPT, 800 steps, lr 4e-3, 2 seeds)
OMP_NUM_THREADS=1 python -m precond.ablate --task char_lm -o layers=2 -o width=128 -o heads=4 -o context=64 \
  -o batch_size=16 --steps 800 --eval-every 100 --schedule linear --warmup 0.05 --weight-decay 0.1 --lrs 4e-3 \
  --seeds 0,1 --extend-lrs 0 --timing-steps 0 --workers 2 --threads 1 --device cpu \
  --out docs/results/refine_sweeps_cpu --no-progress \
  --variant "kl_shampoo,stagger=true,drift_tolerance=0.2,track_drift=true,refresh_budget=50,fold_every=2,beta2=0.9025,name=qr budget 50 fold 2" \
  --variant "basis=refine,stagger=true,drift_tolerance=0.2,track_drift=true,refresh_budget=50,fold_every=2,beta2=0.9025,name=refine budget 50 fold 2" \
  --variant "basis=refine,sweeps=1,stagger=true,drift_tolerance=0.2,track_drift=true,refresh_budget=50,fold_every=2,beta2=0.9025,name=refine 1 sweep budget 50 fold 2" \
  --variant "basis=refine,sweeps=3,stagger=true,drift_tolerance=0.2,track_drift=true,refresh_budget=50,fold_every=2,beta2=0.9025,name=refine 3 sweeps budget 50 fold 2"
