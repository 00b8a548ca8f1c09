"""The benchmark runs end to end on the CPU (tiny sizes) and writes its JSON; no timing is asserted."""

import json

import pytest
import torch

import bases
import precond
from precond.bench.__main__ import main


def test_step_benchmark_writes_results(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--shapes", "small", "--optimizers", "adamw,kl_shampoo,kl_shampoo_fast,soap",
                 "--every", "2", "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"adamw", "kl_shampoo", "kl_shampoo_fast", "soap"}
    assert all(r["finite"] and r["median_ms"] > 0 for r in data["results"].values())


def test_the_races_refresh_rules_run_in_the_step_benchmark(tmp_path):
    """``kl_shampoo_{qr,refine}_{drift,budget}_fast``: the race's two rules (the captured lines are CUDA paths); the
    budget's optimizer really is the budgeted, tracked, every-other-fold one, with the basis its name gives."""
    from precond.bench.contenders import factory
    out = tmp_path / "bench.json"
    names = ["kl_shampoo_qr_drift_fast", "kl_shampoo_qr_budget_fast", "kl_shampoo_refine_budget_fast"]
    assert main(["--device", "cpu", "--shapes", "small", "--optimizers", ",".join(names), "--every", "2",
                 "--steps", "2", "--warmup", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == set(names) and all(r["finite"] for r in data["results"].values())
    weight = torch.nn.Parameter(torch.randn(6, 4))
    budget = factory("kl_shampoo_qr_budget_fast", every=2, max_dim=8)([weight])
    group = budget.param_groups[0]
    preconditioner = group["preconditioner"]
    assert preconditioner.fold_every == 2 and preconditioner.estimator.track_drift
    assert preconditioner.estimator.beta == pytest.approx(0.95 ** 2) and group["rotation_dtype"] == torch.bfloat16
    for _ in range(5):
        weight.grad = torch.randn(6, 4)
        budget.step()
    assert budget.stats()["drift_checks"] > 0
    assert isinstance(preconditioner.basis, bases.QRPowerStep)
    refine = factory("kl_shampoo_refine_budget_fast", every=2, max_dim=8)([weight]).param_groups[0]["preconditioner"]
    assert isinstance(refine.basis, bases.Refine) and refine.fold_every == 2 and refine.estimator.track_drift


def test_training_benchmark_writes_results(tmp_path):
    out = tmp_path / "train.json"
    assert main(["--device", "cpu", "--train", "--optimizers", "adamw,kl_shampoo_fast", "--every", "2",
                 "--steps", "2", "--warmup", "1", "--batch", "2", "--length", "32", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert all(r.get("finite") and r["tokens_per_s"] > 0 for r in data["results"].values()), data["results"]


@pytest.mark.parametrize("shape,max_dim", [((6, 4), None), ((5, 7), None), ((3, 4, 5), None), ((40, 6), 8),
                                           ((9,), None), ((2, 3, 2, 4), None)])
def test_floor_counts_the_matrix_products_of_a_step(shape, max_dim):
    """The floor's FLOP formula equals torch's own FLOP counter on a steady-state (non-refresh) KL-Shampoo step."""
    from torch.utils.flop_counter import FlopCounterMode

    from precond.bench import floor

    weight = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64))
    opt = precond.kl_shampoo([weight], lr=1e-3, every=100, max_dim=max_dim, state_dtype=torch.float64)
    for _ in range(2):  # the fill, then one update: the next step is a steady one
        weight.grad = torch.randn(shape, dtype=torch.float64)
        opt.step()
    weight.grad = torch.randn(shape, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        opt.step()
    assert counter.get_total_flops() == floor.step_flops(shape, max_dim)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_time_counts_kernel_time_within_the_wall_time():
    """precond.bench.device_time on CUDA: kernel time is positive and at most the wall time (busy ≤ 1), and the
    largest kernel of a matmul-heavy step is a matrix product."""
    from precond.bench.device_time import profile_steps

    params = [torch.nn.Parameter(torch.randn(512, 512, device="cuda")) for _ in range(4)]
    optimizer = precond.kl_shampoo(params, lr=1e-3, every=2)
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    profile = profile_steps(optimizer, params, grads, torch.device("cuda"))
    assert 0 < profile["kernel_ms_per_step"] <= profile["wall_ms_per_step"]
    assert 0 < profile["busy"] <= 1 and profile["comm_kernel_ms_per_step"] == 0
    assert profile["top_kernels"] and all(ms > 0 for _, ms in profile["top_kernels"])


def test_profile_prints_the_op_count_and_the_tables(capsys):
    """``python -m precond.bench.profile`` (on CUDA where there is one, as the command picks): the op count of the
    profiled steps, the two tables, and the busy line exactly when the device is CUDA (device_time's own test above
    covers its numbers)."""
    from precond.bench.profile import main as profile_main

    profile_main(["--optimizer", "kl_shampoo_qr_budget_fast", "--shapes", "tiny", "--every", "2", "--steps", "2",
                  "--rows", "3"])
    out = capsys.readouterr().out
    assert "kl_shampoo_qr_budget_fast:" in out and "top-level aten ops per step()" in out
    assert out.count("Self CPU time total") == 2 and ("busy" in out) == torch.cuda.is_available()


def test_refresh_drift_reports_each_mode_size():
    """``python -m precond.bench.refresh_drift`` on a tiny GPT: a row per mode size with refreshes counted and
    drift ratios in [0, 1] (that p = 2 leaves less drift than p = 1 near an eigenbasis is tested in
    ``tests/test_bases.py`` on a constructed factor, not here on trained ones)."""
    from precond.bench.refresh_drift import measure
    text = measure(24, {"layers": 1, "width": 16, "heads": 2, "context": 8, "batch_size": 4})
    rows = [line.split("|")[1:-1] for line in text.splitlines()
            if line.startswith("| ") and line.count("|") == 6 and "mode size" not in line]
    assert rows, text
    for size, count, before, after, squared in rows:
        assert int(size) > 0 and int(count) > 0, text
        assert all(0.0 <= float(value) <= 1.0 for value in (before, after, squared)), text


def test_refresh_drift_compares_refine_under_the_budget():
    """``--rule budget --refine``: the same rows, plus what ``bases.Refine`` would leave from each refresh's start (a
    ratio in [0, 1]) and how many of those refreshes it would have refused (a count no larger than the refreshes)."""
    from precond.bench.refresh_drift import measure
    text = measure(24, {"layers": 1, "width": 16, "heads": 2, "context": 8, "batch_size": 4}, rule="budget",
                   refine=True)
    assert "rule budget" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines()
            if line.startswith("| ") and line.count("|") == 10 and "mode size" not in line]
    assert rows, text
    for size, count, before, after, squared, refined, kept, root, root_refined in rows:
        assert int(size) > 0 and int(count) > 0, text
        assert all(0.0 <= float(value) <= 1.0 for value in (before, after, squared, refined)), text
        assert 0 <= int(kept) <= int(count), text
        assert float(root) >= 0.0 and float(root_refined) >= 0.0, text


def test_root_error_is_zero_for_the_eigenbasis_and_grows_with_a_rotation():
    """:func:`root_error` against closed forms: 0 for ``S``'s own eigenvectors; for ``S = diag(1, a)`` and the basis
    rotated by θ, ``D = (cos²θ + a sin²θ, sin²θ + a cos²θ)`` and the error is the Frobenius norm of the 2 × 2
    difference computed here from that formula (by hand, not by the function's own route)."""
    import math

    from precond.bench.refine_quality import root_error
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    s = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64)
    assert root_error(s, torch.linalg.eigh(s).eigenvectors) < 1e-12
    small, theta = 0.25, 0.3
    c, t = math.cos(theta), math.sin(theta)
    q = torch.tensor([[c, -t], [t, c]], dtype=torch.float64)
    d1, d2 = c * c + small * t * t, t * t + small * c * c
    # Q diag(d1^-1/2, d2^-1/2) Qᵀ entry by entry, against diag(1, small^-1/2) (floor 1e-2: below both spectra)
    p11 = c * c / math.sqrt(d1) + t * t / math.sqrt(d2)
    p22 = t * t / math.sqrt(d1) + c * c / math.sqrt(d2)
    p12 = c * t / math.sqrt(d1) - c * t / math.sqrt(d2)
    expected = math.sqrt((p11 - 1) ** 2 + (p22 - small ** -0.5) ** 2 + 2 * p12 ** 2) / math.sqrt(1 + 1 / small)
    assert abs(root_error(torch.diag(torch.tensor([1.0, small], dtype=torch.float64)), q) - expected) < 1e-12


def test_refine_quality_reports_the_root_error_beside_the_off_diagonal_energy():
    """``refine_quality.quality`` gives each refresher ``[off-diagonal energy, orthogonality, root error]`` per
    refresh: ``eigh``'s own basis has a root error at round-off, a never refreshed basis on a factor whose eigenvectors
    turned does not (the factors are made here: a fixed spectrum in a basis rotated a little more at each snapshot)."""
    from precond.bench.refine_quality import quality
    gen = torch.Generator().manual_seed(0)
    d = 12
    spectrum = torch.logspace(0, -4, d, dtype=torch.float64)
    generator = torch.randn(d, d, generator=gen, dtype=torch.float64)
    skew = (generator - generator.T) * 0.05
    snapshots = []
    for k in range(4):
        turn = torch.linalg.matrix_exp(k * skew)
        snapshots.append(((turn * spectrum) @ turn.T).float())
    rows = quality({"factor": snapshots}, ["eigh", "qr"])["factor"]
    assert set(rows) == {"eigh", "qr", "stale"} and all(len(r) == 3 for r in rows["eigh"])
    assert all(len(values) == 3 for values in rows["qr"])
    assert max(values[2] for values in rows["eigh"]) < 1e-3
    assert rows["stale"][-1][2] > 0.05


def test_the_gpt2_bytes_shapes_are_the_gpt2_small_configs_model():
    """``gpt2-bytes`` is the model of ``ablations/gpt2_small.toml``: 86,198,784 parameters, counted here from the
    layout (embeddings 256 × 768 and 1024 × 768; per block two layer norms, a 2304 × 768 attention product without
    bias, a 768 × 768 projection without bias, the 3072 × 768 and 768 × 3072 MLP products with biases; a final norm;
    an untied 256 × 768 head)."""
    import math

    from precond.bench.shapes import PRESETS
    width, hidden, vocab, context = 768, 3072, 256, 1024
    attention = 2 * width + 3 * width * width + width * width  # ln1, qkv, proj
    mlp = 2 * width + (hidden * width + hidden) + (width * hidden + width)  # ln2, fc, out
    block = attention + mlp
    count = vocab * width + context * width + 12 * block + 2 * width + vocab * width
    assert count == 86_198_784
    shapes = PRESETS["gpt2-bytes"]
    assert sum(math.prod(shape) for shape in shapes) == count
    assert shapes.count((hidden, width)) == shapes.count((width, hidden)) == 12
    assert shapes[0] == (vocab, width) and shapes[-1] == (vocab, width)
