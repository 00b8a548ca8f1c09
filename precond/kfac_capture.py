"""K-FAC's statistics: layer inputs ``a`` and output gradients ``g`` captured by module hooks.

:class:`KFACCapture` registers, on every ``nn.Linear`` and ``nn.Conv2d`` of a model, a forward hook that keeps the
layer's input and puts a tensor hook on its output, which keeps each gradient that flows back into it. The K-FAC
estimator (``estimators.KFAC``) reads, for the parameters of a state (``ParamState.params``), the step's factors

- ``A_t = Σ_rows a aᵀ / n_rows``                               (input side; Martens & Grosse 2015, Eq. 1)
- ``G_t = Σ_backward s · Σ_rows g gᵀ``                          (output side)

where a *row* is one example, or one position of an example for weight sharing (a token of a sequence fed to a
``Linear``; a patch of ``torch.nn.functional.unfold`` for a ``Conv2d``, Grosse & Martens 2016): this is
"K-FAC-expand" (Eschenhagen et al. 2023), curvlinops' default. The bias's ``ones`` column of ``[W | b]`` only
enters through its own block, ``E[1·1] = 1``: the bias is preconditioned by ``G`` alone and the weight by ``A⊗G``
(curvlinops' ``separate_weight_and_bias=True``; the ``W``–``b`` cross terms of the joint ``[a; 1]`` factor are
dropped).

Scale ``s`` (curvlinops' convention, so that ``A⊗G`` approximates the curvature of the loss *as reduced*): a
gradient of a mean-reduced loss carries ``1/m`` for the ``m`` terms the mean runs over, and a per-example gradient
is ``m·g``; with ``reduction="mean"``, ``s = m`` and ``G_t = (1/m) Σ ĝĝᵀ`` in per-example gradients ``ĝ`` (the
Fisher of the mean loss); with ``"sum"``, ``s = 1`` (the Fisher of the summed loss). ``loss_terms`` says what
``m`` is: ``"batch"`` the leading dimension of the layer's input (one loss term per example: classifiers,
regressors), ``"rows"`` every row (a per-token loss of a sequence model), or a number (e.g. ``N·C`` for
``MSELoss(reduction="mean")``, which also averages over the ``C`` outputs; or the total over micro-batches when
the losses of an accumulated step are divided by their count).

Which gradients are captured is up to the caller: every backward pass through a captured forward adds to
``G_t`` (the empirical Fisher with the training loss; a Monte-Carlo or type-2 Fisher when the caller back-propagates
sampled losses or loss-Hessian square-root columns through the same forward, and the training loss's backward inside
:meth:`KFACCapture.paused`). A forward whose output receives no gradient adds nothing, so an evaluation forward is
harmless; forwards under ``torch.no_grad()`` or :meth:`KFACCapture.paused` are not recorded at all. Statistics are
recorded on the steps where ``steps % factor_every == 0`` (the factor update frequency, kfac-pytorch's
``factor_update_steps``); :meth:`KFACCapture.attach` makes an optimizer's step advance the count and drop the step's
records.

**Data-parallel training** (DDP, or ``precond.DataParallel``): each rank records only its own examples, so its
``A_t``, ``G_t`` are those of its share of the batch, while DDP averages the gradients over the ranks. As kfac-pytorch
(which all-reduces the factor contributions), the capture averages the step's statistics over the ranks of a process
group before any estimator reads them, so every rank's factors are those of the global batch:

- ``A_t ← (1/W) Σ_r A_t^{(r)}`` and ``G_t ← (1/W) Σ_r G_t^{(r)}`` (averaged over the ``W`` ranks that recorded the
  layer; in the form the estimator reads: the dense matrix, or its diagonal for a mode above ``max_dim``, in the
  optimizer's ``state_dtype``). With ``reduction="mean"`` and equal per-rank batches of ``m`` examples (``M = W m``)
  this is exactly the global batch's: ``A`` is a mean over rows, and ``G^{(r)} = m Σ_{n∈r} g g ᵀ`` with ``g`` carrying
  ``1/m``, i.e. ``(1/m) Σ_{n∈r} ∂ℓ_n ∂ℓ_nᵀ``, whose mean over ranks is ``(1/M) Σ_n ∂ℓ_n ∂ℓ_nᵀ``: the Fisher of the
  mean of the per-rank means that DDP's averaged gradient belongs to. With ``reduction="sum"`` the average is
  ``1/W`` of the global sum, as DDP's averaged gradient is ``1/W`` of the global sum's, so the K-FAC step is the
  global one (damping aside).
- the per-example moments of EKFAC (``rotated_moment``) are averaged the same way; the loss-term count ``s`` of
  ``moment="batch"`` (``loss_scale``) is summed (``M = Σ_r m_r``), since ``V`` folds ``s · R ⊙ R`` of the averaged
  gradient ``R``.

The factors are averaged in one all-reduce at the start of each recording step's ``optimizer.step()`` (a step
pre-hook that :meth:`KFACCapture.attach` registers), by every rank, whatever it owns; only EKFAC's per-example moment,
which needs the Kronecker bases, is averaged where it is read (one all-reduce per parameter), which every rank does
only when every rank keeps every state: plain DDP or ``DataParallel(mode="replicate")``. Owner mode refuses it
(``moment="batch"`` works there). The process group is ``KFACCapture(group=...)``: ``"auto"`` (default) takes, in
order, the group of the attached optimizer's ``distributed=precond.DataParallel(group=...)``, the ``process_group``
of a ``DistributedDataParallel`` model given to the capture, or the default group whenever ``torch.distributed`` is
initialised (kfac-pytorch's rule); ``"local"`` never averages (each rank its own statistics); ``None`` is the default
group and a ``ProcessGroup`` that group. A group of one rank, or an uninitialised ``torch.distributed`` with
``"auto"``, issues no collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import attrs
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from precond import compatibility
from precond.parts import Side
from precond.validators import is_integer, number, one_of, plain_number

__all__ = ["KFACCapture", "LossTerms"]

LossTerms = Literal["batch", "rows"] | int


def _loss_terms_valid(instance: Any, attribute: Any, value: Any) -> None:
    if value in ("batch", "rows") and isinstance(value, str):
        return
    if is_integer(value) and value >= 1:
        return
    raise ValueError(f"loss_terms (how many terms a mean-reduced loss averages over) must be 'batch', 'rows' or a "
                     f"positive integer, got {value!r}")


@attrs.define(eq=False)
class _Call:
    """One recorded forward of a layer: its (detached) input and the gradients its output received."""

    inputs: torch.Tensor
    grads: list[torch.Tensor] = attrs.field(factory=list)


@attrs.define(eq=False)
class _Layer:
    """A captured module, its recorded calls of the current step, and whether an estimator has read them."""

    name: str
    module: nn.Module
    calls: list[_Call] = attrs.field(factory=list)
    consumed: bool = False

    # --- rows: (B, S, d) with S the weight-sharing positions of one example -------------------------------
    def input_rows(self, call: _Call) -> torch.Tensor:
        x = call.inputs
        module = self.module
        if isinstance(module, nn.Conv2d):
            if x.ndim == 3:
                x = x.unsqueeze(0)
            padding: Any = module.padding
            if isinstance(padding, str) or module.padding_mode != "zeros":  # as Conv2d._conv_forward pads
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
                padding = 0
            patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
            return patches.transpose(1, 2)  # (B, L, C·kh·kw), the row-major order of weight.view(out, -1)
        d_in = module.in_features
        return x.reshape(1, 1, d_in) if x.ndim == 1 else x.reshape(x.shape[0], -1, d_in)

    def output_rows(self, grad: torch.Tensor) -> torch.Tensor:
        if isinstance(self.module, nn.Conv2d):
            if grad.ndim == 3:
                grad = grad.unsqueeze(0)
            return grad.flatten(2).transpose(1, 2)  # (B, L, out)
        d_out = self.module.out_features
        return grad.reshape(1, 1, d_out) if grad.ndim == 1 else grad.reshape(grad.shape[0], -1, d_out)


GROUP_CHOICES = ("auto", "local")
"""The named values of ``KFACCapture(group=...)`` besides ``None`` (the default group) and a ``ProcessGroup``."""


def _counted(local: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> list[torch.Tensor]:
    """One rank's contribution to an average over the ranks that recorded a layer: its statistic (zeros where it
    recorded nothing) and a count of 1 (or 0), summed by one all-reduce and divided afterwards."""
    value = torch.zeros(shape, dtype=dtype, device=device) if local is None else local.to(device)
    return [value, torch.ones(1, dtype=dtype, device=device) * (local is not None)]


def _unsupported(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped convolution (groups={module.groups}) has one factor pair per group; not captured"
    return None


@attrs.define(slots=False, eq=False, init=False)
class KFACCapture:
    """Module hooks that capture K-FAC's layer statistics for an estimator (module docstring for the math).

    ``KFACCapture(model, reduction="mean", loss_terms="batch", factor_every=1)`` registers its hooks at once on
    every ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``) of ``model`` with a trainable parameter that no other module
    shares (a tied weight's gradient is not its layer's alone); :attr:`skipped` says which modules were left out and
    why. Only the configuration fields are attrs fields: the description a checkpoint stores is plain data, and a
    fresh capture with the same settings loads it.

    ``group``: the process group the statistics are averaged over in data-parallel training (module docstring):
    ``"auto"`` (default; the attached optimizer's ``DataParallel`` group, else a DDP model's, else the default group
    when ``torch.distributed`` is initialised), ``"local"`` (never averaged), ``None`` (the default group) or a
    ``ProcessGroup``. It is run-time wiring, not configuration: not stored in checkpoints.
    """

    reduction: Literal["mean", "sum"] = attrs.field(validator=one_of(("mean", "sum")))
    loss_terms: LossTerms = attrs.field(converter=plain_number, validator=_loss_terms_valid)
    factor_every: int = attrs.field(converter=plain_number,
                                    validator=number(low=1, integer=True, meaning="the factor update period"))

    def __init__(self, model: nn.Module, reduction: Literal["mean", "sum"] = "mean", loss_terms: LossTerms = "batch",
                 factor_every: int = 1, group: Any = "auto") -> None:
        self.__attrs_init__(reduction, loss_terms, factor_every)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"KFACCapture needs the model (an nn.Module) to hook its layers, got {type(model).__name__}"
            )
        if isinstance(group, str) and group not in GROUP_CHOICES:
            raise ValueError(f"group (the ranks K-FAC's statistics are averaged over) must be 'auto', 'local', None "
                             f"(the default process group) or a torch.distributed ProcessGroup, got {group!r}")
        self.group = group
        """See the class docstring; may be changed before the first step."""
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self._model_group: tuple[bool, Any] = (ddp, model.process_group if ddp else None)
        self._optimizer_group: tuple[bool, Any] = (False, None)  # (attached to a DataParallel optimizer, its group)
        self._owner_mode = False
        self._averaged: _Averaged | None = None
        self.steps = 0
        """Optimizer steps completed (advanced by :meth:`advance`); statistics are recorded when it is a multiple of
        ``factor_every``."""
        self.skipped: dict[str, str] = {}
        self._loaded_steps: int | None = None  # a checkpoint's count, set once its load succeeded
        self._paused = False
        self._discarded = False  # this step was refused or skipped by the optimizer (discard): not counted
        self._layers: dict[int, tuple[_Layer, str]] = {}
        self._params: list[torch.Tensor] = []
        self._names: dict[int, str] = {}
        self._handles: list[Any] = []
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            reason = _unsupported(module)
            own = [(role, p) for role, p in module.named_parameters(recurse=False) if p.requires_grad]
            if reason is None and any(owners[id(p)] > 1 for _, p in own):
                reason = "a parameter is shared with another module; not captured"
            if reason is not None:
                self.skipped[name] = reason
                continue
            if not own:
                continue
            layer = _Layer(name or type(module).__name__, module)
            for role, p in own:
                self._layers[id(p)] = (layer, role)
                self._params.append(p)
                self._names[id(p)] = f"{layer.name}.{role}"
            self._handles.append(module.register_forward_hook(_ForwardHook(self, layer)))

    # --- hooks ---------------------------------------------------------------------------------------
    @property
    def due(self) -> bool:
        """Whether the current step records statistics (``steps mod factor_every = 0``)."""
        return self.steps % self.factor_every == 0

    def _record(self, layer: _Layer, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        """Record one forward of ``layer`` (:class:`_ForwardHook` calls it): its input now, and a tensor hook on its
        output that keeps each gradient flowing back into it."""
        if self._paused or not self.due or not torch.is_grad_enabled():
            return
        if not inputs or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return  # (an input passed by keyword only is not seen by the hook: nothing is recorded)
        if layer.consumed:  # an estimator read the previous step's records and no optimizer cleared them
            layer.calls.clear()
            layer.consumed = False
        call = _Call(inputs[0].detach())

        def on_gradient(grad: torch.Tensor) -> None:
            if self._paused:
                return
            if not call.grads:
                layer.calls.append(call)
            call.grads.append(grad.detach())

        output.register_hook(on_gradient)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside: neither forwards nor the gradients of earlier forwards (evaluation, or the
        training loss's backward when ``G`` comes from other backward passes)."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def advance(self) -> None:
        """One optimizer step is done: count it and drop the step's records."""
        self.steps += 1
        self._drop_records()

    def discard(self) -> None:
        """The optimizer refused this step (``on_nonfinite="raise"``) or skipped it (``"skip"``): drop its records
        without counting it, so that the step redone, or the next one, records anew on the same factor-update phase,
        as if the refused step had never run (``precond.Optimizer`` calls it for the captures attached to it)."""
        self._discarded = True
        self._drop_records()

    def _drop_records(self) -> None:
        self._averaged = None
        for layer, _ in self._layers.values():
            layer.calls.clear()
            layer.consumed = False

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._discarded = False
        self.synchronize(optimizer)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._discarded:  # a skipped step (a refused one raises before the post hooks): not counted
            self._discarded = False
            return
        self.advance()

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Call :meth:`advance` after every ``optimizer.step()``, and keep the step count (the factor-update phase) in
        the optimizer's ``state_dict`` under ``"kfac_capture"`` so that a resumed run records on the same steps;
        returns the step hook's removable handle. In data-parallel training it also averages the statistics over the
        ranks at the start of every step (:meth:`synchronize`; module docstring), taking the process group of the
        optimizer's ``distributed=precond.DataParallel(...)`` when ``group="auto"``; ``overlap_backward=True`` is
        refused here when the statistics are averaged (the rule ``overlap_averaged_statistics`` of
        ``precond.compatibility.RUN_TIME_RULES``: the layers are stepped during the backward pass, before the step's
        statistics could be averaged).

        A ``precond.Optimizer`` keeps the capture: a step it refuses or skips (``on_nonfinite``) calls
        :meth:`discard`, and a copy of it (``copy.deepcopy``, pickle; with the model, whose hooks hold the copied
        capture) attaches the copied capture again."""
        config = getattr(optimizer, "distributed", None)  # precond.Optimizer's distributed=DataParallel(...)
        self._optimizer_group = (config is not None, None if config is None else config.group)
        self._owner_mode = config is not None and config.mode == "owner"
        self._refuse_what_cannot_be_averaged(optimizer)
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_state_dict_post_hook(self._save_steps)
        optimizer.register_load_state_dict_pre_hook(self._take_steps)
        optimizer.register_load_state_dict_post_hook(self._set_steps)
        handle = optimizer.register_step_post_hook(self._after_step)
        keep = getattr(optimizer, "keep_attached", None)  # precond.Optimizer
        if keep is not None:
            keep(self)
        return handle

    # --- data-parallel averaging (module docstring) -------------------------------------------------------------
    def averaging_group(self) -> tuple[Any, int] | None:
        """``(group, W)``: the process group this step's statistics are averaged over and its size, or ``None`` when
        nothing is averaged (``group="local"``, ``torch.distributed`` not initialised under ``"auto"``, or one
        rank)."""
        if isinstance(self.group, str) and self.group == "local":
            return None
        if not (dist.is_available() and dist.is_initialized()):
            if isinstance(self.group, str):
                return None
            raise RuntimeError("KFACCapture(group=...) names a process group, but torch.distributed is not "
                               "initialised: call torch.distributed.init_process_group(...) first, or pass "
                               "group='local'")
        if not isinstance(self.group, str):
            group = self.group
        elif self._optimizer_group[0]:
            group = self._optimizer_group[1]
        elif self._model_group[0]:
            group = self._model_group[1]
        else:
            group = None  # the default group (kfac-pytorch averages over the world whenever it is initialised)
        world = dist.get_world_size(group)
        return None if world == 1 else (group, world)

    def _refuse_what_cannot_be_averaged(self, optimizer: torch.optim.Optimizer) -> None:
        """``overlap_backward=True`` while the statistics are averaged over the ranks (plain DDP: with
        ``precond.DataParallel`` the table's ``overlap_distributed`` refused it at construction)."""
        averaged = self.averaging_group() is not None  # (raises for a named group without torch.distributed)
        if averaged and getattr(optimizer, "overlap_backward", False):
            features = frozenset({compatibility.OVERLAP, compatibility.AVERAGED_STATISTICS})
            raise compatibility.Incompatible(compatibility.BY_NAME["overlap_averaged_statistics"], features, {})

    def _requests(self, optimizer: torch.optim.Optimizer) -> list[tuple[_Layer, Side, bool]]:
        """What the estimators of ``optimizer`` read this step, in the order every rank agrees on (param groups,
        parameters, sides): ``(layer, side, diagonal)`` for each factor of a captured parameter whose group's
        estimator builds its factors from whole layers (``needs_whole_parameters``), as ``KFAC.update`` reads it
        (the dense matrix for a dense mode, the diagonal for a diagonal one, nothing for a mode without factor)."""
        out: list[tuple[_Layer, Side, bool]] = []
        seen: set[tuple[int, str, bool]] = set()
        for group in optimizer.param_groups:
            preconditioner = group.get("preconditioner")
            if preconditioner is None or not preconditioner.estimator.needs_whole_parameters:
                continue
            for p in group["params"]:
                if id(p) not in self._layers:
                    continue
                layer, role = self._layers[id(p)]
                sides: tuple[Side, ...] = ("output", "input") if role == "weight" else ("output",)
                layout = preconditioner.plan(p.shape)
                if len(layout.kinds) != len(sides):
                    continue  # not K-FAC's view: the estimator refuses it with its own message
                for side, kind in zip(sides, layout.kinds, strict=True):
                    key = (id(layer), side, kind != "dense")
                    if kind != "none" and key not in seen:
                        seen.add(key)
                        out.append((layer, side, kind != "dense"))
        return out

    def synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        """Average this step's statistics over :meth:`averaging_group` (a collective: every rank calls it at the start
        of every step, through the hook :meth:`attach` registers). On a recording step, one all-reduce (sum) of
        every requested factor, each followed by a 1 if this rank recorded its layer (else zeros and 0), and of
        every layer's loss scale and count; then ``factor = Σ / count`` and ``loss_scale = Σ``. Nothing happens
        without averaging or between factor updates (every rank agrees: the step count is the same)."""
        self._averaged = None
        target = self.averaging_group()
        if target is None or not self.due:
            return
        group, world = target
        requests = self._requests(optimizer)
        layers = list({id(layer): layer for layer, _, _ in requests}.values())
        if not layers:
            return
        dtype = optimizer.state_dtype
        device = layers[0].module.weight.device
        pieces: list[torch.Tensor] = []
        shapes: list[tuple[int, ...]] = []
        for layer, side, diagonal in requests:
            d = self._width(layer, side)
            shape = (d,) if diagonal else (d, d)
            pieces += _counted(self._factor(layer, side, diagonal, dtype), shape, dtype, device)
            shapes.append(shape)
        for layer in layers:
            scale = self._loss_scale(layer)
            pieces.append(torch.tensor([0.0 if scale is None else scale, float(scale is not None)], dtype=dtype,
                                       device=device))
        flat = torch.cat([piece.reshape(-1) for piece in pieces])
        dist.all_reduce(flat, group=group)
        starts, offset = [], 0
        for shape in shapes:
            starts.append(offset)
            offset += torch.Size(shape).numel() + 1
        # every count and loss scale read back in one transfer (not one host synchronisation per factor)
        counts = flat[[start + torch.Size(shape).numel() for start, shape in zip(starts, shapes, strict=True)]]
        read = torch.cat([counts, flat[offset:]]).tolist()
        counts_read, scale_pairs = read[:len(shapes)], read[len(shapes):]
        factors: dict[tuple[int, str, bool], torch.Tensor | None] = {}
        for (layer, side, diagonal), shape, start, count in zip(requests, shapes, starts, counts_read, strict=True):
            total = flat[start:start + torch.Size(shape).numel()].view(shape)
            factors[(id(layer), side, diagonal)] = total / flat[start + total.numel()] if count > 0 else None
        scales: dict[int, float | None] = {}
        for i, layer in enumerate(layers):
            total, count = scale_pairs[2 * i:2 * i + 2]
            scales[id(layer)] = total if count > 0 else None
        self._averaged = _Averaged(dtype, factors, scales)

    def _must_average(self) -> bool:
        """Whether this step's statistics are averaged over ranks but :meth:`synchronize` has not run (an estimator
        read them outside ``optimizer.step()``, or the capture is not attached)."""
        return self._averaged is None and self.due and self.averaging_group() is not None

    def _not_averaged(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"K-FAC's {what} must be averaged over the ranks (this capture's group has more than one), which happens "
            "at the start of optimizer.step() for the optimizer the capture is attached to (capture.attach(optimizer); "
            "precond.kfac does it), but it was read before that or for a parameter that optimizer does not step with "
            "K-FAC: step through that optimizer, or give the capture group='local' to use each rank's own statistics")

    @staticmethod
    def _width(layer: _Layer, side: Side) -> int:
        """``d`` of ``side``: the layer's output width, or its fan-in (``in·kh·kw`` for a ``Conv2d``)."""
        weight = layer.module.weight
        return weight.shape[0] if side == "output" else weight[0].numel()

    def _save_steps(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        return {**state_dict, "kfac_capture": {"steps": self.steps}}

    def _take_steps(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Take the step count out of a checkpoint; it is set only once the load succeeded (:meth:`_set_steps`), and a
        checkpoint without it (older ones) leaves the count alone."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("kfac_capture", None)
        self._loaded_steps = None if saved is None else int(saved["steps"])
        return state_dict

    def _set_steps(self, optimizer: torch.optim.Optimizer) -> None:
        if self._loaded_steps is not None:
            self.steps, self._loaded_steps = self._loaded_steps, None

    def __getstate__(self) -> dict[str, Any]:
        """The capture's attributes for ``copy.deepcopy`` and pickle, with the tables keyed by ``id(p)`` stored in the
        order of the captured parameters (a copy's parameters are other tensors, and :meth:`__setstate__` keys them
        again). The module hooks travel with the modules (:class:`_ForwardHook` holds the capture); the optimizer's
        step hooks are registered again when the copied ``precond.Optimizer`` attaches the copy (:meth:`attach`)."""
        state = dict(self.__dict__)
        state["_layers"] = [self._layers[id(p)] for p in self._params]
        state["_names"] = [self._names[id(p)] for p in self._params]
        state["_averaged"] = None  # one step's averages, keyed by id(layer); only set inside a step
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        layers, names = state.pop("_layers"), state.pop("_names")
        self.__dict__.update(state)
        self._layers = {id(p): entry for p, entry in zip(self._params, layers, strict=True)}
        self._names = {id(p): name for p, name in zip(self._params, names, strict=True)}

    def remove(self) -> None:
        """Remove the module hooks (the capture records nothing afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- what the estimator reads ------------------------------------------------------------------------
    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        """The captured parameters (weights and biases of the hooked layers), in module order."""
        return tuple(self._params)

    def name(self, p: torch.Tensor) -> str:
        return self._names.get(id(p), f"of shape {tuple(p.shape)}")

    def _entry(self, p: torch.Tensor) -> tuple[_Layer, str]:
        if id(p) not in self._layers:
            raise KeyError(f"parameter of shape {tuple(p.shape)} is not captured by this KFACCapture (only the "
                           "trainable weights and biases of its model's nn.Linear/nn.Conv2d layers are); give it "
                           "another preconditioner, e.g. through a param group")
        return self._layers[id(p)]

    def role(self, p: torch.Tensor) -> str:
        """``"weight"`` or ``"bias"``; a clear error for a parameter this capture does not hook."""
        return self._entry(p)[1]

    def has_statistics(self, p: torch.Tensor) -> bool:
        """Whether the current step recorded a forward of ``p``'s layer that received a gradient."""
        return bool(self._entry(p)[0].calls)

    def mark_consumed(self, params: Sequence[torch.Tensor]) -> None:
        """The estimator has folded these parameters' records; the layer's next forward starts a new step."""
        for p in params:
            if id(p) in self._layers:
                self._layers[id(p)][0].consumed = True

    def _scale(self, rows: torch.Tensor) -> float:
        """``s`` of one forward, from its rows ``(B, S, d)``: ``m`` (the loss terms) for a mean-reduced loss, 1 for
        a summed one."""
        if self.reduction == "sum":
            return 1.0
        if self.loss_terms == "batch":
            return float(rows.shape[0])
        if self.loss_terms == "rows":
            return float(rows.shape[0] * rows.shape[1])
        return float(self.loss_terms)

    def factor(self, p: torch.Tensor, side: Side, diagonal: bool = False,
               dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """This step's ``A_t`` (``side="input"``) or ``G_t`` (``"output"``) of ``p``'s layer (``diag`` only with
        ``diagonal``), or ``None`` when nothing was recorded; averaged over the ranks in data-parallel training
        (module docstring)."""
        layer = self._entry(p)[0]
        if self._averaged is not None:
            key = (id(layer), side, diagonal)
            if self._averaged.dtype != dtype or key not in self._averaged.factors:
                form = "diagonal" if diagonal else "dense"
                raise self._not_averaged(f"{side} factor of {self.name(p)} ({form}, {dtype})")
            return self._averaged.factors[key]
        if self._must_average():
            raise self._not_averaged(f"{side} factor of {self.name(p)}")
        return self._factor(layer, side, diagonal, dtype)

    def _factor(self, layer: _Layer, side: Side, diagonal: bool, dtype: torch.dtype) -> torch.Tensor | None:
        """:meth:`factor` of this rank's records alone."""
        if not layer.calls:
            return None

        def second_moment(rows: torch.Tensor) -> torch.Tensor:
            flat = rows.to(dtype).reshape(-1, rows.shape[-1])
            return (flat * flat).sum(0) if diagonal else flat.T @ flat

        if side == "input":
            rows = [layer.input_rows(call) for call in layer.calls]
            return sum(second_moment(r) for r in rows) / sum(r.shape[0] * r.shape[1] for r in rows)
        return sum(self._scale(g) * second_moment(g) for g in self._output_rows(layer))

    def _output_rows(self, layer: _Layer) -> list[torch.Tensor]:
        return [layer.output_rows(grad) for call in layer.calls for grad in call.grads]

    def loss_scale(self, p: torch.Tensor) -> float | None:
        """``s`` of this step's forwards of ``p``'s layer (their mean), or ``None`` when nothing was recorded; in
        data-parallel training summed over the ranks (``M = Σ_r m_r``, module docstring)."""
        layer = self._entry(p)[0]
        if self._averaged is not None:
            if id(layer) not in self._averaged.scales:
                raise self._not_averaged(f"loss scale of {self.name(p)}")
            return self._averaged.scales[id(layer)]
        if self._must_average():
            raise self._not_averaged(f"loss scale of {self.name(p)}")
        return self._loss_scale(layer)

    def _loss_scale(self, layer: _Layer) -> float | None:
        if not layer.calls:
            return None
        return sum(self._scale(layer.output_rows(call.grads[0])) for call in layer.calls) / len(layer.calls)

    def rotated_moment(self, p: torch.Tensor, bases: Sequence[torch.Tensor | None],
                       dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """``s Σ_n (Q_Gᵀ ∇W_n Q_A)²`` entrywise, with the per-example gradients ``∇W_n = Σ_l g_{nl} a_{nl}ᵀ`` summed
        over the weight-sharing positions ``l`` of example ``n`` (a bias: ``(Q_Gᵀ Σ_l g_{nl})²``) and over every
        recorded backward pass: the diagonal ``diag(Qᵀ F Q)`` of the per-example Fisher in the Kronecker eigenbasis
        (George et al. 2018, Eq. 8; curvlinops' eigenvalue correction). ``bases`` are ``(Q_G, Q_A)`` (``(Q_G,)`` for
        a bias), ``None`` for the identity. Shaped like the viewed parameter, or ``None`` if nothing was recorded.

        In data-parallel training the ranks' moments are averaged here (one all-reduce of the moment and a count of
        the ranks that recorded the layer): a collective, so every rank of the group must read the same parameters
        in the same order, which it does when every rank keeps every state (plain DDP, ``mode="replicate"``)."""
        layer, role = self._entry(p)
        target = self.averaging_group() if self.due else None
        if target is None:
            return self._rotated_moment(layer, role, bases, dtype)
        if self._owner_mode:
            raise RuntimeError("EKFAC's per-example moment cannot be averaged over the ranks in "
                               "DataParallel(mode='owner'), where only a layer's owner keeps its Kronecker bases: use "
                               "moment='batch', or DataParallel(mode='replicate')")
        local = self._rotated_moment(layer, role, bases, dtype)
        shape = (p.shape[0], p[0].numel()) if role == "weight" else (p.shape[0],)
        device = layer.module.weight.device
        flat = torch.cat([piece.reshape(-1) for piece in _counted(local, shape, dtype, device)])
        dist.all_reduce(flat, group=target[0])
        count = flat[-1]
        return (flat[:-1] / count).view(shape) if bool(count > 0) else None

    def _rotated_moment(self, layer: _Layer, role: str, bases: Sequence[torch.Tensor | None],
                        dtype: torch.dtype) -> torch.Tensor | None:
        """:meth:`rotated_moment` of this rank's records alone."""
        if not layer.calls:
            return None
        q_out = bases[0]
        q_in = bases[1] if role == "weight" else None
        total = None
        for call in layer.calls:
            a = layer.input_rows(call).to(dtype) if role == "weight" else None
            if a is not None and q_in is not None:
                a = a @ q_in
            for grad in call.grads:
                g = layer.output_rows(grad)
                scale = self._scale(g)
                g = g.to(dtype)
                if q_out is not None:
                    g = g @ q_out
                if a is None:
                    term = g.sum(1).square().sum(0)
                elif a.shape[1] == 1:  # no weight sharing: (Qᵀg aᵀQ)² = (Qᵀg)²((Qᵀa)²)ᵀ, summed over examples
                    term = g[:, 0].square().T @ a[:, 0].square()
                else:
                    term = torch.einsum("bli,blj->bij", g, a).square().sum(0)
                total = scale * term if total is None else total + scale * term
        return total


@attrs.define(eq=False)
class _Averaged:
    """One step's statistics averaged over the ranks (:meth:`KFACCapture.synchronize`): the factors by
    ``(id(layer), side, diagonal)`` in ``dtype`` (``None``: no rank recorded the layer) and the summed loss scales by
    ``id(layer)``."""

    dtype: torch.dtype
    factors: dict[tuple[int, str, bool], torch.Tensor | None]
    scales: dict[int, float | None]


class _ForwardHook:
    """The forward hook of one captured layer: a callable object holding its capture and layer, not a closure, so a
    model and its capture copy (``copy.deepcopy``) and pickle together and the copied module's hook records into the
    copied capture. Inside a compiled model (``torch.compile(model)``) it records eagerly, at a graph break
    (TorchDynamo does not trace the records and their gradient hooks); eagerly it calls
    :meth:`KFACCapture._record`."""

    __slots__ = ("capture", "layer")

    def __init__(self, capture: KFACCapture, layer: _Layer) -> None:
        self.capture = capture
        self.layer = layer

    def __getstate__(self) -> tuple[KFACCapture, _Layer]:
        return self.capture, self.layer

    def __setstate__(self, state: tuple[KFACCapture, _Layer]) -> None:
        self.capture, self.layer = state

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if torch.compiler.is_compiling():
            return torch.compiler.disable(self.capture._record)(self.layer, module, inputs, output)  # noqa: SLF001
        return self.capture._record(self.layer, module, inputs, output)  # noqa: SLF001 (its capture's, this module)
