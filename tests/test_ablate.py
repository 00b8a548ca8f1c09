"""The ablation workbench: variant parsing, a tiny end-to-end ablation, resuming, the time budget, the tasks."""

import csv
import importlib.util
import json
import math
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
                "basis": {"eigh": "Eigh", "qr": "QRPowerStep", "cholesky_qr": "CholeskyQR", "identity": "Identity"}}
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
    ("basis=svd", ["basis", "eigh, qr, cholesky_qr, identity"]),
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
