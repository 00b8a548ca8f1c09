# issue 23, lever 1: bases.CholeskyQR(precision="float64") (basis=cholesky_qr64) in place of the QR power step under
# the race's refresh rules, on the task of docs/results/refine_cpu (same command, same 2 seeds); a check that the
# float64 refresh keeps the loss (it gives Householder QR's basis), not a timing (CPU)
python -m precond.ablate --task char_lm -o layers=2 -o width=128 -o heads=4 -o context=64 -o batch_size=16 \
  --steps 800 --eval-every 100 --schedule linear --warmup 0.05 --weight-decay 0.1 --lrs 4e-3 --seeds 0,1 \
  --extend-lrs 0 --timing-steps 0 --workers 2 --threads 1 --device cpu --out docs/results/cholesky64_cpu --no-progress \
  --variant "kl_shampoo,stagger=true,drift_tolerance=0.2,track_drift=true,name=qr drift 0.2" \
  --variant "basis=cholesky_qr64,stagger=true,drift_tolerance=0.2,track_drift=true,name=cholesky_qr64 drift 0.2" \
  --variant "kl_shampoo,stagger=true,drift_tolerance=0.2,track_drift=true,refresh_budget=50,fold_every=2,beta2=0.9025,name=qr budget 50 fold 2" \
  --variant "basis=cholesky_qr64,stagger=true,drift_tolerance=0.2,track_drift=true,refresh_budget=50,fold_every=2,beta2=0.9025,name=cholesky_qr64 budget 50 fold 2"
