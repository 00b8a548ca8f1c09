"""Checkpoints of a distributed ``precond.Optimizer`` through ``torch.distributed.checkpoint`` (DCP).

In owner mode each rank's ``optimizer.state_dict()`` holds only the parameters it owns (``{}`` for the others),
so a per-rank ``torch.save`` of it is not a checkpoint of the run. DCP is the supported way: the state is keyed
by parameter name (``get_optimizer_state_dict``), every rank writes the keys it has (each owner its share; the
replicated ``param_groups`` once), and a load asks each rank for the keys it will own, so a run saved at ``W``
ranks resumes at any ``W'`` (the owners are recomputed from the shapes). Replicate mode and one process save the
full state on every rank; DCP writes it once.

A fresh optimizer gets the structure DCP loads into from ``get_optimizer_state_dict``, which steps it once with
zero gradients and ``lr = 0`` (``torch.distributed.checkpoint.state_dict._init_optim_state``): precond builds its
whole state from that step (the same keys, shapes and dtypes as a trained optimizer's; tested) and leaves the
weights as they were. ``flatten_optimizer_state_dict=True`` drops empty groups (a vector's ``S`` and ``Q``), which
the state reader tolerates.

>>> save(model, optimizer, "ckpt/step_1000")          # every rank
>>> load(model, optimizer, "ckpt/step_1000")          # every rank, any world size, freshly built model/optimizer
"""

from __future__ import annotations

from typing import Any


def _state(model, optimizer, options) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


def save(model, optimizer, checkpoint_id: str, options: Any = None) -> None:
    """Save the model and the optimizer with ``dcp.save`` (call on every rank)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(model, optimizer, options), checkpoint_id=checkpoint_id)


def load(model, optimizer, checkpoint_id: str, options: Any = None) -> None:
    """Load what :func:`save` wrote into ``model`` and ``optimizer`` (call on every rank; any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state(model, optimizer, options)
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
