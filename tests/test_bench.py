"""The benchmark runs end to end on the CPU (tiny sizes) and writes its JSON; no timing is asserted."""

import json

from precond.bench.__main__ import main


def test_step_benchmark_writes_results(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--shapes", "small", "--optimizers", "adamw,kl_shampoo,kl_shampoo_fast,soap",
                 "--every", "2", "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"adamw", "kl_shampoo", "kl_shampoo_fast", "soap"}
    assert all(r["finite"] and r["median_ms"] > 0 for r in data["results"].values())


def test_training_benchmark_writes_results(tmp_path):
    out = tmp_path / "train.json"
    assert main(["--device", "cpu", "--train", "--optimizers", "adamw,kl_shampoo_fast", "--every", "2",
                 "--steps", "2", "--warmup", "1", "--batch", "2", "--length", "32", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert all(r.get("finite") and r["tokens_per_s"] > 0 for r in data["results"].values()), data["results"]
