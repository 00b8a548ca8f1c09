"""The integration examples (``examples/hf_trainer.py``, ``examples/lightning.py``) do what they claim: a preset
class trains inside Hugging Face's ``Trainer`` and Lightning's ``Trainer`` and resumes from a checkpoint with
exactly the weights of the uninterrupted run, while a control resume without the optimizer state ends elsewhere.

Slow (a few seconds each on CPU) and optional: they need the ``integrations`` extra
(``pip install transformers accelerate lightning``). Run with ``pytest -m slow tests/test_integrations.py``.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _example(name: str):
    # loaded under another module name: examples/lightning.py must not stand in for the lightning package
    spec = importlib.util.spec_from_file_location(f"precond_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_hf_trainer_builds_the_preset_class_and_resumes_bit_for_bit(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    result = _example("hf_trainer").main(tmp_path)
    assert result["optimizer"] == "KLShampoo"
    assert result["weight_decays"] == [0.1, 0.0]  # Trainer's decay / no-decay groups reached the preset
    assert result["resumed"] == 0.0
    assert result["control"] > 1e-6


@pytest.mark.slow
def test_lightning_resumes_bit_for_bit_with_a_scheduler_and_backbone_finetuning(tmp_path):
    pytest.importorskip("lightning")
    result = _example("lightning").main(tmp_path)
    assert result["kl_shampoo_one_cycle"] == 0.0
    assert result["soap_backbone_finetuning"] == 0.0  # its checkpoint holds param_groups: weights_only loading
    assert result["muon_backbone_finetuning"] == 0.0  # the added backbone routed: biases to Muon's Adam part
    assert result["control"] > 1e-6
    assert result["lr_columns"] == ["lr-KLShampoo", "lr-KLShampoo-momentum"]


@pytest.mark.slow
def test_hf_trainer_builds_muon_from_the_class_and_resumes_bit_for_bit(tmp_path):
    """``Trainer`` calls a non-class ``optimizer_cls`` as a factory with no arguments (the ``TypeError`` of
    issue 21 when ``precond.muon`` was a function): as a class, ``precond.muon`` gets Trainer's decay / no-decay
    groups (matrices to Newton–Schulz, vectors to Adam) and resumes bit for bit."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import precond

    example = _example("hf_trainer")
    example.OPTIMIZER = (precond.muon, {"lr": 0.02, "adam_lr": 3e-3})
    result = example.main(tmp_path)
    assert result["optimizer"] == "Muon"
    assert result["weight_decays"] == [0.1, 0.0]
    assert result["resumed"] == 0.0
    assert result["control"] > 1e-6
