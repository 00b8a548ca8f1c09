"""``precond.bench.fully_shard_parity`` under ``torchrun`` on 2 CPU processes (gloo): a real ``fully_shard`` GPT
(each block and the root) in exact owner mode against one process on the concatenated batch.

References (both one process, ``distributed=None``, computed by the script on rank 0): ``accumulated`` (one
backward per rank's micro-batch, gradients summed and halved, FSDP2's arithmetic at W = 2) must equal the sharded
run bitwise, gradients and parameters, at every step; ``single`` (one backward over the whole batch) within float32
round-off for the gradients, and for the parameters of KL-Shampoo, whose steps do not magnify it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PRESETS = ("kl_shampoo", "soap", "shampoo")
STEPS = 5


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = tmp_path_factory.mktemp("fully_shard") / "parity.json"
    # --standalone: a free local port for the rendezvous (the default, 29500, clashes with any other run on the host)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "precond.bench.fully_shard_parity", "--backend", "gloo", "--device", "cpu", "--small",
               "--presets", ",".join(PRESETS), "--steps", str(STEPS), "--every", "2", "--length", "32",
               "--timed", "1", "--warmup", "1", "--timing-every", "2", "--out", str(out)]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_report_describes_the_run(report):
    assert report["world"] == 2 and report["backend"] == "gloo" and report["dtype"] == "float32"
    assert report["model"]["layers"] == 2 and report["model"]["width"] == 64
    assert sorted(report["presets"]) == sorted(PRESETS)
    for result in report["presets"].values():
        assert [row["step"] for row in result["steps"]] == list(range(1, STEPS + 1))
        assert len(result["timing"]) == 2
        for rank in result["timing"]:
            assert rank["step_ms_median"] > 0 and rank["iteration_ms_median"] >= rank["step_ms_median"]
            assert rank["state_bytes"] > 0 and rank["peak_rss_bytes"] > 0 and rank["finite"]


@pytest.mark.parametrize("preset", PRESETS)
def test_sharded_run_equals_one_process_with_fsdp2s_gradient_sum_bitwise(report, preset):
    rows = report["presets"][preset]["steps"]
    for row in rows:
        assert row["grad_max_abs_diff_accumulated"] == 0.0, row
        assert row["param_max_abs_diff_accumulated"] == 0.0, row
    assert rows[-1]["param_max_abs_moved"] > 1e-5  # the parameters did move


@pytest.mark.parametrize("preset", PRESETS)
def test_sharded_run_matches_one_process_on_the_whole_batch_within_round_off(report, preset):
    rows = report["presets"][preset]["steps"]
    first = rows[0]
    assert 0.0 < first["grad_max_abs_diff_single"] <= 1e-6 * first["grad_max_abs"], first
    assert first["loss_abs_diff_single"] <= 1e-5 * first["loss_single"]
    if preset == "kl_shampoo":
        for row in rows:
            assert row["param_max_abs_diff_single"] <= 1e-7, row
