"""What the ranks of ``tests/test_distributed.py`` run (imported in the spawned processes), and the single-process
references the test computes from the same definitions.

Every case steps ``2T + 1`` steps (T = 3), so every factor is refreshed twice, with stagger on or off; parameters
of several orders, a stacked pair, a mode above ``max_dim`` and steps where some parameters have no gradient.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.distributed as dist

import precond
from precond.distributed import owner_of, state_bytes, traffic

PRESETS = ("eshampoo", "idealized_kl_shampoo", "kl_shampoo", "kl_soap", "one_sided_shampoo", "shampoo", "soap")
SHAPES = [(5,), (4, 6), (4, 6), (3, 4, 5), (6, 4)]  # a vector, a stacked pair, order 3, a mode above max_dim=5
EVERY = 3
STEPS = 2 * EVERY + 1
MISSING = {2: (1,), 4: (0, 3), 5: (1, 2)}  # step → parameters without a gradient


def parity_cases() -> list[dict[str, Any]]:
    """Every preset × stack × stagger × mode, and owner mode's ``placement="by_kind"`` (other owners) stacked."""
    cases = [{"preset": p, "stack": s, "stagger": g, "mode": m}
             for p, s, g, m in itertools.product(PRESETS, (True, False), (False, True), ("owner", "replicate"))]
    return cases + [{"preset": p, "stack": True, "stagger": g, "mode": "owner", "placement": "by_kind"}
                    for p, g in itertools.product(PRESETS, (False, True))]


def case_name(case: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


def make_params(shapes=SHAPES, dtype=torch.float32, seed=0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=gen).to(dtype)) for shape in shapes]


def set_gradients(params, step: int, missing=MISSING, frozen=()) -> None:
    for i, p in enumerate(params):
        if i in missing.get(step, ()) or i in frozen:
            p.grad = None
            continue
        gen = torch.Generator().manual_seed(1000 * step + i)
        p.grad = (torch.randn(p.shape, generator=gen) + 0.5 * p.detach().float() ** 3).to(p.dtype)


def make_optimizer(case: dict[str, Any], params, distributed=None, **options) -> precond.Optimizer:
    groups = [{"params": params[:3]}, {"params": params[3:], "lr": 5e-3, "weight_decay": 0.01}]
    factory = getattr(precond, case["preset"])
    return factory(groups, lr=1e-2, every=EVERY, max_dim=5, stack=case.get("stack", True),
                   stagger=case.get("stagger", False), distributed=distributed, **options)


def trajectory(case: dict[str, Any], distributed=None, shapes=SHAPES, dtype=torch.float32, steps=STEPS,
               missing=MISSING, frozen=(), **options) -> tuple[list[torch.Tensor], precond.Optimizer]:
    params = make_params(shapes, dtype)
    optimizer = make_optimizer(case, params, distributed, **options)
    for step in range(1, steps + 1):
        set_gradients(params, step, missing, frozen)
        optimizer.step()
    return [p.detach().clone() for p in params], optimizer


def _config(case: dict[str, Any], **kwargs) -> precond.DataParallel:
    return precond.DataParallel(mode=case["mode"], placement=case.get("placement", "balanced"), **kwargs)


# --- what the ranks run ------------------------------------------------------------------------------
def parity(rank: int, world: int, cases: list[dict[str, Any]]) -> dict[str, list[torch.Tensor]]:
    """Parameters after ``STEPS`` steps of each case, every rank stepping the same gradients."""
    return {case_name(case): trajectory(case, _config(case))[0] for case in cases}


def edges(rank: int, world: int) -> dict[str, Any]:
    """The edge cases (see ``tests/test_distributed.py``)."""
    out: dict[str, Any] = {}
    shampoo = {"preset": "shampoo", "mode": "owner"}
    # more ranks than parameters (a rank owns nothing and still joins every collective)
    out["few"] = trajectory(shampoo, _config(shampoo), shapes=[(4, 3)], missing={})[0]
    # a parameter that never has a gradient, others missing at some steps; vectors, a mode above max_dim
    out["frozen"] = trajectory(shampoo, _config(shampoo), shapes=[(5,), (7, 3), (3,), (4, 4)], frozen=(2,))[0]
    # bfloat16 parameters (float32 state, the update cast last)
    for mode in ("owner", "replicate"):
        case = {"preset": "soap", "mode": mode}
        out[f"bf16-{mode}"] = trajectory(case, _config(case), dtype=torch.bfloat16)[0]
    # bfloat16 communication
    out["bf16-comm"] = trajectory(shampoo, _config(shampoo, comm_dtype=torch.bfloat16))[0]
    # one large parameter: slots too uneven for an all-gather, one broadcast per rank instead
    out["uneven"] = trajectory(shampoo, _config(shampoo), shapes=[(40, 5), (2, 3), (3,)], missing={})[0]
    # small chunks: several collectives per step
    out["chunks"] = trajectory(shampoo, _config(shampoo, chunk_elements=7))[0]
    out["pipelined"] = _pipelined()
    # tensor lr
    out["tensor-lr"] = _tensor_lr(shampoo)
    out["nonfinite"] = _nonfinite(rank)
    # asynchronous refreshes on the owners (installed at the next step)
    staggered = {**shampoo, "stagger": True}
    out["async"] = trajectory(staggered, _config(staggered), async_refresh=True)[0]
    out["added-group"] = _added_group(_config(shampoo))
    # a subgroup (ranks 0 and 1): the others do not take part
    sub = dist.new_group([0, 1])
    if rank in (0, 1):
        for mode in ("owner", "replicate"):
            case = {"preset": "kl_shampoo", "mode": mode, "stagger": True}
            out[f"subgroup-{mode}"] = trajectory(case, _config(case, group=sub))[0]
    return out


def _pipelined() -> dict[str, Any]:
    """One chunk per kind (``PIPELINE_ELEMENTS`` lowered to 1), some gradients missing: chunks start while later
    kinds are still computed. The parameters, and how many collectives started early at the last step."""
    from precond.distributed import owner, traffic

    case = {"preset": "kl_shampoo", "mode": "owner", "placement": "by_kind"}
    kept, owner.PIPELINE_ELEMENTS = owner.PIPELINE_ELEMENTS, 1
    try:
        params, optimizer = trajectory(case, _config(case))
    finally:
        owner.PIPELINE_ELEMENTS = kept
    return {"params": params, "chunks": len(optimizer.engine.runtime.chunks), **traffic(optimizer)}


def _added_group(distributed) -> list[torch.Tensor]:
    """A param group added after 3 steps: the parameters already stepped keep their owners (and state)."""
    params = make_params()
    optimizer = precond.shampoo(params[:3], lr=1e-2, every=EVERY, max_dim=5, distributed=distributed)
    for step in range(1, STEPS + 1):
        if step == 4:
            optimizer.add_param_group({"params": params[3:], "lr": 5e-3})
        set_gradients(params, step)
        if step < 4:
            for p in params[3:]:
                p.grad = None
        optimizer.step()
    return [p.detach().clone() for p in params]


def _tensor_lr(case):
    params = make_params()
    optimizer = make_optimizer(case, params, _config(case))
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(group["lr"])
    for step in range(1, STEPS + 1):
        set_gradients(params, step)
        optimizer.step()
    return [p.detach().clone() for p in params]


def _nonfinite(rank: int) -> dict[str, Any]:
    """A NaN in the gradient of a parameter on its owner only (the gradient that is used; other ranks never read
    their copy): every rank refuses (or skips) the step alike."""
    case = {"preset": "shampoo", "mode": "owner"}
    out = {}
    for policy in ("raise", "skip"):
        params = make_params()
        optimizer = make_optimizer(case, params, _config(case), on_nonfinite=policy)
        set_gradients(params, 1)
        optimizer.step()
        before = [p.detach().clone() for p in params]
        set_gradients(params, 2)
        if rank == owner_of(optimizer, params[3]):
            params[3].grad[0, 0, 0] = float("nan")
        try:
            optimizer.step()
            outcome = "stepped"
        except FloatingPointError as error:
            outcome = "raised" if "parameter" in str(error) or "gradient" in str(error) else str(error)
        unchanged = all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
        out[policy] = {"outcome": outcome, "unchanged": unchanged, "stats": optimizer.stats()}
    return out


def state_split(rank: int, world: int) -> dict[str, Any]:
    """State bytes this rank keeps in owner mode for a model of repeated layers, and its traffic."""
    case = {"preset": "shampoo", "mode": "owner"}
    shapes = [(12, 12)] * 4 + [(12, 24)] * 4 + [(24,)] * 4
    params, optimizer = trajectory(case, _config(case), shapes=shapes, missing={}, steps=2)
    return {"bytes": state_bytes(optimizer), "traffic": traffic(optimizer), "params": params}


class TinyNet(torch.nn.Module):
    """Float64: the first Shampoo steps precondition with rank-deficient factors (a batch gradient has low rank),
    so ε^{-1/2} (10⁶) multiplies rounding noise in their null space, and grafting rescales it: float32 rounding of
    the averaged gradient (1e-8) would show as 1e-2 in the weights whatever the distribution does."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.hidden = torch.nn.Linear(6, 5)
        self.out = torch.nn.Linear(5, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.double()

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(77 + step)
    return (torch.randn(size, 6, generator=gen, dtype=torch.float64),
            torch.randn(size, 3, generator=gen, dtype=torch.float64))


PER_RANK = 4


def train(model: torch.nn.Module, forward, rank: int, world: int, distributed: precond.DataParallel | None):
    optimizer = precond.shampoo(model.parameters(), lr=3e-2, every=EVERY, state_dtype=torch.float64,
                                distributed=distributed)
    for step in range(1, STEPS + 1):
        x, y = batch(step, PER_RANK * world)
        x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        torch.nn.functional.mse_loss(forward(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def ddp(rank: int, world: int, mode: str) -> list[torch.Tensor]:
    """End to end: DDP averages each rank's gradient of its own samples; precond steps in ``mode``."""
    model = TinyNet()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    return train(model, wrapped, rank, world, precond.DataParallel(mode=mode, comm_dtype=torch.float64))




def suite(rank: int, world: int, root: str, checkpoint: str) -> dict[str, Any]:
    """Everything one spawn of ``world`` ranks checks (spawning is the slow part, so it happens once per size);
    ``checkpoint`` is ``"save"`` (into ``root``) or ``"load"`` (from it)."""
    return {"parity": parity(rank, world, parity_cases()), "edges": edges(rank, world),
            "ddp": {mode: ddp(rank, world, mode) for mode in ("owner", "replicate")},
            "state": state_split(rank, world), "fsdp": fsdp(rank, world),
            "fully_sharded": fully_sharded(rank, world, root),
            "checkpoint": (checkpoint_save if checkpoint == "save" else checkpoint_load)(rank, world, root)}


# --- checkpoints through torch.distributed.checkpoint ---------------------------------------------------
CHECKPOINT_AT = 2 * EVERY - 1  # saved one step before the second refresh; the 3 steps after it cross it
AFTER = 3
CHECKPOINT_CASES = [("shampoo", "owner", False), ("soap", "owner", True), ("kl_shampoo", "replicate", False)]
"""(preset, mode, flatten_optimizer_state_dict)."""


def checkpoint_name(case) -> str:
    return "-".join(map(str, case))


def checkpoint_net() -> torch.nn.Module:
    gen = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def checkpoint_gradients(model: torch.nn.Module, step: int) -> None:
    for i, p in enumerate(model.parameters()):
        gen = torch.Generator().manual_seed(100 * step + i)
        p.grad = torch.randn(p.shape, generator=gen)


def checkpoint_optimizer(model, preset: str, mode: str | None) -> precond.Optimizer:
    distributed = None if mode is None else precond.DataParallel(mode=mode)
    return getattr(precond, preset)(model.parameters(), lr=1e-2, every=EVERY, stagger=True, distributed=distributed)


def run_steps(model, optimizer, steps) -> list[torch.Tensor]:
    for step in steps:
        checkpoint_gradients(model, step)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def state_keys(state: dict[str, Any], prefix: str = "") -> dict[str, tuple]:
    """Flattened ``{path: (shape, dtype)}`` of the tensors of an optimizer state dict's ``state``."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(state_keys(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = (tuple(value.shape), value.dtype)
    return out


def _options(flatten: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(flatten_optimizer_state_dict=flatten)


def _tensor_keys(osd: dict[str, Any], flatten: bool) -> dict[str, tuple]:
    if flatten:
        return {k: (tuple(v.shape), v.dtype) for k, v in osd.items() if k.startswith("state.") and
                isinstance(v, torch.Tensor)}
    return state_keys(osd["state"], "state.")


def checkpoint_save(rank: int, world: int, root: str) -> dict[str, Any]:
    """Train ``CHECKPOINT_AT`` steps, save with DCP, go on ``AFTER`` steps (the uninterrupted run). Also the keys a
    fresh optimizer gets from DCP's initialisation (a zero-gradient, lr-0 step) next to the trained one's."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    out = {}
    for case in CHECKPOINT_CASES:
        preset, mode, flatten = case
        model = checkpoint_net()
        optimizer = checkpoint_optimizer(model, preset, mode)
        run_steps(model, optimizer, range(1, CHECKPOINT_AT + 1))
        osd = get_optimizer_state_dict(model, optimizer, options=_options(flatten))
        dcp.save({"model": model.state_dict(), "optim": osd}, checkpoint_id=f"{root}/{checkpoint_name(case)}")
        trained = _tensor_keys(osd, flatten)
        fresh_model = checkpoint_net()
        fresh = checkpoint_optimizer(fresh_model, preset, mode)
        fresh_keys = _tensor_keys(get_optimizer_state_dict(fresh_model, fresh, options=_options(flatten)), flatten)
        unchanged = all(torch.equal(a, b)
                        for a, b in zip(fresh_model.parameters(), checkpoint_net().parameters(), strict=True))
        after = run_steps(model, optimizer, range(CHECKPOINT_AT + 1, CHECKPOINT_AT + AFTER + 1))
        out[checkpoint_name(case)] = {"after": after, "keys": trained, "fresh_keys": fresh_keys,
                                      "fresh_unchanged": unchanged}
    return out


def checkpoint_load(rank: int, world: int, root: str) -> dict[str, Any]:
    """Build afresh at this world size, load the checkpoint through DCP, go on ``AFTER`` steps."""
    out = dcp_resume(rank, world, root)
    out["helpers"] = _resume_with_helpers(root)
    out["plain"] = _resume_from_a_single_process_state_dict()
    return out


def dcp_resume(rank: int, world: int, root: str) -> dict[str, Any]:
    """The DCP part of :func:`checkpoint_load`: each of ``CHECKPOINT_CASES`` loaded from ``root`` at this world
    size, then ``AFTER`` steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    out = {}
    for case in CHECKPOINT_CASES:
        preset, mode, flatten = case
        model = checkpoint_net()
        optimizer = checkpoint_optimizer(model, preset, mode)
        state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, optimizer,
                                                                               options=_options(flatten))}
        dcp.load(state, checkpoint_id=f"{root}/{checkpoint_name(case)}")
        model.load_state_dict(state["model"])
        set_optimizer_state_dict(model, optimizer, state["optim"], options=_options(flatten))
        after = run_steps(model, optimizer, range(CHECKPOINT_AT + 1, CHECKPOINT_AT + AFTER + 1))
        out[checkpoint_name(case)] = {"after": after}
    return out


def _resume_with_helpers(root: str) -> list[torch.Tensor]:
    """``precond.distributed.checkpoint.save`` by every rank of this world, ``load`` into a fresh pair."""
    from precond.distributed import checkpoint

    model = checkpoint_net()
    optimizer = checkpoint_optimizer(model, "shampoo", "owner")
    run_steps(model, optimizer, range(1, CHECKPOINT_AT + 1))
    checkpoint.save(model, optimizer, f"{root}/helpers-{dist.get_world_size()}")
    model = checkpoint_net()
    optimizer = checkpoint_optimizer(model, "shampoo", "owner")
    checkpoint.load(model, optimizer, f"{root}/helpers-{dist.get_world_size()}")
    return run_steps(model, optimizer, range(CHECKPOINT_AT + 1, CHECKPOINT_AT + AFTER + 1))


def _resume_from_a_single_process_state_dict() -> list[torch.Tensor]:
    """A plain (single-process) ``state_dict`` loaded into an owner-mode optimizer on every rank: each rank keeps
    the share it owns and the run goes on as if uninterrupted."""
    model = checkpoint_net()
    single = checkpoint_optimizer(model, "shampoo", None)
    run_steps(model, single, range(1, CHECKPOINT_AT + 1))
    saved = single.state_dict()
    resumed = checkpoint_net()
    resumed.load_state_dict(model.state_dict())
    optimizer = checkpoint_optimizer(resumed, "shampoo", "owner")
    optimizer.load_state_dict(saved)
    return run_steps(resumed, optimizer, range(CHECKPOINT_AT + 1, CHECKPOINT_AT + AFTER + 1))


# --- FSDP2: hand-built DTensor parameters sharded by rows ---------------------------------------------------
FSDP_SHAPES = [(4, 3), (5,), (7, 4), (3, 4, 5), (2, 6), (4, 3)]
"""At W=3 the row shards are 2+2+0, 2+2+1, 3+3+1, 1+1+1, 1+1+0, 2+2+0 (uneven and empty shards)."""
FSDP_CASES = [{"preset": p, "stack": True, "stagger": True} for p in PRESETS] + [
    {"preset": "shampoo", "stack": False, "stagger": False}]


def fsdp(rank: int, world: int) -> dict[str, Any]:
    """Every preset on DTensor parameters (``Shard(0)`` on a CPU mesh), gradients set as DTensors by hand: the
    full parameters after ``STEPS`` steps; and the messages of refused parameter types."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}
    for case in FSDP_CASES:
        for comm in (torch.float32, torch.bfloat16) if case["preset"] == "shampoo" else (torch.float32,):
            params = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))
                      for p in make_params(FSDP_SHAPES)]
            optimizer = make_optimizer(case, params, precond.DataParallel(comm_dtype=comm))
            for step in range(1, STEPS + 1):
                for i, p in enumerate(params):
                    full = p.detach().full_tensor()
                    gen = torch.Generator().manual_seed(1000 * step + i)
                    grad = torch.randn(full.shape, generator=gen) + 0.5 * full**3
                    p.grad = None if i in MISSING.get(step, ()) else distribute_tensor(grad, mesh, [Shard(0)])
                optimizer.step()
            out[f"{case_name(case)}-{comm}"] = {"params": [p.detach().full_tensor() for p in params],
                                                "traffic": traffic(optimizer), "bytes": state_bytes(optimizer)}
    refused = {}
    full = torch.zeros(4, 3)
    attempts = {
        "replicate-placement": [torch.nn.Parameter(distribute_tensor(full, mesh, [Replicate()]))],
        "shard-1": [torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(1)]))],
        "mixed": [torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)])), torch.nn.Parameter(full.clone())],
    }
    for name, params in attempts.items():
        refused[name] = _refusal(lambda params=params: precond.shampoo(params, distributed=precond.DataParallel()))
    refused["replicate-mode"] = _refusal(lambda: precond.shampoo(
        [torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))],
        distributed=precond.DataParallel(mode="replicate")))
    out["refused"] = refused
    return out


def _refusal(build) -> str:
    try:
        build()
    except (TypeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return "accepted"


def alone(rank: int, world: int, root: str) -> dict[str, Any]:
    """The one-rank run: resume the checkpoints saved at W=2, and the distributed benchmark at world size 1."""
    from precond.bench import distributed as bench

    out = {"checkpoint": checkpoint_load(rank, world, root)}
    for what in ("step", "train"):
        argv = [*BENCH_ARGS, "--json", f"{root}/bench-{what}.json"] + (["--train"] if what == "train" else [])
        out[f"bench-{what}"] = bench.run(bench.resolve(bench.parser().parse_args(argv), cuda=False))
    return out


BENCH_ARGS = ["--preset", "shampoo", "--shapes", "small", "--max-dim", "32", "--every", "2", "--steps", "2",
              "--warmup", "1", "--batch", "2", "--length", "16"]


def fully_sharded(rank: int, world: int, root: str) -> dict[str, Any]:
    """A real ``fully_shard`` model (each Linear and the root; 4 rows over 3 ranks give an empty shard), each rank
    its own samples: the full parameters after ``STEPS`` steps; and a DCP save after ``CHECKPOINT_AT`` steps loaded
    into a fresh sharded model, both then going on ``AFTER`` steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from precond.distributed import checkpoint

    mesh = init_device_mesh("cpu", (world,))

    def sharded():
        model = checkpoint_net().double()
        for layer in (model[0], model[2], model[4], model):
            fully_shard(layer, mesh=mesh)
        return model, precond.shampoo(model.parameters(), lr=3e-2, every=EVERY, state_dtype=torch.float64,
                                      distributed=precond.DataParallel(comm_dtype=torch.float64))

    def train_steps(model, optimizer, steps):
        for step in steps:
            x, y = batch(step, PER_RANK * world)
            x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
            torch.nn.functional.mse_loss(model(x[:, :6]), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return [p.detach().full_tensor() for p in model.parameters()]

    model, optimizer = sharded()
    train_steps(model, optimizer, range(1, CHECKPOINT_AT + 1))
    checkpoint.save(model, optimizer, f"{root}/fully-sharded-{world}")
    after = train_steps(model, optimizer, range(CHECKPOINT_AT + 1, CHECKPOINT_AT + AFTER + 1))
    model, optimizer = sharded()
    checkpoint.load(model, optimizer, f"{root}/fully-sharded-{world}")
    resumed = train_steps(model, optimizer, range(CHECKPOINT_AT + 1, CHECKPOINT_AT + AFTER + 1))
    return {"after": after, "resumed": resumed}


def concatenated_reference(world: int) -> list[torch.Tensor]:
    """One process on all ranks' samples, for :func:`fully_sharded`."""
    model = checkpoint_net().double()
    optimizer = precond.shampoo(model.parameters(), lr=3e-2, every=EVERY, state_dtype=torch.float64)
    for step in range(1, CHECKPOINT_AT + AFTER + 1):
        x, y = batch(step, PER_RANK * world)
        torch.nn.functional.mse_loss(model(x[:, :6]), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


# --- four ranks: DCP at W=4 (loaded at 2 and 1 by ``dcp_resume``), and a 2 × 2 mesh ------------------------
HSDP_CASES = [{"preset": "shampoo", "stagger": False}, {"preset": "soap", "stagger": True},
              {"preset": "kl_shampoo", "stagger": True}]


def rank_gradients(params, step: int, rank: int) -> list[torch.Tensor | None]:
    """Rank ``rank``'s own gradients at ``step`` (each rank its own samples), ``None`` where ``MISSING``."""
    out = []
    for i, p in enumerate(params):
        if i in MISSING.get(step, ()):
            out.append(None)
            continue
        gen = torch.Generator().manual_seed(10_000 * rank + 1000 * step + i)
        out.append(torch.randn(p.shape, generator=gen) + 0.5 * p.detach().float() ** 3)
    return out


def hsdp_average(per_rank: list[torch.Tensor]) -> torch.Tensor:
    """The average of 4 ranks' gradients as the 2 × 2 mesh computes it: across the replica groups first (ranks
    r and r + 2), then within the owner group (ranks 0 and 1). Sums of two floats are commutative, so this is the
    same bits on every rank and in one process."""
    g0, g1, g2, g3 = per_rank
    return ((g0 + g2) / 2 + (g1 + g3) / 2) / 2


def hsdp_trajectory(case: dict[str, Any], mesh=None) -> tuple[list[torch.Tensor], Any]:
    """``STEPS`` steps of ``case``: on a 2 × 2 mesh (``("replicate", "owner")``: gradients averaged across
    replica groups, then within the owner group, which runs owner mode over its 2 ranks), or, without a mesh, one
    process stepping :func:`hsdp_average` of the 4 ranks' gradients."""
    params = make_params()
    distributed = None
    if mesh is not None:
        distributed = precond.DataParallel(mode="owner", group=mesh.get_group("owner"))
        across, within = mesh.get_group("replicate"), mesh.get_group("owner")
    optimizer = make_optimizer(case, params, distributed)
    for step in range(1, STEPS + 1):
        if mesh is None:
            grads = [rank_gradients(params, step, r) for r in range(4)]
            for i, p in enumerate(params):
                p.grad = None if grads[0][i] is None else hsdp_average([g[i] for g in grads])
        else:
            for p, g in zip(params, rank_gradients(params, step, dist.get_rank()), strict=True):
                if g is not None:
                    for group in (across, within):
                        dist.all_reduce(g, group=group)
                        g /= 2
                p.grad = g
        optimizer.step()
    return [p.detach().clone() for p in params], optimizer


def four(rank: int, world: int, root: str) -> dict[str, Any]:
    """W=4: the DCP save of ``checkpoint_save`` (into ``root``), and the 2 × 2 mesh's trajectories."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "owner"))
    hsdp = {}
    for case in HSDP_CASES:
        params, optimizer = hsdp_trajectory(case, mesh)
        hsdp[case_name(case)] = {"params": params, "bytes": state_bytes(optimizer),
                                 "owned": [owner_of(optimizer, p) for g in optimizer.param_groups
                                           for p in g["params"]]}
    return {"checkpoint": checkpoint_save(rank, world, root), "hsdp": hsdp}
