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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from precond.validators import number, one_of

__all__ = ["KFACCapture", "LossTerms"]

LossTerms = Literal["batch", "rows"] | int
Side = Literal["input", "output"]


def _loss_terms_valid(instance: Any, attribute: Any, value: Any) -> None:
    if value in ("batch", "rows") and isinstance(value, str):
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
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
    """

    reduction: Literal["mean", "sum"] = attrs.field(validator=one_of(("mean", "sum")))
    loss_terms: LossTerms = attrs.field(validator=_loss_terms_valid)
    factor_every: int = attrs.field(validator=number(low=1, integer=True, meaning="the factor update period"))

    def __init__(self, model: nn.Module, reduction: Literal["mean", "sum"] = "mean", loss_terms: LossTerms = "batch",
                 factor_every: int = 1) -> None:
        self.__attrs_init__(reduction, loss_terms, factor_every)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"KFACCapture needs the model (an nn.Module) to hook its layers, got {type(model).__name__}"
            )
        self.steps = 0
        """Optimizer steps completed (advanced by :meth:`advance`); statistics are recorded when it is a multiple of
        ``factor_every``."""
        self.skipped: dict[str, str] = {}
        self._loaded_steps: int | None = None  # a checkpoint's count, set once its load succeeded
        self._paused = False
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
            self._handles.append(module.register_forward_hook(self._forward_hook(layer)))

    # --- hooks ---------------------------------------------------------------------------------------
    @property
    def due(self) -> bool:
        """Whether the current step records statistics (``steps mod factor_every = 0``)."""
        return self.steps % self.factor_every == 0

    def _forward_hook(self, layer: _Layer):
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
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

        return hook

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
        for layer, _ in self._layers.values():
            layer.calls.clear()
            layer.consumed = False

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Call :meth:`advance` after every ``optimizer.step()``, and keep the step count (the factor-update phase) in
        the optimizer's ``state_dict`` under ``"kfac_capture"`` so that a resumed run records on the same steps;
        returns the step hook's removable handle."""
        optimizer.register_state_dict_post_hook(self._save_steps)
        optimizer.register_load_state_dict_pre_hook(self._take_steps)
        optimizer.register_load_state_dict_post_hook(self._set_steps)
        return optimizer.register_step_post_hook(lambda *_: self.advance())

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
        ``diagonal``), or ``None`` when nothing was recorded."""
        layer = self._entry(p)[0]
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
        """``s`` of this step's forwards of ``p``'s layer (their mean), or ``None`` when nothing was recorded."""
        layer = self._entry(p)[0]
        if not layer.calls:
            return None
        return sum(self._scale(layer.output_rows(call.grads[0])) for call in layer.calls) / len(layer.calls)

    def rotated_moment(self, p: torch.Tensor, bases: Sequence[torch.Tensor | None],
                       dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """``s Σ_n (Q_Gᵀ ∇W_n Q_A)²`` entrywise, with the per-example gradients ``∇W_n = Σ_l g_{nl} a_{nl}ᵀ`` summed
        over the weight-sharing positions ``l`` of example ``n`` (a bias: ``(Q_Gᵀ Σ_l g_{nl})²``) and over every
        recorded backward pass: the diagonal ``diag(Qᵀ F Q)`` of the per-example Fisher in the Kronecker eigenbasis
        (George et al. 2018, Eq. 8; curvlinops' eigenvalue correction). ``bases`` are ``(Q_G, Q_A)`` (``(Q_G,)`` for
        a bias), ``None`` for the identity. Shaped like the viewed parameter, or ``None`` if nothing was recorded."""
        layer, role = self._entry(p)
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
