"""The ablation workbench: variant parsing, a tiny end-to-end ablation, resuming, the time budget, the tasks."""

import csv
import importlib.util
import math
import pathlib
import subprocess
import sys

import pytest
import torch

import bases
import estimators
import precond
from precond.ablate import AblationConfig, load_toml, parse_variant, run_ablation
from precond.ablate.build import make_preconditioner
from precond.ablate.cli import main as cli_main
from precond.tasks import make_task

ROOT = pathlib.Path(__file__).parent.parent
TINY_LM = {"layers": 1, "width": 16, "heads": 2, "context": 16, "batch_size": 4, "max_bytes": 100_000}


def tiny_config(out, variants=("kl_shampoo", "adamw"), lrs=(3e-3,), **overrides):
    settings = {"task": "char_lm", "task_options": TINY_LM, "variants": list(variants), "lrs": list(lrs),
                "steps": 6, "eval_every": 3, "eval_batches": 2, "out": str(out), "progress": False, **overrides}
    return AblationConfig.from_mapping(settings)


def quiet(_message):
    pass


# --- parsing --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, structure, estimator, basis, applier_p, graft", [
    ("estimator=kl,basis=qr,applier=power:0.5", "NMode", estimators.KL, bases.QRPowerStep, 0.5, None),
    ("estimator=shampoo,basis=eigh,every=5,applier=power:1/(2N),graft=adam", "NMode", estimators.Shampoo,
     bases.Eigh, "1/(2N)", "adam"),
    ("structure=kronecker,max_dim=64,estimator=frobenius_factored,basis=identity,applier=power:0.25",
     "Kronecker", estimators.Shampoo, bases.Identity, 0.25, None),
    ("structure=one_sided,estimator=kl,graft=rmsprop", "OneSided", estimators.KL, bases.QRPowerStep, 0.5, "rmsprop"),
    ("structure=diagonal,estimator=frobenius,graft=sgd", "Diagonal", estimators.DenseSpectrum, bases.QRPowerStep,
     0.5, "sgd"),
])
def test_composition_builds_the_named_parts(text, structure, estimator, basis, applier_p, graft):
    variant = parse_variant(text)
    preconditioner = make_preconditioner(variant.options)
    assert type(preconditioner.structure).__name__ == structure
    assert isinstance(preconditioner.estimator, estimator)
    assert isinstance(preconditioner.basis, basis)
    applier = preconditioner.applier
    if graft is None:
        assert isinstance(applier, precond.Power)
    else:
        assert isinstance(applier, precond.Graft) and applier.onto == graft
        applier = applier.inner
    assert applier.p == applier_p
    assert variant.preset is None
    assert parse_variant(variant.spec()).settings == variant.settings  # the canonical text round-trips


def test_composition_hyperparameters_and_estimator_mappings():
    variant = parse_variant("estimator=kl_soap,every=7,beta1=0.8,beta2=0.99,eps=1e-6,max_dim=32,name=mine,lr=1e-3/3e-3")
    assert variant.name == "mine" and variant.lrs == (1e-3, 3e-3)
    preconditioner = make_preconditioner(variant.options)
    assert preconditioner.estimator == estimators.DenseSpectrum(estimators.KL(beta=0.99), beta=0.99,
                                                                bias_correction=False, transport="keep")
    assert preconditioner.basis.every == 7 and preconditioner.structure.max_dim == 32
    assert preconditioner.applier.eps == 1e-6
    optimizer = variant.build(torch.nn.Linear(4, 3).parameters(), lr=0.1)
    assert optimizer.param_groups[0]["momentum"] == 0.8 and not optimizer.param_groups[0]["bias_correction"]

    frobenius = parse_variant("estimator=frobenius")
    assert make_preconditioner(frobenius.options).estimator == estimators.Frobenius(beta=0.95, spectrum="dense")
    assert frobenius.build(torch.nn.Linear(4, 3).parameters(), lr=0.1).param_groups[0]["bias_correction"]
    assert make_preconditioner(parse_variant("estimator=frobenius_factored").options).estimator == \
        estimators.Frobenius(beta=0.95, spectrum="factored")


def test_named_variants_build_presets_and_adamw():
    params = list(torch.nn.Linear(4, 3).parameters())
    assert isinstance(parse_variant("adamw").build(params, lr=1e-3), torch.optim.AdamW)
    for name in precond.PRESETS:
        assert isinstance(parse_variant(name).build(params, lr=1e-3), precond.Optimizer), name
    ungrafted = parse_variant("shampoo,graft=none,beta2=0.99,name=plain").build(params, lr=1e-3)
    assert isinstance(ungrafted.param_groups[0]["preconditioner"].applier, precond.Power)
    assert ungrafted.param_groups[0]["preconditioner"].estimator.beta == 0.99
    grafted = parse_variant("shampoo").build(params, lr=1e-3)
    assert isinstance(grafted.param_groups[0]["preconditioner"].applier, precond.Graft)


@pytest.mark.parametrize("text, expected", [
    ("estimator=kll", ["estimator", "kl, shampoo, frobenius, frobenius_factored, kl_soap"]),
    ("basis=svd", ["basis", "eigh, qr, identity"]),
    ("structure=blocks", ["structure", "nmode, kronecker, one_sided, diagonal"]),
    ("graft=adagrad", ["graft", "adam, rmsprop, sgd, none"]),
    ("applier=root:0.5", ["applier", "power:1/(2N)"]),
    ("applier=power:3", ["p must lie in [0, 1]"]),
    ("every=0", ["every", "positive integer"]),
    ("beta2=1.5", ["beta2", "[0, 1)"]),
    ("max_dim=-3", ["max_dim", "none"]),
    ("colour=red", ["unknown key 'colour'", "estimator", "basis", "applier"]),
    ("lion", ["unknown variant name 'lion'", "kl_shampoo", "adamw"]),
    ("kl_shampoo,estimator=shampoo", ["cannot be changed", "kl_shampoo", "beta2"]),
    ("adamw,basis=eigh", ["cannot be changed", "adamw"]),
    ("estimator=kl,estimator=shampoo", ["given twice"]),
    ("estimator=kl,shampoo", ["not key=value"]),
    ("", ["empty variant"]),
])
def test_bad_variants_say_what_is_wrong(text, expected):
    with pytest.raises(ValueError) as error:
        parse_variant(text)
    for fragment in expected:
        assert fragment in str(error.value)


def test_configuration_checks_its_keys_and_the_shipped_files_load(tmp_path):
    with pytest.raises(ValueError, match="unknown configuration key.*known keys"):
        AblationConfig.from_mapping({"stepz": 3})
    with pytest.raises(ValueError, match="unknown option 'depth'.*layers"):
        AblationConfig.from_mapping({"task_options": {"depth": 3}})
    with pytest.raises(ValueError, match="unique"):
        AblationConfig.from_mapping({"variants": ["adamw", "adamw"]})
    for path in sorted((ROOT / "ablations").glob("*.toml")):
        config = AblationConfig.from_mapping(load_toml(path))
        assert len(config.grid()) >= 2 * len(config.variants), path


def test_grid_goes_seed_by_seed_and_lr_by_lr(tmp_path):
    config = tiny_config(tmp_path, variants=("adamw,lr=1e-3/2e-3", "kl_shampoo,lr=3e-3"), seeds=[0, 1])
    order = [(v.name, lr, seed) for v, lr, seed in config.grid()]
    assert order == [("adamw", 1e-3, 0), ("kl_shampoo", 3e-3, 0), ("adamw", 2e-3, 0),
                     ("adamw", 1e-3, 1), ("kl_shampoo", 3e-3, 1), ("adamw", 2e-3, 1)]


# --- running ----------------------------------------------------------------------------------------------------
def test_tiny_ablation_writes_every_output_and_resumes(tmp_path):
    result = run_ablation(tiny_config(tmp_path), log=quiet)
    assert (result.executed, result.skipped, result.remaining) == (2, 0, 0)

    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert [row["variant"] for row in rows] == ["kl_shampoo", "adamw"]
    assert all(math.isfinite(float(row["final_val"])) for row in rows)
    summary = (tmp_path / "summary.md").read_text()
    assert "| variant | best lr | final val loss" in summary and "optimizer state (MiB)" in summary
    assert "| kl_shampoo |" in summary and "| adamw |" in summary
    assert "## Every learning rate" in summary and "| kl_shampoo | 0.003 **(best)** |" in summary
    if importlib.util.find_spec("matplotlib") is not None:  # the plots need the demo extra
        assert (tmp_path / "loss_curves.png").stat().st_size > 0 and (tmp_path / "lr_sweep.png").stat().st_size > 0

    again = run_ablation(tiny_config(tmp_path), log=quiet)
    assert (again.executed, again.skipped) == (0, 2)  # nothing retrained
    assert [r["final_val"] for r in again.records] == [r["final_val"] for r in result.records]

    (tmp_path / "summary.md").unlink()
    reported = run_ablation(tiny_config(tmp_path, lrs=(3e-3, 1e-3)), log=quiet, train=False)
    assert (reported.executed, reported.skipped, reported.remaining) == (0, 2, 2)  # reports only, trains nothing
    assert "| kl_shampoo |" in (tmp_path / "summary.md").read_text()

    wider = run_ablation(tiny_config(tmp_path, lrs=(3e-3, 1e-3)), log=quiet)
    assert (wider.executed, wider.skipped) == (2, 2)  # only the new learning rate runs
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 4


def test_runs_are_deterministic_and_divergence_is_recorded(tmp_path):
    first = run_ablation(tiny_config(tmp_path / "a", variants=("kl_shampoo",)), log=quiet).records[0]
    second = run_ablation(tiny_config(tmp_path / "b", variants=("kl_shampoo",)), log=quiet).records[0]
    assert first["curve"]["val"] == second["curve"]["val"]

    blown = run_ablation(tiny_config(tmp_path / "c", variants=("shampoo,graft=none",), lrs=(10.0,)), log=quiet)
    assert blown.records[0]["diverged"] and blown.records[0]["final_val"] is None
    assert "diverged" in blown.table


def test_time_budget_leaves_runs_for_next_time(tmp_path):
    result = run_ablation(tiny_config(tmp_path, max_minutes=1e-9), log=quiet)
    assert result.executed == 0 and result.remaining == 2
    assert run_ablation(tiny_config(tmp_path), log=quiet).executed == 2


def test_runs_in_worker_processes_match_the_serial_runs(tmp_path):
    serial = run_ablation(tiny_config(tmp_path / "serial", lrs=(3e-3, 1e-3)), log=quiet)
    parallel = run_ablation(tiny_config(tmp_path / "parallel", lrs=(3e-3, 1e-3), workers=2), log=quiet)
    assert (parallel.executed, parallel.remaining) == (4, 0)
    assert [r["curve"]["val"] for r in parallel.records] == [r["curve"]["val"] for r in serial.records]
    assert {r["concurrent_runs"] for r in parallel.records} == {2} and {r["concurrent_runs"] for r in serial.records} == {1}
    stored = (tmp_path / "parallel" / "runs.jsonl").read_text().splitlines()
    assert len(stored) == 4  # one writer: whole lines, no interleaving
    assert run_ablation(tiny_config(tmp_path / "parallel", lrs=(3e-3, 1e-3), workers=2), log=quiet).executed == 0
    budget = run_ablation(tiny_config(tmp_path / "budget", workers=2, max_minutes=1e-9), log=quiet)
    assert (budget.executed, budget.remaining) == (0, 2)
    with pytest.raises(ValueError, match="workers"):
        tiny_config(tmp_path, workers=0)


def test_workers_take_the_gpus_in_turn():
    from precond.ablate.parallel import worker_devices
    assert worker_devices(torch.device("cuda"), 5, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert worker_devices(torch.device("cuda:1"), 2, 4) == ["cuda:1", "cuda:1"]  # an explicit GPU is kept
    assert worker_devices(torch.device("cuda"), 3, 1) == ["cuda"] * 3
    assert worker_devices(torch.device("cpu"), 2, 0) == ["cpu", "cpu"]


def test_command_line(tmp_path, capsys):
    args = ["--task", "char_lm", "--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--lrs", "1e-3",
            "--variant", "estimator=kl,basis=eigh,name=kl-eigh", "--out", str(tmp_path), "--no-progress"]
    args += [f"--task-option={key}={value}" for key, value in TINY_LM.items()]
    assert cli_main(args) == 0
    assert "| kl-eigh |" in capsys.readouterr().out
    assert cli_main(args + ["--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("done")
    assert cli_main(["--out", str(tmp_path / "elsewhere"), "--device", "cuda", "--report-only", "--steps", "4",
                     "--variant", "adamw", "--no-progress"]) == 0  # a GPU grid's report needs no GPU
    capsys.readouterr()
    assert cli_main(["--variant", "estimator=bogus"]) == 2
    assert "allowed: kl, shampoo" in capsys.readouterr().err


def test_module_entry_point():
    listing = subprocess.run([sys.executable, "-m", "precond.ablate", "--list"], capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout
    assert "named variants" in listing and "task char_lm options" in listing


# --- tasks ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options", [("char_lm", TINY_LM),
                                           ("teacher_conv", {"train_size": 256, "val_size": 64, "width": 4})])
def test_tasks_are_deterministic(name, options):
    task = make_task(name, options)
    data = task.load(torch.device("cpu"))
    a, b = task.build_model(3), task.build_model(3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    x1, y1 = data.train_batch(torch.Generator().manual_seed(5))
    x2, y2 = data.train_batch(torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.isfinite(task.loss(a, data.val_batches(1)[0]))


def test_teacher_conv_has_4d_kernels_and_balanced_labels():
    task = make_task("teacher_conv", {"train_size": 2048, "val_size": 64})
    data = task.load(torch.device("cpu"))
    assert any(p.ndim == 4 for p in task.build_model(0).parameters())
    counts = torch.bincount(data.y_train, minlength=task.classes)
    assert counts.min() > 0.3 * counts.float().mean()


def test_best_learning_rate_at_the_edge_of_the_grid_is_flagged():
    from precond.ablate.report import lr_table
    from precond.ablate.summary import summarize
    runs = [{"variant": "a", "lr": lr, "seed": seed, "final_val": loss + 0.01 * seed, "diverged": False}
            for lr, loss in ((1e-3, 2.0), (2e-3, 1.5), (4e-3, 1.8)) for seed in (0, 1)]
    runs += [{"variant": "b", "lr": lr, "seed": 0, "final_val": loss, "diverged": False}
             for lr, loss in ((1e-3, 1.2), (2e-3, 1.9))]
    runs.append({"variant": "b", "lr": 4e-3, "seed": 0, "final_val": None, "diverged": True})
    a, b = summarize(runs, ["a", "b"])
    assert (a.best_lr, a.best_lr_at_edge, b.best_lr, b.best_lr_at_edge) == (2e-3, False, 1e-3, True)
    assert a.final_mean == pytest.approx(1.505) and a.final_std == pytest.approx(0.01 / 2 ** 0.5)
    table = lr_table([a, b])
    assert "| a | 0.002 **(best)** | 1.5050 ± 0.0071 | 2 (0) |" in table and "| b | 0.004 | diverged | 1 (1) |" in table
