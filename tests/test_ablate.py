"""The ablation workbench: variant parsing, a tiny end-to-end ablation, resuming, the time budget, the tasks."""

import csv
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import bases
import estimators
import precond
import structures
from precond.ablate import AblationConfig, catalog, load_toml, parse_variant, run_ablation
from precond.ablate.build import make_preconditioner
from precond.ablate.cli import describe_choices
from precond.ablate.cli import main as cli_main
from precond.tasks import make_task

ROOT = pathlib.Path(__file__).parent.parent
TINY_LM = {"layers": 1, "width": 16, "heads": 2, "context": 16, "batch_size": 4, "max_bytes": 100_000}


def tiny_config(out, variants=("kl_shampoo", "adamw"), lrs=(3e-3,), **overrides):
    settings = {"task": "char_lm", "task_options": TINY_LM, "variants": list(variants), "lrs": list(lrs),
                "steps": 6, "eval_every": 3, "eval_batches": 2, "out": str(out), "progress": False, "extend_lrs": 0,
                **overrides}
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
    ("basis=cholesky_qr,every=4", "NMode", estimators.KL, bases.CholeskyQR, 0.5, None),
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


def test_every_part_name_of_the_table_is_reachable_and_trains():
    """Each name of the one table (precond.ablate.catalog.PARTS) is accepted by the variant grammar, builds the
    part the library names it after, and takes a finite optimizer step."""
    expected = {"structure": {"nmode": "NMode", "kronecker": "Kronecker", "one_sided": "OneSided",
                              "diagonal": "Diagonal"},
                "basis": {"eigh": "Eigh", "qr": "QRPowerStep", "cholesky_qr": "CholeskyQR",
                          "cholesky_qr64": "CholeskyQR", "refine": "Refine", "identity": "Identity"}}
    for slot, names in catalog.PARTS.items():
        for name in names:
            variant = parse_variant(f"{slot}={name},every=1")
            preconditioner = make_preconditioner(variant.options)
            part = getattr(preconditioner, "applier" if slot == "graft" else slot)
            if slot in expected:
                assert type(part).__name__ == expected[slot][name]
            model = torch.nn.Linear(6, 5)
            optimizer = variant.build(model.parameters(), lr=1e-2)
            for _ in range(3):
                model(torch.randn(8, 6)).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()
            assert all(torch.isfinite(p).all() for p in model.parameters()), (slot, name)


def test_large_modes_and_normalize_reach_the_parts():
    variant = parse_variant("structure=kronecker,max_dim=4,large=diagonal,normalize=0.2,graft=adam")
    preconditioner = make_preconditioner(variant.options)
    assert preconditioner.structure == structures.Kronecker(max_dim=4, large="diagonal")
    assert preconditioner.structure.plan((3, 8)).kinds == ("dense", "diagonal")  # the mode above max_dim
    power = precond.Power(p=0.5, eps=1e-8, eps_placement="outside")
    assert preconditioner.applier == precond.Graft(precond.Normalize(power, rms=0.2), onto="adam")
    plain = make_preconditioner(parse_variant("estimator=kl").options)
    assert plain.structure.large == "none" and plain.applier == power
    assert "large=diagonal" in variant.spec() and parse_variant(variant.spec()).settings == variant.settings


def test_the_choices_come_from_the_one_table():
    from precond.ablate import keys
    for slot in catalog.PARTS:
        assert keys.CHOICES[slot] == tuple(catalog.PARTS[slot])
    listing = describe_choices()
    for slot, names in catalog.PARTS.items():
        assert f"  {slot}: " in listing and ", ".join(names) in listing
    assert "  large: " in listing and "  normalize: " in listing


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
    ("basis=svd", ["basis", "eigh, qr, cholesky_qr, cholesky_qr64, refine, identity"]),
    ("large=huge", ["large", "none, diagonal"]),
    ("normalize=-1", ["normalize", "RMS", "none"]),
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

    with open(tmp_path / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
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
    assert ({r["concurrent_runs"] for r in parallel.records} == {2}
            and {r["concurrent_runs"] for r in serial.records} == {1})
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
            "--variant", "estimator=kl,basis=eigh,name=kl-eigh", "--out", str(tmp_path), "--no-progress",
            "--extend-lrs", "0"]
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
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
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


# --- structure of the workbench ---------------------------------------------------------------------------------
def _ablate_imports():
    """``{module: modules of precond.ablate it imports}``, function-level imports included (read from the source)."""
    import ast
    folder = ROOT / "precond" / "ablate"
    modules = {path.stem for path in folder.glob("*.py")}
    graph = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "precond.ablate":
                found |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("precond.ablate."):
                found.add(node.module.split(".")[2])
        graph[path.stem] = found - {path.stem}
    return graph


def test_the_workbench_has_no_import_cycle():
    graph = _ablate_imports()
    assert "runner" not in graph["parallel"] and "parallel" in graph["runner"]
    state = {}

    def visit(module, path):
        if state.get(module) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path + [module])}")
        if state.get(module) == "done":
            return
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            visit(imported, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_library_fingerprint_covers_every_library_file_and_no_workbench_file(tmp_path):
    from precond.ablate.attempt import fingerprint_of, library_files
    files = ["precond/optimizer.py", "precond/appliers/power.py", "structures/n_mode.py", "estimators/kl.py",
             "bases/eigh.py", "precond/ablate/train.py", "precond/bench/timing.py", "precond/tasks/gpt.py"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    listed = [path.relative_to(tmp_path).as_posix() for path in library_files(tmp_path)]
    assert sorted(listed) == sorted(files[:5])
    before = fingerprint_of(tmp_path)
    (tmp_path / "precond/ablate/train.py").write_text("# the workbench changed\n")
    assert fingerprint_of(tmp_path) == before
    (tmp_path / "precond/appliers/power.py").write_text("# the applier changed\n")
    assert fingerprint_of(tmp_path) != before
    real = [path.relative_to(ROOT).as_posix() for path in library_files(ROOT)]
    assert "precond/appliers/graft.py" in real and "precond/optimizer.py" in real
    assert not any(name.startswith(("precond/ablate/", "precond/bench/", "precond/tasks/")) for name in real)


@pytest.mark.parametrize("build, fragments", [
    (lambda: make_task("char_lm", {"layers": 0}), ["layers (transformer blocks)", "≥ 1", "got 0"]),
    (lambda: make_task("char_lm", {"val_fraction": 1.0}), ["val_fraction (share of the text held out", "(0, 1)"]),
    (lambda: make_task("teacher_conv", {"batch_size": True}), ["batch_size (examples per step)"]),
    (lambda: make_task("teacher_conv", {"data_seed": 0.5}), ["data_seed (seed of the images"]),
    (lambda: precond.ablate.Training(steps=2.5), ["steps (optimizer updates)", "an integer"]),
    (lambda: precond.ablate.Training(warmup=1.5), ["warmup (share of the steps", "[0, 1]"]),
    (lambda: precond.ablate.Training(clip=float("nan")), ["clip (largest gradient norm", "None", "nan"]),
    (lambda: precond.ablate.Training(weight_decay=-1), ["weight_decay (decoupled weight decay"]),
])
def test_workbench_settings_are_checked_by_the_one_validator(build, fragments):
    with pytest.raises(ValueError) as error:
        build()
    for fragment in fragments:
        assert fragment in str(error.value)


# --- CPU threads ------------------------------------------------------------------------------------------------
def test_cpu_runs_use_one_thread_by_default_and_the_count_is_in_the_key(tmp_path):
    from precond.ablate.attempt import run_key
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what torch picks on a 2-core machine
    try:
        default = run_ablation(tiny_config(tmp_path / "one", variants=("adamw",)), log=quiet)
        assert [r["threads"] for r in default.records] == [1]
        assert torch.get_num_threads() == 2  # restored afterwards
        assert "(1 CPU thread per run)" in (tmp_path / "one" / "summary.md").read_text()
        two = run_ablation(tiny_config(tmp_path / "one", variants=("adamw",), threads=2), log=quiet)
        assert (two.executed, [r["threads"] for r in two.records]) == (1, [2])  # not the 1-thread run reused
    finally:
        torch.set_num_threads(before)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    one, three = tiny_config(tmp_path), tiny_config(tmp_path, threads=3)
    variant = one.variants[0]
    assert (one.threads_on(cpu), three.threads_on(cpu), one.threads_on(cuda)) == (1, 3, None)
    assert run_key(one, variant, 1e-3, 0, cpu) != run_key(three, variant, 1e-3, 0, cpu)
    assert run_key(one, variant, 1e-3, 0, cuda) == run_key(three, variant, 1e-3, 0, cuda)  # GPU math: no CPU threads
    with pytest.raises(ValueError, match="threads"):
        tiny_config(tmp_path, threads=0)


def test_threads_option_on_the_command_line(tmp_path, capsys):
    args = ["--task", "char_lm", "--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--lrs", "1e-3",
            "--variant", "adamw", "--out", str(tmp_path), "--no-progress", "--extend-lrs", "0", "--threads", "2"]
    args += [f"--task-option={key}={value}" for key, value in TINY_LM.items()]
    assert cli_main(args) == 0
    capsys.readouterr()
    record = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])
    assert record["threads"] == 2
    assert cli_main(args + ["--dry-run"]) == 0 and capsys.readouterr().out.startswith("done")
    assert cli_main(args[:-2] + ["--dry-run"]) == 0 and capsys.readouterr().out.startswith("todo")  # 1 thread: new


# --- divergence -------------------------------------------------------------------------------------------------
def _record(variant, lr, vals, **extra):
    steps = [100 * i for i in range(len(vals))]
    return {"variant": variant, "lr": lr, "seed": 0, "final_val": vals[-1], "diverged": False, "steps_done": steps[-1],
            "curve": {"step": steps, "train": [None] * len(vals), "val": vals, "seconds": [float(s) for s in steps]},
            "wall_seconds": 1.0, **extra}


def test_a_loss_that_rose_far_above_its_start_is_diverged_and_sets_no_target():
    """The demo's case: ungrafted Shampoo's loss went from 5.6 to 6232 without a NaN, was counted as a result and
    became the automatic target (every variant 'reached' it at step 0)."""
    from precond.ablate.divergence import blown_up, diverged
    from precond.ablate.report import markdown_table
    from precond.ablate.summary import auto_target, summarize
    good = [_record("kl", 1e-2, [5.6, 3.0, 2.2, 2.0]), _record("kl", 5e-3, [5.6, 3.4, 2.6, 2.4])]
    weak = [_record("adamw", 3e-3, [5.6, 4.0, 3.0, 2.6])]
    blown = [_record("plain", 1e-6, [5.6, 5.2, 900.0, 6232.64]), _record("plain", 1e-5, [5.6, 14.0, 40.0, 80.0])]
    assert [diverged(r) for r in good + weak + blown] == [False, False, False, True, True]
    assert blown_up(11.2, 5.6) is None and "above 2× the initial" in blown_up(11.3, 5.6)
    assert "nan" in blown_up(float("nan"), 5.6) and blown_up(None, 5.6) is not None
    summaries = summarize(good + weak + blown, ["kl", "adamw", "plain"])
    kl, _, plain = summaries
    assert (plain.diverged, plain.best_lr, plain.final_mean) == (2, None, math.inf)
    assert auto_target(summaries) == 2.6  # adamw's best final loss, not 6232.64
    assert kl.to_target(2.6) == (200, 200.0, 1)  # steps and seconds to the target, no longer 0
    table = markdown_table(summaries, auto_target(summaries), cuda=False)
    assert "| plain | — | diverged | not reached |" in table and "| kl | 0.01 (grid edge) | 2.0000 | 200 |" in table


def test_the_reference_target_is_the_best_baselines_mean_final_loss_whatever_the_weakest_variant_reached():
    """The race of issue 23: "time to AdamW's final loss". With ``auto`` a broken variant (final 4.0) set the target
    and every other variant "reached" it early; ``target_loss = "reference"`` is the best baseline's mean final loss
    over its seeds, at its best lr."""
    from precond.ablate.report import target_of
    from precond.ablate.summary import reference_of, summarize
    adamw = [_record("adamw", 1e-3, [5.6, 3.2, 2.6], seed=0), _record("adamw", 1e-3, [5.6, 3.0, 2.4], seed=1),
             _record("adamw", 3e-3, [5.6, 3.9, 2.9], seed=0), _record("adamw", 3e-3, [5.6, 3.9, 2.9], seed=1)]
    kl = [_record("kl", 1e-2, [5.6, 2.5, 2.0], seed=0), _record("kl", 1e-2, [5.6, 2.6, 2.1], seed=1)]
    broken = [_record("broken", 1e-2, [5.6, 4.5, 4.0], seed=0)]
    summaries = summarize(adamw + kl + broken, ["adamw", "kl", "broken"])
    reference = reference_of(summaries, ["adamw"])
    assert reference.name == "adamw"
    assert target_of("reference", summaries, reference) == pytest.approx((2.6 + 2.4) / 2)  # lr 1e-3's mean
    assert target_of(None, summaries, reference) == 4.0
    assert target_of(3.5, summaries, reference) == 3.5
    assert target_of("reference", summaries, None) is None
    kl_summary = summaries[1]
    assert kl_summary.to_target(2.5)[0] == 150  # the reference's 2.5: seed 0 at step 100, seed 1 at step 200


@pytest.mark.parametrize("given, expected", [("auto", None), (None, None), ("reference", "reference"),
                                             (0.9, 0.9), ("0.9", 0.9)])
def test_target_loss_accepts_a_number_auto_or_reference(given, expected):
    from precond.ablate.config import AblationConfig
    config = AblationConfig.from_mapping({"target_loss": given})
    assert config.target_loss == expected


@pytest.mark.parametrize("given", ["baseline", "nan", float("inf"), [1.0]])
def test_a_target_loss_that_is_not_a_loss_auto_or_reference_is_refused_with_the_choices(given):
    from precond.ablate.config import AblationConfig
    with pytest.raises(ValueError, match="target_loss must be a finite validation loss, \"auto\" or \"reference\""):
        AblationConfig.from_mapping({"target_loss": given})


def test_training_stops_when_the_loss_blows_up_without_a_nan():
    """A finite blow-up: Adam at lr 10 on L(w) = w² from w = 1 jumps to |w| ≈ 9 (L ≈ 81 > 2 · L₀)."""
    from precond.ablate.train import Training, train_run

    class Quadratic:
        name = "quadratic"

        def settings(self):
            return {"task": self.name}

        def build_model(self, seed):
            model = torch.nn.Linear(1, 1, bias=False)
            torch.nn.init.ones_(model.weight)
            return model

        def load(self, device):
            return self

        def train_batch(self, generator):
            return torch.zeros(1), torch.zeros(1)

        def val_batches(self, count):
            return [(torch.zeros(1), torch.zeros(1))] * count

        def loss(self, model, batch):
            return model.weight.square().sum()

    task = Quadratic()
    training = Training(steps=20, eval_every=2, eval_batches=1, warmup=0.0, schedule="constant")
    record = train_run(task, task, parse_variant("adamw"), 10.0, 0, training, torch.device("cpu"))
    assert record["diverged"] and record["final_val"] is None and record["steps_done"] == 2
    assert "above 2× the initial 1" in record["error"]
    calm = train_run(task, task, parse_variant("adamw"), 0.05, 0, training, torch.device("cpu"))
    assert not calm["diverged"] and calm["final_val"] < 1.0


def test_plots_keep_the_working_variants_readable_when_one_blows_up(tmp_path):
    from precond.ablate import plots
    from precond.ablate.summary import summarize
    runs = [_record("kl", 1e-2, [5.6, 3.0, 1.6, 1.3]), _record("plain", 1e-6, [5.6, 5.2, 900.0, 6232.64]),
            _record("nan", 1e-3, [5.6, None], final_val=None, diverged=True)]
    summaries = summarize(runs, ["kl", "plain", "nan"])
    bottom, top, log = plots.axis_range([v for v in runs[0]["curve"]["val"]])
    assert log and 1.0 < bottom < 1.3 and 5.6 < top < 7.0  # scaled to the working run, on a log axis
    assert plots.axis_range([2.0, 2.5, 3.0])[2] is False
    run, blew = plots.shown_run(summaries[1])
    assert blew and run["lr"] == 1e-6
    drawn, cut = plots.clip_at(plots.points(run), top)
    assert cut and [p[2] for p in drawn] == [5.6, 5.2, top]  # ends at the top edge, where the × goes
    assert plots.clip_at(plots.points(runs[0]), top) == ([(0, 0.0, 5.6), (100, 100.0, 3.0), (200, 200.0, 1.6),
                                                           (300, 300.0, 1.3)], False)
    if importlib.util.find_spec("matplotlib") is not None:
        files = plots.write_plots(summaries, tmp_path, title="synthetic")
        assert all(path.stat().st_size > 0 for path in files.values())


def test_a_pinned_library_fingerprint_keeps_finished_runs_after_a_library_change(tmp_path, monkeypatch):
    from precond.ablate import attempt, runner
    first = run_ablation(tiny_config(tmp_path, variants=("adamw",)), log=quiet)
    made_by = first.records[0]["library"]
    monkeypatch.setattr(attempt, "library_fingerprint", lambda: "0123456789ab")  # the source changed since
    monkeypatch.setattr(runner, "library_fingerprint", lambda: "0123456789ab")
    pinned = run_ablation(tiny_config(tmp_path, variants=("adamw",), library=made_by), log=quiet)
    assert (pinned.executed, pinned.skipped) == (0, 1)
    unpinned = run_ablation(tiny_config(tmp_path, variants=("adamw",)), log=quiet)
    assert unpinned.executed == 1 and unpinned.records[0]["library"] == "0123456789ab"  # states the code that ran it
    with pytest.raises(ValueError, match="12 lower-case hex digits"):
        tiny_config(tmp_path, library="latest")


@pytest.mark.parametrize("text", ["shampoo,max_dim=4,large=block", "structure=nmode,max_dim=4,large=block"])
def test_variants_can_ask_for_meta_blocking(text):
    from precond.ablate.build import build_optimizer
    from precond.ablate.variants import parse_variant
    weight = torch.nn.Parameter(torch.randn(9, 3))
    optimizer = build_optimizer(parse_variant(text), [weight], 1e-3)
    assert optimizer.layout(weight).splits == ((4, 4, 1), (3,))  # 9 cut as torch.split(·, 4); 3 ≤ 4 whole


# --- per-second numbers on a busy machine (issue 24) --------------------------------------------------------------
def _timed_record(variant, lr, ms, load=1.0, seed=0, key=None):
    steps = [0, 20, 40]
    return {"variant": variant, "spec": variant, "lr": lr, "seed": seed, "key": key or f"{variant}-{lr}-{seed}",
            "final_val": 2.0 + lr, "best_val": 2.0 + lr, "diverged": False, "steps": 40, "steps_done": 40,
            "curve": {"step": steps, "train": [None, 3.0, 2.5], "val": [5.0, 3.0, 2.0 + lr],
                      "seconds": [0.0, 20 * ms / 1e3, 40 * ms / 1e3]},
            "step_ms": [ms] * 40, "wall_seconds": 1.0, "train_seconds": 40 * ms / 1e3, "threads": 1,
            "concurrent_runs": 2, "load": {"start": [load, 1.0, 1.0], "end": [load, 1.0, 1.0]},
            "machine": {"cpu": "Test CPU", "cores": 2, "gpu": None}}


def test_a_spread_of_step_times_is_flagged_from_a_records_file(tmp_path):
    """The issue's case: one AdamW run at 35 ms/step beside its siblings at 17 (other work on the machine)."""
    from precond.ablate import timing
    from precond.ablate.report import write_reports
    from precond.ablate.store import RunStore
    from precond.ablate.summary import summarize
    lines = [_timed_record("adamw", 1e-3, 17.0), _timed_record("adamw", 2e-3, 35.0, load=3.4),
             _timed_record("adamw", 4e-3, 17.2), _timed_record("kl_shampoo", 1e-3, 20.0),
             _timed_record("kl_shampoo", 2e-3, 21.0, load=1.5), _timed_record("kl_shampoo", 4e-3, 22.0)]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = list(RunStore(tmp_path / "runs.jsonl"))
    adamw, kl = summarize(records, ["adamw", "kl_shampoo"])
    flag = timing.spread(adamw)
    assert flag.flagged and flag.ratio == pytest.approx(35.0 / 17.0) and flag.loads == (1.0, 3.4)
    assert not timing.spread(kl).flagged and timing.spread(kl).ratio == pytest.approx(1.1)
    assert [s.name for s in timing.spreads([adamw, kl]) if s.flagged] == ["adamw"]

    write_reports(records, tiny_config(tmp_path), torch.device("cpu"), tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "## How the times were taken" in summary and "No timing pass" in summary
    assert "| adamw | — | — | 17.0–35.0 (3 runs) | **2.06× FLAGGED** | 1.00–3.40 |" in summary
    assert "| kl_shampoo | — | — | 20.0–22.0 (3 runs) | 1.10× |" in summary
    assert "**⚠ adamw: step times of its grid runs spread 2.06×" in summary
    assert "**its per-second numbers are not reliable** (no timing pass)" in summary
    assert "⚠ kl_shampoo" not in summary
    assert "- machine: CPU Test CPU, 2 cores" in summary


def test_runs_of_one_variant_on_two_machine_instances_are_flagged(tmp_path):
    """Issue 23's race: two device calls landed on two H100 machines whose step times differed by 11 % (AdamW and
    KL-Shampoo alike); a variant whose seeds ran on both had a mean step time of neither. Each record keeps the
    machine's boot id; the summary counts the instances and flags a variant whose best-lr runs mix them."""
    from precond.ablate import machine
    from precond.ablate.report import write_reports
    from precond.ablate.store import RunStore

    def on(boot, *args, **kwargs):
        record = _timed_record(*args, **kwargs)
        record["machine"] = {**record["machine"], "boot": boot}
        return record
    lines = [on("aaaa0001", "adamw", 1e-3, 12.0, seed=0), on("aaaa0001", "adamw", 1e-3, 12.1, seed=1),
             on("aaaa0001", "kl_shampoo", 1e-3, 28.7, seed=0), on("bbbb0002", "kl_shampoo", 1e-3, 31.9, seed=1),
             _timed_record("soap", 1e-3, 20.0)]  # a record from before boot ids: no instance
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = list(RunStore(tmp_path / "runs.jsonl"))
    assert machine.instances(records) == ["aaaa0001", "bbbb0002"]
    config = tiny_config(tmp_path, variants=("adamw", "kl_shampoo", "soap"), lrs=(1e-3,), seeds=[0, 1])
    write_reports(records, config, torch.device("cpu"), tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "**machine instances: 2** (boot ids aaaa0001, bbbb0002)" in summary
    assert "**⚠ kl_shampoo: its best-lr runs ran on 2 machine instances (boot ids aaaa0001, bbbb0002)" in summary
    assert "⚠ adamw" not in summary and "⚠ soap" not in summary
    single = tmp_path / "single"
    single.mkdir()
    write_reports(records[:3], config, torch.device("cpu"), single)
    assert "machine instances" not in (single / "summary.md").read_text()


def test_the_boot_id_names_this_machine_instance_where_the_system_has_one():
    from precond.ablate import machine
    boot = machine.describe(torch.device("cpu"))["boot"]
    if os.path.exists("/proc/sys/kernel/random/boot_id"):
        assert boot is not None and len(boot) == 8 and int(boot, 16) >= 0
    else:
        assert boot is None


def test_the_timing_pass_runs_alone_after_the_grid_and_times_the_per_second_table(tmp_path, monkeypatch):
    """The grid trains in two worker processes; the timing pass then runs each variant's best lr in this process,
    one run at a time (the wrapper below sees only this process's runs), and the per-second table uses its step
    times (made distinctive here: 7 ms for KL-Shampoo, 3 ms for AdamW; no time is measured by the test)."""
    from precond.ablate import attempt
    calls, active, most = [], [0], [0]
    real = attempt.train_run

    def train_run(task, data, variant, lr, seed, training, device, *args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        try:
            record = real(task, data, variant, lr, seed, training, device, *args, **kwargs)
        finally:
            active[0] -= 1
        calls.append((variant.name, lr, kwargs.get("stop_after")))
        record["step_ms"] = [{"kl_shampoo": 7.0, "adamw": 3.0}[variant.name]] * len(record["step_ms"])
        return record

    monkeypatch.setattr(attempt, "train_run", train_run)
    config = tiny_config(tmp_path, lrs=(3e-3, 1e-3), workers=2, timing_steps=4)
    result = run_ablation(config, log=quiet)
    assert result.executed == 4 and {r["concurrent_runs"] for r in result.records} == {2}
    assert most[0] == 1 and sorted(calls) == [("adamw", 3e-3, 4), ("kl_shampoo", 3e-3, 4)]  # 3e-3 is the best lr
    timings = [json.loads(line) for line in (tmp_path / "timing.jsonl").read_text().splitlines()]
    best = {r["variant"]: r["key"] for r in result.records if r["lr"] == 3e-3}
    assert {(t["variant"], t["of"], t["pass"], t["concurrent_runs"], t["steps_done"]) for t in timings} == {
        ("kl_shampoo", best["kl_shampoo"], "timing", 1, 4), ("adamw", best["adamw"], "timing", 1, 4)}
    summary = (tmp_path / "summary.md").read_text()
    assert "| adamw | 3.0 | 0.00 |" in summary and "| kl_shampoo | 7.0 | 0.00 |" in summary  # the per-second table
    assert "timed by a **timing pass**" in summary and "trained 2 at a time" in summary
    assert "| kl_shampoo | 7.0 | " in summary.split("## How the times were taken")[1]
    for record in result.records + tuple(timings):  # load and machine are recorded with every run
        assert len(record["load"]["start"]) == 3 and len(record["load"]["end"]) == 3
        assert record["machine"]["cpu"] and record["machine"]["cores"] >= 1 and record["machine"]["gpu"] is None
    again = run_ablation(config, log=quiet)  # the grid and the timing runs are reused
    assert again.executed == 0 and len(calls) == 2
    assert "| adamw | 3.0 | 0.00 |" in (tmp_path / "summary.md").read_text()


def test_the_timing_pass_repeats_the_start_of_the_grid_run(tmp_path):
    result = run_ablation(tiny_config(tmp_path, variants=("adamw",), timing_steps=3), log=quiet)
    timed = json.loads((tmp_path / "timing.jsonl").read_text())
    grid = result.records[0]
    assert timed["of"] == grid["key"] and timed["steps_done"] == 3 and len(timed["step_ms"]) == 3
    assert timed["curve"]["val"][:2] == grid["curve"]["val"][:2]  # steps 0 and 3: the same model, batches, lrs
    none = run_ablation(tiny_config(tmp_path / "none", variants=("adamw",), timing_steps=0), log=quiet)
    assert none.executed == 1 and not (tmp_path / "none" / "timing.jsonl").exists()
    assert "No timing pass" in (tmp_path / "none" / "summary.md").read_text()


# --- the demo teaches -------------------------------------------------------------------------------------------
def test_every_demo_variant_says_why_and_the_diverging_one_is_expected():
    config = AblationConfig.from_mapping(load_toml(ROOT / "ablations" / "demo.toml"))
    assert all(variant.why for variant in config.variants)
    assert [v.name for v in config.variants if v.expected_to_diverge] == ["shampoo (no graft)"]
    from precond.ablate.report import variants_section
    section = variants_section(config)
    for variant in config.variants:
        assert f"- **{variant.name}** (`{variant.spec()}`)" in section and variant.why in section
    assert "*expected to diverge*" in section


def test_an_expected_divergence_is_not_sent_back_for_wider_lrs():
    from precond.ablate.bracket import tune
    plain = parse_variant("shampoo,graft=none,name=plain,expect=diverge,why=shows why grafting exists")
    assert plain.expected_to_diverge and plain.why == "shows why grafting exists"
    blown = {"final_val": None, "diverged": True}
    lrs, tuning = tune(plain, [1e-6, 1e-5], [0], lambda v, lr, seed: blown, limit=2)
    assert lrs == [1e-6, 1e-5] and tuning.state == "expected" and "as expected" in tuning.message
    assert "widen" not in tuning.message and "NOT BRACKETED" not in tuning.message
    fine = {"final_val": 2.0, "diverged": False}
    _, surprise = tune(plain, [1e-6], [0], lambda v, lr, seed: fine, limit=2)
    assert surprise.state == "unexpected" and "but did not" in surprise.message
    unmarked = parse_variant("shampoo,graft=none")
    _, limit = tune(unmarked, [1e-6], [0], lambda v, lr, seed: blown, limit=0)
    assert limit.state == "limit" and "widen its lrs" in limit.message
    with pytest.raises(ValueError, match="expect"):
        parse_variant("adamw,expect=converge")


def test_the_log_has_one_line_per_run_and_each_warning_kind_once(tmp_path):
    lines = []
    run_ablation(tiny_config(tmp_path, lrs=(3e-3, 1e-3)), log=lines.append)
    finished = [line for line in lines if line.startswith("[") and not line.startswith("[timing")]
    assert len(finished) == 4 and all(" final val " in line and "ms/step" in line for line in finished)
    assert not any("step 3/6" in line for line in lines)  # no line per validation

    import warnings

    from precond.ablate import warnlog
    with warnlog.collect() as caught:
        for index in range(50):
            warnings.warn(f"refresh {index} fell back", RuntimeWarning, stacklevel=1)
        warnings.warn("old API", DeprecationWarning, stacklevel=1)  # hidden, as Python's default filters do
    assert len(caught) == 1 and caught[0]["count"] == 50 and caught[0]["message"] == "refresh 0 fell back"
    digest = warnlog.Digest()
    first = digest.add({"variant": "a", "warnings": caught}, "[1/2] a")
    second = digest.add({"variant": "b", "warnings": caught}, "[2/2] b")
    assert len(first) == 1 and "RuntimeWarning" in first[0] and "shown once" in first[0] and second == []
    assert digest.total() == 100 and "| 100 | 2 | a, b |" in digest.markdown()


def test_plots_scale_the_lr_axis_to_the_variants_that_did_not_diverge(tmp_path):
    from precond.ablate import plots
    from precond.ablate.summary import summarize
    runs = [_record("kl", 1e-2, [5.6, 3.0, 1.6, 1.3]), _record("kl", 5e-3, [5.6, 3.2, 1.8, 1.5]),
            _record("plain", 1e-6, [5.6, 5.2, 900.0, 6232.64]), _record("plain", 1e-5, [5.6, 14.0, 40.0, 80.0])]
    summaries = summarize(runs, ["kl", "plain"])
    assert plots.sweep_range(summaries) == pytest.approx((5e-3 / 1.6, 1e-2 * 1.6))  # not stretched to 1e-6
    assert plots.sweep_range(summaries[1:]) == pytest.approx((1e-6 / 1.6, 1e-5 * 1.6))
    assert (plots.seeds_text(1), plots.seeds_text(3)) == ("1 seed", "3 seeds")
    if importlib.util.find_spec("matplotlib") is not None:
        files = plots.write_plots(summaries, tmp_path, title="synthetic", equal_time=200.0, target=1.5)
        assert all(path.stat().st_size > 0 for path in files.values())


# --- statistics through scipy -----------------------------------------------------------------------------------
OLD_T_QUANTILES = {
    (0.9, 1): 3.0776835371752895, (0.9, 2): 1.8856180831635356, (0.9, 5): 1.475884048824355,
    (0.9, 29): 1.3114336473013282, (0.975, 1): 12.706204736172367, (0.975, 2): 4.302652729749752,
    (0.975, 3): 3.1824463052844294, (0.975, 4): 2.776445105198036, (0.975, 5): 2.570581835635494,
    (0.975, 9): 2.2621571627978483, (0.975, 19): 2.093024054408488, (0.975, 29): 2.0452296421326537,
    (0.995, 1): 63.65674116284936, (0.995, 3): 5.840909309734343, (0.995, 9): 3.2498355415928017}
"""Quantiles of the hand-written Student t (incomplete beta by continued fraction, inverted by bisection) that
``precond.ablate.stats`` had before it used ``scipy.stats``, computed with it before its removal; over
p in [0.55, 0.9999] and 22 degrees of freedom it agreed with ``scipy.stats.t.ppf`` to 1.0e-12."""

OLD_INTERVALS = [([0.10, 0.20, 0.05], -0.07306248501318413, 0.30639581834651747),
                 ([-0.01, 0.02, -0.03], -0.06918276146042865, 0.05584942812709531),
                 ([0.3, 0.1], -1.0706204736172367, 1.4706204736172366),
                 ([0.01, 0.012, 0.008, 0.011, 0.009], 0.008036756838522272, 0.011963243161477729)]


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="the intervals need scipy (test extra)")
def test_scipy_quantiles_and_intervals_agree_with_the_hand_written_ones_they_replace():
    from precond.ablate.stats import paired_interval, t_quantile
    for (p, df), old in OLD_T_QUANTILES.items():
        assert t_quantile(p, df) == pytest.approx(old, rel=1e-8, abs=1e-8)
        assert t_quantile(1 - p, df) == pytest.approx(-old, rel=1e-8, abs=1e-8)
    for differences, low, high in OLD_INTERVALS:
        interval = paired_interval(differences)
        assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-8, abs=1e-8)
    same = paired_interval([0.2, 0.2, 0.2])  # zero spread: the point itself (scipy wants a positive scale)
    assert (same.low, same.high, same.significant) == (pytest.approx(0.2), pytest.approx(0.2), True)


def test_without_scipy_one_seed_needs_nothing_and_several_seeds_say_how_to_install_it(monkeypatch):
    from precond.ablate import stats
    from precond.ablate.report import _difference
    from precond.ablate.summary import summarize
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy now raises ImportError
    assert stats.paired_interval([0.2]).text() == "+0.2000 (1 seed: no interval)"
    with pytest.raises(ImportError, match="pip install scipy"):
        stats.paired_interval([0.1, 0.2])
    runs = [_record(name, 1e-3, [5.0, final + 0.01 * seed], seed=seed) for name, final in (("a", 2.0), ("b", 2.5))
            for seed in (0, 1)]
    a, b = summarize(runs, ["a", "b"])
    assert _difference(b, a) == "+0.5000 (no interval: pip install scipy)"


# --- TensorBoard --------------------------------------------------------------------------------------------------
class FakeWriter:
    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_logs_losses_lr_and_optimizer_stats(tmp_path, monkeypatch):
    from precond.ablate import board
    FakeWriter.made = []
    monkeypatch.setattr(board, "writer_class", lambda: FakeWriter)
    monkeypatch.setattr(precond.Optimizer, "stats", lambda self: {"eigh_jitter": 3})  # a fallback counted 3 times
    run_ablation(tiny_config(tmp_path, tensorboard=tmp_path / "tb", timing_steps=2), log=quiet)
    by_dir = {pathlib.Path(w.log_dir).name: w for w in FakeWriter.made}
    assert sorted(by_dir) == ["adamw lr=0.003 seed=0", "kl_shampoo lr=0.003 seed=0"]  # the timing runs log nothing
    assert all(pathlib.Path(w.log_dir).parent == tmp_path / "tb" and w.closed for w in FakeWriter.made)
    for name, writer in by_dir.items():
        steps = {tag: [step for t, _, step in writer.scalars if t == tag] for tag, _, _ in writer.scalars}
        assert steps["lr"] == [1, 2, 3, 4, 5, 6] and steps["loss/val"] == [0, 3, 6] and steps["loss/train"] == [3, 6]
        jitter = [(value, step) for tag, value, step in writer.scalars if tag == "stats/eigh_jitter"]
        assert jitter == ([(3.0, 0), (3.0, 3), (3.0, 6)] if name.startswith("kl_shampoo") else [])  # AdamW: no stats()
    record = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])
    vals = [value for tag, value, _ in by_dir["kl_shampoo lr=0.003 seed=0"].scalars if tag == "loss/val"]
    assert vals == pytest.approx(record["curve"]["val"])


def test_tensorboard_missing_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    from precond.ablate import board
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        board.writer_class()
    with pytest.raises(ImportError, match="pip install tensorboard"):  # before any run is trained
        run_ablation(tiny_config(tmp_path, tensorboard=tmp_path / "tb"), log=quiet)
    assert not (tmp_path / "runs.jsonl").exists()
    assert cli_main(["--variant", "adamw", "--out", str(tmp_path), "--tensorboard", str(tmp_path / "tb")]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err


# --- --only: a subset of a config's variants ---------------------------------------------------------------------
def test_only_keeps_the_named_variants_with_their_run_keys(tmp_path):
    from precond.ablate.attempt import run_key

    variants = ("adamw", "kl_shampoo,name=kl a", "kl_shampoo,every=3,name=kl b,lr_from=kl a")
    config = tiny_config(tmp_path, variants=variants, baselines=["adamw"])
    kept = config.only(["kl a"])
    assert [v.name for v in kept.variants] == ["kl a"] and kept.baselines == ()
    assert config.only(["adamw", "kl a"]).baselines == ("adamw",)
    cpu = torch.device("cpu")
    assert run_key(kept, kept.variants[0], 3e-3, 0, cpu) == run_key(config, config.variants[1], 3e-3, 0, cpu)
    with pytest.raises(ValueError, match="'nope', which is not a variant of this ablation .*'kl a'"):
        config.only(["nope"])
    with pytest.raises(ValueError, match="lr_from names 'kl a', which is not another variant"):
        config.only(["kl b"])


def test_only_on_the_command_line_trains_the_subset_and_shares_its_records(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text('task = "char_lm"\nsteps = 2\neval_every = 2\neval_batches = 1\nlrs = [1e-3]\nextend_lrs = 0\n'
                      f'out = "{tmp_path / "out"}"\nprogress = false\nvariants = ["adamw", "kl_shampoo"]\n'
                      "[task_options]\n" + "".join(f"{key} = {value}\n" for key, value in TINY_LM.items()))
    assert cli_main(["--config", str(config), "--only", "adamw"]) == 0
    capsys.readouterr()
    assert cli_main(["--config", str(config), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("done  adamw") and lines[1].startswith("todo  kl_shampoo")
    assert cli_main(["--config", str(config), "--only", "muon"]) == 2
    assert "--only names 'muon'" in capsys.readouterr().err
