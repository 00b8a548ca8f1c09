"""The configuration of an ablation: task, variants, learning-rate grid, seeds, training protocol, output.

It is read from a flat mapping (a TOML file, then command-line overrides); every key is checked and an unknown
one is refused with the list of known keys. Example (``ablations/demo.toml``)::

    task = "char_lm"
    steps = 400
    lrs = [1e-3, 3e-3]          # the grid of every variant that does not give its own
    seeds = [0]
    # tuning_seeds = [0]        # with seeds = [0, 1]: tune on seed 0, run seed 1 at each best lr only

    [task_options]
    layers = 2

    [[variants]]
    spec = "kl_shampoo"         # any variant text (see precond.ablate.variants) ...
    lrs = [3e-3, 1e-2]

    [[variants]]                # ... or its keys written out
    preset = "shampoo"
    graft = "none"
    name = "shampoo (no graft)"
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import attrs
import torch

from precond.ablate.keys import learning_rates
from precond.ablate.threads import threads_for
from precond.ablate.train import Training
from precond.ablate.variants import Variant, normalize_key, parse_variant, split_variant, variant_from_mapping
from precond.tasks import Task, make_task
from precond.validators import number

DEFAULT_LRS = (1e-3, 3e-3)
REFERENCE_TARGET = "reference"
"""``target_loss`` = the reference's mean final loss (the race to a baseline's final loss)."""
DEFAULT_SEEDS = (0,)
DEFAULT_VARIANTS = ("kl_shampoo", "shampoo", "shampoo,graft=none,name=shampoo (no graft)", "soap", "adamw")

_TRAINING_KEYS = tuple(field.name for field in attrs.fields(Training))
_OWN_KEYS = ("task", "task_options", "variants", "lrs", "seeds", "tuning_seeds", "target_loss", "device", "out",
             "max_minutes", "progress", "workers", "threads", "extend_lrs", "baselines", "library", "timing_steps",
             "tensorboard")
ALLOWED_KEYS = _OWN_KEYS + _TRAINING_KEYS


def _seeds(value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in items):
        raise ValueError(f"seeds must be a list of integers ≥ 0, got {value!r}")
    return tuple(items)


def _tuning_seeds(value: Any, seeds: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    """``tuning_seeds``: ``None`` (every seed tunes) or a non-empty subset of ``seeds``."""
    if value is None:
        return None
    items = _seeds(value)
    strangers = [seed for seed in items if seed not in seeds]
    if strangers:
        raise ValueError(f"tuning_seeds must be some of the seeds {list(seeds)}; {strangers} are not (add them to "
                         f"seeds, or leave tuning_seeds out to tune on every seed)")
    return tuple(dict.fromkeys(items))


@attrs.frozen
class AblationConfig:
    """Everything an ablation needs; ``target_loss`` ``None`` means *auto* (the weakest variant's best final
    validation loss, so every variant reaches it), ``"reference"`` the reference's (the best baseline's) mean
    final loss, the race "who reaches AdamW's final loss first"; ``max_minutes`` ``None`` no time limit."""

    task: Task
    variants: tuple[Variant, ...]
    lrs: tuple[float, ...] = DEFAULT_LRS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    tuning_seeds: Optional[tuple[int, ...]] = None
    """The seeds the learning rates are tuned on (:mod:`precond.ablate.bracket`); the other seeds run only at each
    variant's best lr once it is settled. ``None``: every seed runs at every lr and tunes."""
    training: Training = Training()
    target_loss: Union[float, str, None] = None
    device: str = "auto"
    out: Path = Path("results")
    max_minutes: Optional[float] = None
    progress: bool = True
    workers: int = attrs.field(default=1, validator=number(low=1, integer=True, meaning="runs trained at once"))
    """Runs trained at once, each in its own process (see :mod:`precond.ablate.parallel`)."""
    threads: Optional[int] = attrs.field(default=None, validator=number(
        low=1, integer=True, optional=True, meaning="CPU threads per run; unset: 1 on the CPU, torch's on a GPU"))
    """CPU threads per run (see :mod:`precond.ablate.threads`); ``None``: 1 on the CPU, torch's default on CUDA."""
    extend_lrs: int = attrs.field(default=2, validator=number(
        low=0, integer=True, meaning="learning rates the workbench may add to a variant's grid to bracket its best"))
    """How many learning rates a variant's grid may gain to bracket its best lr (:mod:`precond.ablate.bracket`);
    0 keeps every grid as given (an edge is then reported as not bracketed)."""
    library: Optional[str] = attrs.field(default=None, validator=lambda _, __, value: _fingerprint(value))
    """The library fingerprint the runs are keyed by (12 hex digits, as in each record's ``library``); ``None``:
    the current source's. Pin it to keep reusing finished runs after a library change that leaves these
    variants' updates unchanged (e.g. a new opt-in option: ``tests/test_trajectories.py`` proves the default
    trajectories bit-identical); runs trained afterwards still record the fingerprint of the code that made them."""
    baselines: Optional[tuple[str, ...]] = None
    """The variants the summary's paired differences are taken against (the best of them); ``None``: the peers of
    other libraries present (``precond.ablate.peers.BASELINES``), else the best variant."""
    timing_steps: int = attrs.field(default=200, validator=number(
        low=0, integer=True, meaning="steps of each variant's timing run after the grid (0: no timing pass)"))
    """Steps of the timing pass (:mod:`precond.ablate.timing`): after the grid, each variant's best lr runs alone,
    one run at a time, this many steps, and the per-second table is timed from it; 0 times it from the grid."""
    tensorboard: Optional[Path] = attrs.field(default=None, converter=lambda value: None if value is None
                                              else Path(value))
    """A directory for TensorBoard logs of every run trained (:mod:`precond.ablate.board`); ``None``: none."""

    def __attrs_post_init__(self) -> None:
        names = [variant.name for variant in self.variants]
        for variant in self.variants:
            for key, source in (("lr_from", variant.lr_from), ("adam_lr_from", variant.adam_lr_from)):
                if source is None:
                    continue
                if source not in names or source == variant.name:
                    raise ValueError(f"variant {variant.name!r}: {key} names {source!r}, which is not another "
                                     f"variant of this ablation ({', '.join(names)})")
                other = self.variants[names.index(source)]
                if other.lr_from is not None or (key == "adam_lr_from" and other.adam_lr_from is not None):
                    raise ValueError(f"variant {variant.name!r}: {key} names {source!r}, which takes a learning rate "
                                     f"from another variant itself; name a variant tuned on its own grid")
        for name in self.baselines or ():
            if name not in names:
                raise ValueError(f"baselines names {name!r}, which is not a variant of this ablation "
                                 f"({', '.join(names)})")

    def only(self, names: Sequence[str]) -> "AblationConfig":
        """The ablation restricted to the variants named ``names`` (``--only``): their runs keep the keys they have in
        the whole ablation, so records are shared both ways; baselines left out are dropped. A kept variant whose
        ``lr_from`` names one left out is refused (by the checks of the restricted ablation)."""
        known = [variant.name for variant in self.variants]
        missing = [name for name in names if name not in known]
        if missing:
            raise ValueError(f"--only names {', '.join(map(repr, missing))}, which is not a variant of this ablation "
                             f"({', '.join(map(repr, known))})")
        baselines = None if self.baselines is None else tuple(name for name in self.baselines if name in names)
        return attrs.evolve(self, variants=tuple(v for v in self.variants if v.name in names), baselines=baselines)

    def baseline_names(self) -> tuple[str, ...]:
        """The variants differences are taken against (see :attr:`baselines`)."""
        from precond.ablate.peers import BASELINES

        if self.baselines is not None:
            return self.baselines
        return tuple(variant.name for variant in self.variants if variant.preset in BASELINES)

    def seeds_tuned(self) -> tuple[int, ...]:
        """The seeds the learning rates are tuned on: :attr:`tuning_seeds`, or every seed."""
        return self.seeds if self.tuning_seeds is None else self.tuning_seeds

    def threads_on(self, device: torch.device) -> Optional[int]:
        """The thread count a run on ``device`` uses (``None``: torch's, left as it is)."""
        return threads_for(self.threads, device)

    def skipped(self) -> list[tuple[Variant, str]]:
        """The variants that cannot run on this machine (a peer library missing), with the reason."""
        return [(variant, variant.missing) for variant in self.variants if variant.missing is not None]

    def runnable(self) -> tuple[Variant, ...]:
        """The variants that can run here (see :meth:`skipped`)."""
        return tuple(variant for variant in self.variants if variant.missing is None)

    def grid(self) -> list[tuple[Variant, float, int]]:
        """Every run (each runnable variant × its learning rates × the seeds), ordered seed by seed, then by
        position in the variants' lr grids, then by variant: a time-limited ablation stopped anywhere leaves a
        comparable subset (every variant at its first learning rates) rather than some variants finished and
        others absent. A variant with ``lr_from`` or ``adam_lr_from`` has no runs here: the bracketing plan
        (:mod:`precond.ablate.bracket`, which the runner follows) adds them once the variant it names is tuned."""
        grids = [(variant, variant.lrs or self.lrs) for variant in self.runnable()
                 if variant.lr_from is None and variant.adam_lr_from is None]
        depth = max((len(lrs) for _, lrs in grids), default=0)
        return [(variant, lrs[index], seed) for seed in self.seeds for index in range(depth)
                for variant, lrs in grids if index < len(lrs)]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "AblationConfig":
        """Build and check a configuration from plain data (a parsed TOML file with overrides applied)."""
        unknown = [key for key in data if key not in ALLOWED_KEYS]
        if unknown:
            raise ValueError(f"unknown configuration key(s) {', '.join(map(repr, unknown))}; "
                             f"known keys: {', '.join(ALLOWED_KEYS)}")
        training = Training(**{key: data[key] for key in _TRAINING_KEYS if key in data})
        task = make_task(data.get("task", "char_lm"), data.get("task_options") or {})
        variants = tuple(_variant(item) for item in data.get("variants") or DEFAULT_VARIANTS)
        names = [variant.name for variant in variants]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(duplicates)} (add name=...)")
        target = data.get("target_loss", "auto")
        seeds = _seeds(data.get("seeds", DEFAULT_SEEDS))
        return cls(
            task=task, variants=variants, lrs=learning_rates(data.get("lrs", DEFAULT_LRS)),
            seeds=seeds, tuning_seeds=_tuning_seeds(data.get("tuning_seeds"), seeds), training=training,
            target_loss=_target(target),
            device=str(data.get("device", "auto")), out=Path(data.get("out", "results")),
            max_minutes=None if data.get("max_minutes") is None else _float("max_minutes", data["max_minutes"]),
            progress=bool(data.get("progress", True)), workers=data.get("workers", 1), threads=data.get("threads"),
            extend_lrs=data.get("extend_lrs", 2), baselines=_names("baselines", data.get("baselines")),
            library=data.get("library"), timing_steps=data.get("timing_steps", 200),
            tensorboard=data.get("tensorboard"))


def _target(value: Any) -> Union[float, str, None]:
    """``target_loss``: ``"auto"`` (or none) → ``None``, ``"reference"`` kept, anything else a finite number."""
    if value is None or value == "auto":
        return None
    if value == REFERENCE_TARGET:
        return REFERENCE_TARGET
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"target_loss must be a finite validation loss, \"auto\" or \"{REFERENCE_TARGET}\" "
                         f"(the best baseline's final loss), got {value!r}")
    return number


def _fingerprint(value: Any) -> None:
    if value is not None and not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{12}", value)):
        raise ValueError(f"library must be a library fingerprint: the 12 lower-case hex digits of a record's "
                         f"'library' field in runs.jsonl, got {value!r}")


def _names(key: str, value: Any) -> Optional[tuple[str, ...]]:
    if value is None or value == "auto":
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise ValueError(f"{key} must be a list of variant names or \"auto\", got {value!r}")
    return tuple(items)


def _float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None


def _variant(item: Union[str, Mapping[str, Any]]) -> Variant:
    """A variant from its text, or from a TOML table of keys (``spec`` = a text the other keys amend)."""
    if isinstance(item, str):
        return parse_variant(item)
    if not isinstance(item, Mapping):
        raise ValueError(f"a variant is a string or a table of keys, got {item!r}")
    table = {normalize_key(key): value for key, value in item.items()}
    spec = table.pop("spec", None)
    if spec is None:
        return variant_from_mapping(table)
    return variant_from_mapping({**split_variant(str(spec)), **table}, source=f"{spec} with {table}" if table else spec)


def load_toml(path: Union[str, Path]) -> dict[str, Any]:
    """A TOML file as a dict (``tomllib`` on Python ≥ 3.11, the ``tomli`` package before)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ImportError("reading a TOML configuration on Python 3.10 needs tomli: pip install tomli "
                              "(or pip install -e '.[demo]')") from None
    with open(path, "rb") as handle:
        return tomllib.load(handle)


def resolve_device(name: str, usable: bool = True) -> torch.device:
    """``auto`` → CUDA when available, else the CPU; anything else as ``torch.device`` reads it. ``usable=False``
    names a device without checking that this machine has it (to read or report runs made elsewhere)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if usable and device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False "
                         "(use --device auto or cpu)")
    return device
