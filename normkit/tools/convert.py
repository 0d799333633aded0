"""Swap the normalization layers of a model, and build one from its name.

:func:`convert` walks the module tree like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
and replaces batch / group / instance norms (``torch.nn`` or normkit, normkit SN too), and
the channel layer norms it can see, by another kind, carrying every setting it can and
refusing, by module path, what it cannot. It never silently flattens a subclass with its own
``forward`` (e.g. a norm + activation module such as timm's ``BatchNormAct2d``, where
converting to SyncBN dropped the activation): such types convert through a converter
registered for them (:func:`register_converter`, :func:`norm_act_converter`). Every norm it
meets is in its :class:`ConvertReport`.

"layer" means the SN paper's Layer Norm for conv nets (Luo et al., ICLR 2019; Ba et al.,
2016): statistics over channels and positions per sample, per-channel affine, i.e.
``GroupNorm(1, C)``, not ``torch.nn.LayerNorm`` over trailing dims.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from normkit.nn.registry import CONVERTIBLE, KINDS, NORM_NAMES, NormKind, check_dim, dim_of, kind_named, kind_of

__all__ = [
    "ConvertReport",
    "ConvertEntry",
    "NORM_NAMES",
    "convert",
    "create_norm",
    "norm_act_converter",
    "register_converter",
]

_LOG = logging.getLogger("normkit.convert")


def create_norm(name: str, num_features: int, **kw: Any) -> nn.Module:
    """Build a normalization layer from its name (for configs and command lines).

    ============================  ==========================================================
    name                          layer
    ============================  ==========================================================
    ``"bn"``, ``"batch"``         :class:`normkit.BatchNorm{dim}d`
    ``"sn"``, ``"switch"``        :class:`normkit.SwitchNorm{dim}d`
    ``"gn"``, ``"group"``         :class:`normkit.GroupNorm` with ``num_groups`` (default: the
                                  largest divisor of ``num_features`` that is <= 32)
    ``"ln"``, ``"layer"``         ``normkit.GroupNorm(1, num_features)``: the SN paper's LN
                                  (per sample over channels and positions, per-channel affine)
    ``"in"``, ``"instance"``      :class:`normkit.InstanceNorm{dim}d`, ``affine=True`` by
                                  default (unlike torch), as SN's IN source
    ``"none"``, ``"identity"``    ``torch.nn.Identity()`` (for "no normalization" baselines)
    ============================  ==========================================================

    Names are case-insensitive; the kinds are the rows of :data:`normkit.nn.registry.KINDS`.

    Args:
        name: one of the names above.
        num_features: number of channels ``C``.
        dim: number of spatial dims (1, 2 or 3) for the batch / switch / instance classes.
            Default: 2.
        **kw: passed to the layer's constructor (``eps``, ``momentum``, ``sources``, ...).

    Raises:
        ValueError: an unknown name (the message lists the valid ones) or a bad ``dim``.

    Examples::

        >>> import normkit
        >>> normkit.create_norm("sn", 64, sources=("in", "bn"))
        SwitchNorm2d(64, eps=1e-05, momentum=0.1, sources=('in', 'bn'), affine=True, track_running_stats=True)
        >>> normkit.create_norm("gn", 48)
        GroupNorm(24, 48, eps=1e-05, affine=True)
    """
    kind = kind_named(name)
    return kind.create(num_features, kw.pop("dim", 2), **kw)


# --------------------------------------------------------------------------------------------
# convert

TARGETS = tuple(kind.name for kind in KINDS if kind.convertible) + ("sync", "torch")


@dataclass
class ConvertEntry:
    """What :func:`convert` did with one normalization module."""

    path: str  # module path in the model ('<root>' for the model itself)
    old: str  # its type
    action: str  # 'converted', 'kept' or 'refused'
    new: Optional[str] = None  # the new type, when converted
    reason: str = ""  # why it was kept or refused; what was carried that needs saying

    def __str__(self) -> str:
        change = f"{self.old} -> {self.new}" if self.new else self.old
        return f"{self.path}: {change} ({self.action}{': ' + self.reason if self.reason else ''})"


@dataclass
class ConvertReport:
    """Every normalization module :func:`convert` met: converted, kept (with why) or refused
    (with what it could not carry)."""

    target: str
    entries: list[ConvertEntry] = field(default_factory=list)

    def _with(self, action: str) -> list[ConvertEntry]:
        return [e for e in self.entries if e.action == action]

    @property
    def converted(self) -> list[ConvertEntry]:
        return self._with("converted")

    @property
    def kept(self) -> list[ConvertEntry]:
        return self._with("kept")

    @property
    def refused(self) -> list[ConvertEntry]:
        return self._with("refused")

    def __str__(self) -> str:
        counts = ", ".join(f"{len(self._with(a))} {a}" for a in ("converted", "kept", "refused"))
        return "\n".join([f"convert to {self.target}: {counts}", *(f"  {e}" for e in self.entries)])


class _Refused(Exception):
    """A module whose settings the target cannot carry (the message says which)."""


#: type -> converter(module, to, options) returning the module's replacement
Converter = Callable[[nn.Module, Any, dict], nn.Module]
_CONVERTERS: dict[type, Converter] = {}


def register_converter(cls: type, converter: Converter) -> None:
    """Teach :func:`convert` a module type it cannot convert by itself.

    ``converter(module, to, options)`` returns the module's replacement, where ``to`` is the
    target as given to :func:`convert` (a name, class or factory) and ``options`` its extra
    keyword arguments; it may call :func:`convert` on a plain layer it builds. It is used for
    ``cls`` and its subclasses, before any built-in rule (so it can also change how a
    built-in type converts). For norm + activation modules, see :func:`norm_act_converter`.

    Examples::

        >>> import torch, normkit
        >>> class BatchNormAct2d(torch.nn.BatchNorm2d):  # a norm with its activation fused in
        ...     def __init__(self, c):
        ...         super().__init__(c)
        ...         self.act = torch.nn.ReLU()
        ...     def forward(self, x):
        ...         return self.act(super().forward(x))
        >>> normkit.register_converter(BatchNormAct2d, normkit.norm_act_converter("act"))
        >>> normkit.convert(torch.nn.Sequential(BatchNormAct2d(4)), "switch")[0]
        Sequential(
          (0): SwitchNorm2d(4, eps=1e-05, momentum=0.1, sources=('in', 'ln', 'bn'), affine=True, bias=True, track_running_stats=True)
          (1): ReLU()
        )
    """
    if not isinstance(cls, type) or not callable(converter):
        raise TypeError(f"register_converter expects a class and a callable, got {cls!r} and {converter!r}")
    _CONVERTERS[cls] = converter


def norm_act_converter(*after: str) -> Converter:
    """A converter for a norm + activation module (a subclass of a torch or normkit norm
    whose ``forward`` applies submodules after normalising, e.g. timm's ``BatchNormAct2d``
    with ``drop`` and ``act``): the norm converted as a plain layer of its base class, then
    the submodules named in ``after`` (those present), in order, in an ``nn.Sequential``."""

    def convert_norm_act(module: nn.Module, to: Any, options: dict) -> nn.Module:
        base = _known_base(module)
        plain = base(*_plain_args(module, base)) if base is not None else None
        if plain is None:
            raise TypeError(f"norm_act_converter: {type(module).__name__} is not a subclass of a norm layer")
        plain.load_state_dict(module.state_dict(keep_vars=False), strict=False)
        plain.train(module.training)
        tail = [getattr(module, name) for name in after if isinstance(getattr(module, name, None), nn.Module)]
        return nn.Sequential(convert(plain, to, **options), *tail)

    return convert_norm_act


def _plain_args(module: nn.Module, base: type) -> tuple:
    """Constructor arguments that rebuild ``module``'s normalization as a plain ``base``."""
    if issubclass(base, nn.GroupNorm):
        return (module.num_groups, module.num_channels, module.eps, module.affine)
    return (_num_features(module), module.eps, module.momentum, module.affine,
            getattr(module, "track_running_stats", True))


def _known_base(module: nn.Module) -> Optional[type]:
    """The convertible class ``module`` is (or derives from), or None."""
    for cls in type(module).__mro__:
        if cls in CONVERTIBLE:
            return cls
    return None


def _running_kind(module: nn.Module) -> Optional[str]:
    """'bn' for per-channel population statistics, 'in' for torch's instance definition."""
    if getattr(module, "running_mean", None) is None:
        return None
    kind = kind_of(module)
    return "bn" if kind is None else kind.running  # a target class of no kind: taken as BN-like


def _factory_of(module: nn.Module) -> dict[str, Any]:
    for tensor in module.parameters(recurse=False):
        return {"device": tensor.device, "dtype": tensor.dtype}
    for tensor in module.buffers(recurse=False):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _carry(old: nn.Module, new: nn.Module) -> nn.Module:
    """Copy affine parameters, running statistics, flags and hooks from ``old`` to ``new``."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            src, dst = getattr(old, name, None), getattr(new, name, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                dst.copy_(src)
                dst.requires_grad_(src.requires_grad)
        kind = _running_kind(old)
        if kind is not None and kind == _running_kind(new) and old.running_mean.shape == new.running_mean.shape:
            new.running_mean.copy_(old.running_mean)
            new.running_var.copy_(old.running_var)
            if old.num_batches_tracked is not None and new.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(old.num_batches_tracked)
    for flag in ("frozen", "process_group"):
        if hasattr(old, flag) and hasattr(new, flag) and getattr(old, flag) is not None:
            setattr(new, flag, getattr(old, flag))
    for hooks in _HOOKS:
        if getattr(old, hooks, None):
            getattr(new, hooks).update(getattr(old, hooks))
    new.train(old.training)
    return new


def _settings(old: nn.Module, target_kind: Optional[NormKind]) -> dict[str, Any]:
    """Every setting of ``old`` a new layer should have (constructor arguments)."""
    inherited: dict[str, Any] = dict(_factory_of(old), eps=old.eps)
    if hasattr(old, "momentum"):
        inherited["momentum"] = old.momentum
    if getattr(old, "axis", 1) != 1:
        inherited["axis"] = old.axis
    affine = getattr(old, "affine", getattr(old, "elementwise_affine", None))
    if affine is not None:
        inherited["affine"] = affine
    if affine and getattr(old, "bias", None) is None:
        inherited["bias"] = False
    if affine and getattr(old, "weight", None) is None:
        inherited["scale"] = False
    if hasattr(old, "track_running_stats") and (target_kind is None or target_kind.running != "in"):
        # a layer without running statistics normalises with batch statistics in eval too; an
        # instance norm's running statistics are per-sample ones, which it keeps off by default
        inherited["track_running_stats"] = old.track_running_stats
    if target_kind is not None and target_kind.name == "group" and kind_of(old) is target_kind:
        inherited["num_groups"] = old.num_groups  # a group norm keeps its groups
    if getattr(old, "frozen", False):
        inherited["frozen"] = True
    return inherited


# settings that change what a layer computes: a constructor that lacks one may only be given its
# default (momentum is not one: a target without it keeps no running statistics to move)
_DEFAULTS = {"bias": True, "scale": True, "axis": 1, "frozen": False}


def _constructor_kw(old: nn.Module, cls: Callable[..., nn.Module], options: dict[str, Any]) -> dict[str, Any]:
    """The settings the new layer takes from the old one, overridden by ``options``; raises
    _Refused naming what ``cls`` cannot carry."""
    target = kind_of(cls) if isinstance(cls, type) else None
    inherited = _settings(old, target)
    if "bias" in inherited and "bias" not in _params_of(cls) and "center" in _params_of(cls):
        inherited["center"] = inherited.pop("bias")  # Keras' name
    taken = _taken_by(cls, inherited)
    lost = [f"{k}={v!r}" for k, v in inherited.items()
            if k not in taken and k not in options and k in _DEFAULTS and _DEFAULTS[k] != v]
    if lost:
        raise _Refused(f"{getattr(cls, '__name__', cls)} cannot carry {', '.join(lost)}")
    if "frozen" in taken:
        taken.pop("frozen")  # set after construction by _carry
    return dict(taken, **options)


def _params_of(cls: Callable[..., Any]) -> dict:
    return dict(inspect.signature(cls).parameters)


def _taken_by(cls: Callable[..., Any], kw: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``kw`` that ``cls``'s constructor takes (all of them if it takes ``**kwargs``)."""
    params = _params_of(cls)
    open_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {k: v for k, v in kw.items() if open_kw or k in params}


def _num_features(module: nn.Module) -> int:
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[0]
    return module.num_features if hasattr(module, "num_features") else module.num_channels  # torch.nn.GroupNorm's name


def _to_torch(old: nn.Module) -> nn.Module:
    if not hasattr(old, "to_torch"):
        if type(old).__module__.startswith("torch.nn."):
            return old
        raise _Refused(f"{type(old).__name__} has no torch.nn equivalent")
    try:
        return old.to_torch()
    except TypeError as error:
        raise _Refused(str(error)) from None


def _replace(old: nn.Module, target: Any, dim: Optional[int], options: dict[str, Any], process_group: Any,
             channel_axis: Optional[int] = None) -> nn.Module:
    c = _num_features(old)
    layer_dim = check_dim(dim or dim_of(old) or 2)
    kind = kind_of(old) if channel_axis is None else None
    if target == "torch":
        return _to_torch(old)
    if target == "sync":
        if kind is None or kind.running != "bn":
            return old  # only statistics over the batch are merged across processes
        new = old
        if not isinstance(old, kind.classes):  # a torch.nn layer: its normkit namesake takes a process group
            cls = kind.class_for(layer_dim)
            new = _carry(old, kind.create(c, layer_dim, **_constructor_kw(old, cls, options)))
        new.process_group = process_group
        return new
    if channel_axis is not None:  # a channel LayerNorm: no axis of its own to carry
        options = {"axis": channel_axis, **options}
    if isinstance(target, NormKind):
        cls = target.class_for(layer_dim)
        if kind is target and type(old) is cls and not options and not target.rebuilds:
            return old  # already the requested kind
        new = target.create(c, layer_dim, **_constructor_kw(old, cls, options))
    elif isinstance(target, type):
        new = target(c, **_constructor_kw(old, target, options))
    else:
        new = target(c, **options)
    return _carry(old, new)


def _channel_norms(model: nn.Module, example_input: Any) -> dict[int, int]:
    """id -> channel axis of every LayerNorm that the example input shows normalising the
    channels of a map: a ``torch.nn.LayerNorm`` over the last dim of a 4-D / 5-D input
    (channels-last, as in ConvNeXt), or a LayerNorm subclass whose output on its
    ``(N, C, ...)`` input equals layer norm over dim 1 (a ``LayerNorm2d``). Running the example
    (in eval mode, so no statistic moves) also initialises lazy modules."""
    seen: dict[int, tuple[nn.Module, Tensor]] = {}

    def record(module, args):
        if args and isinstance(args[0], torch.Tensor):
            seen.setdefault(id(module), (module, args[0].detach()))

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.LayerNorm)]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    found: dict[int, int] = {}
    for module, x in seen.values():
        shape = tuple(module.normalized_shape)
        if len(shape) != 1 or x.dim() not in (4, 5):
            continue
        if type(module).forward is nn.LayerNorm.forward and x.shape[-1] == shape[0]:
            found[id(module)] = -1
        elif x.shape[1] == shape[0]:
            with torch.no_grad():
                moved = x.movedim(1, -1)
                expected = nn.functional.layer_norm(moved, shape, module.weight, module.bias, module.eps).movedim(-1, 1)
                if torch.allclose(module(x), expected, rtol=1e-5, atol=1e-5):
                    found[id(module)] = 1
    return found


def convert(
    model: nn.Module,
    to: Union[str, type, Callable[..., nn.Module]],
    *,
    strict: bool = True,
    dim: Optional[int] = None,
    process_group: Any = None,
    example_input: Any = None,
    report: bool = False,
    **options: Any,
) -> Union[nn.Module, tuple[nn.Module, ConvertReport]]:
    """Replace the normalization layers of ``model`` by another kind, in place.

    Converted: ``torch.nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``GroupNorm``,
    ``InstanceNorm1d/2d/3d``, their normkit namesakes and normkit ``SwitchNorm*d`` (and every
    kind of :data:`normkit.nn.registry.KINDS`); with ``example_input``, channel LayerNorms (a
    ``torch.nn.LayerNorm`` over the channels of a channels-last map, as in ConvNeXt, or a
    ``LayerNorm2d``-style module over dim 1, checked on the example) and lazy norms (the
    example initialises them); types with a registered converter (:func:`register_converter`).
    Trailing-dims LayerNorms of transformers are kept.

    Targets:

    * ``"switch"``, ``"batch"``, ``"instance"``: normkit ``SwitchNorm / BatchNorm /
      InstanceNorm{dim}d``, dim from the old class (``BatchNorm3d`` -> 3), else ``dim`` (2).
    * ``"group"``: ``normkit.GroupNorm(num_groups, C)``: the old group norm's groups, else the
      ``num_groups`` option, else the largest divisor of C <= 32. ``"layer"``:
      ``normkit.GroupNorm(1, C)``, the SN paper's LN.
    * ``"sync"``: ``torch.nn`` batch norms become normkit batch norms, and every normkit
      batch / switch norm gets ``process_group`` (default ``torch.distributed.group.WORLD``,
      so ``torch.distributed`` must be initialised unless a group is passed).
    * ``"torch"``: normkit layers become their ``torch.nn`` namesakes (same state dict);
      SwitchNorm, and options torch lacks (``axis=-1``, ``frozen``, ``scale=False``), are refused.
    * a class, called as ``to(C, eps=..., momentum=..., device=..., dtype=..., **options)``,
      or any other callable, called as ``to(C, **options)``.

    Carried over (unless given in ``options``): ``eps``, ``momentum``, ``affine``,
    ``bias=False``, ``scale=False``, group counts, ``track_running_stats`` (except into an
    instance norm, where running statistics mean something else), ``axis``, ``frozen`` and
    ``process_group``; ``weight`` / ``bias`` values (when both layers have them, shapes
    equal), running statistics when both layers define them the same way, device, dtype,
    ``requires_grad``, the training flag and the module's hooks. A setting the target's
    constructor cannot take (``bias=False`` into a class without ``bias``) is refused, never
    dropped. A module seen at several paths is converted once and stays shared.

    Args:
        model: the network; returned as is, or the new layer if ``model`` itself is a norm.
        to: a target name from ``TARGETS``, a class or a factory.
        strict: raise on any refused module (a setting the target cannot carry, a subclass
            with its own ``forward`` and no registered converter, an uninitialised lazy
            norm), naming every module path, before changing anything. ``False`` keeps those
            modules, converts the rest and lists them in the report. Default: True.
        dim: spatial dims for layers whose class does not say (GroupNorm, SyncBatchNorm).
            Default: None (2).
        process_group: for ``"sync"``. Default: None (``torch.distributed.group.WORLD``).
        example_input: an input of ``model`` (a tensor, or a tuple of arguments), run once in
            eval mode (no statistic moves) to find channel LayerNorms and initialise lazy
            norms. Default: None.
        report: also return a :class:`ConvertReport` of every norm module met (it is
            logged to the ``normkit.convert`` logger at INFO either way). Default: False.
        **options: passed to the new layers' constructor (``sources=``, ``num_groups=``, ...).

    Returns:
        ``model`` (or its replacement), with the report when ``report=True``.

    Raises:
        ValueError: unknown target name; refused modules under ``strict`` (the message names
            each module path and what could not be carried); ``"sync"`` with no process group.

    Examples::

        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8, bias=False))
        >>> net, done = normkit.convert(net, "switch", report=True)
        >>> print(done)
        convert to switch: 1 converted, 0 kept, 0 refused
          1: BatchNorm2d -> SwitchNorm2d (converted)
        >>> net[1].bias is None
        True
    """
    target_name = to if isinstance(to, str) else getattr(to, "__name__", type(to).__name__)
    if isinstance(to, str):
        name = to.lower()
        resolved: Any = "sync" if name in ("sync", "syncbn") else "torch" if name == "torch" else kind_named(name)
        if isinstance(resolved, NormKind) and not resolved.convertible:
            raise ValueError(f"convert target must be one of {TARGETS}, a class or a factory, got {name!r}")
    elif callable(to):
        resolved = to
    else:
        raise ValueError(f"convert target must be one of {TARGETS}, a class or a factory, got {to!r}")
    if resolved == "sync" and process_group is None:
        process_group = torch.distributed.group.WORLD if torch.distributed.is_available() else None
        if process_group is None:
            raise ValueError(
                "convert(model, 'sync') needs a process group: call torch.distributed.init_process_group() "
                "first or pass process_group=..."
            )
    if dim is not None:
        check_dim(dim)
    channel_norms = _channel_norms(model, example_input) if example_input is not None else {}
    result = ConvertReport(str(target_name))
    plan: dict[int, nn.Module] = {}

    def note(path: str, module: nn.Module, action: str, new: Optional[nn.Module] = None, reason: str = "") -> None:
        result.entries.append(ConvertEntry(path or "<root>", type(module).__name__, action,
                                           None if new is None else type(new).__name__, reason))

    def decide(module: nn.Module, path: str) -> Optional[nn.Module]:
        """The module's replacement (itself when kept), or None when it is not a norm."""
        where = path or "<root>"
        converter = next((_CONVERTERS[c] for c in type(module).__mro__ if c in _CONVERTERS), None)
        if converter is not None:
            new = converter(module, to, dict(options, **({"dim": dim} if dim else {})))
            note(path, module, "converted", new, "registered converter")
            return new
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise _Refused(f"'{where}' ({type(module).__name__}) is an uninitialised lazy norm: run a forward pass "
                           "first or pass example_input=...")
        if id(module) in channel_norms:
            new = _replace(module, resolved, dim, options, process_group, channel_axis=channel_norms[id(module)])
            note(path, module, "converted", new, f"channel LayerNorm, axis={channel_norms[id(module)]}")
            return new
        if isinstance(module, nn.LayerNorm):
            note(path, module, "kept", reason="normalises trailing dims (a transformer's LayerNorm); channel "
                 "LayerNorms are converted when example_input shows them")
            return module
        base = _known_base(module)
        if base is None:
            return None
        if type(module) is not base and type(module).forward is not base.forward:
            raise _Refused(
                f"'{where}' ({type(module).__name__}) subclasses {base.__name__} with its own forward; replacing "
                "it would drop that behaviour: register a converter for it (normkit.register_converter, "
                "normkit.norm_act_converter for norm + activation modules)"
            )
        new = _replace(module, resolved, dim, options, process_group)
        note(path, module, "converted" if new is not module else "kept", new if new is not module else None,
             "" if new is not module else "already the target")
        return new

    refused: list[str] = []

    def visit(module: nn.Module, path: str) -> None:
        if id(module) in plan:
            return
        try:
            new = decide(module, path)
        except _Refused as error:
            message = str(error)
            if not message.startswith("'"):
                message = f"'{path or '<root>'}' ({type(module).__name__}): {message}"
            refused.append(message)
            note(path, module, "refused", reason=message)
            plan[id(module)] = module
            return
        if new is not None:
            plan[id(module)] = new
            return
        plan[id(module)] = module
        for name, child in list(module._modules.items()):  # named_children() hides repeats
            if child is not None:
                visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    if refused and strict:
        raise ValueError("convert: nothing was changed; refused:\n  " + "\n  ".join(refused)
                         + "\n(pass strict=False to convert the rest and keep these)")
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if child is not None and plan.get(id(child), child) is not child:
                setattr(module, name, plan[id(child)])
    _LOG.info("%s", result)
    new_model = plan.get(id(model), model)
    return (new_model, result) if report else new_model
