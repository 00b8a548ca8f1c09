import sys
import estimators.kl as kl
kl.spectrum_floor = lambda spec, layout, k: 1e-30   # probe only: no floor on λ (before floor="product" existed)
from precond.ablate.cli import main
sys.exit(main(sys.argv[1:]))
