"""The base classes of the normkit layers: :class:`NormModule` (every layer, the one type
tools test for) and :class:`NormBase` (the layers with batch and running statistics, like
torch's ``_NormBase``)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from normkit import functional as F
from normkit._core import InputError, MixSpec, UnsupportedDtypeError, check_eps, check_momentum, normalize_axis
from normkit.distributed import check_agreement

__all__ = ["NormModule", "NormBase", "check_float_layer_input", "check_input", "registered"]


def registered(module: nn.Module, name: str) -> Any:
    """``getattr(module, name)`` for a parameter or buffer, read from the module's registries.
    The attribute read goes through ``nn.Module.__getattr__`` (a failed lookup, then a Python
    call: about 7k instructions, and a small layer's call reads a dozen). A name that is not
    registered (moved out by ``torch.nn.utils.parametrize``, whose property computes it) is
    read as an attribute."""
    params = module._parameters
    if name in params:
        return params[name]
    buffers = module._buffers
    if name in buffers:
        return buffers[name]
    return getattr(module, name)


def _rank_text(ranks: tuple[int, ...]) -> str:
    return " or ".join(f"{r}-D" for r in ranks)


def check_float_layer_input(name: str, x: Tensor) -> None:
    """A layer's input must be a floating-point tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise UnsupportedDtypeError(
            f"{name} expects a floating-point input, got dtype {x.dtype}; convert it with x.float()"
        )


def check_input(
    name: str, x: Tensor, num_features: int, axis: int, ranks: tuple[int, ...] = (), layout: str = "(N, C, ...)"
) -> int:
    """Validate a layer's input (rank, dtype, channel count) and return the channel axis."""
    check_float_layer_input(name, x)
    if (ranks and x.dim() not in ranks) or x.dim() < 2:
        raise ValueError(
            f"{name} expects a {_rank_text(ranks or (2,)) if ranks else 'at least 2-D'} input {layout}, "
            f"got a {x.dim()}-D input of shape {tuple(x.shape)}"
        )
    channel_axis = normalize_axis(axis, x.dim())
    if channel_axis == 0:
        raise ValueError(f"{name}: axis must not be the batch axis 0, got axis={axis}")
    if x.shape[channel_axis] != num_features:
        raise InputError(
            f"{name} expects {num_features} channels on axis {axis}, got {x.shape[channel_axis]} "
            f"(input shape {tuple(x.shape)})"
        )
    return channel_axis


class NormModule(nn.Module):
    """Base class of every normkit normalization layer: ``isinstance(m, normkit.NormModule)``
    finds them all (normkit's BatchNorm, GroupNorm, LayerNorm and InstanceNorm are also
    instances of their ``torch.nn`` namesakes; SwitchNorm is only a NormModule).

    ``eps`` and ``momentum`` are checked whenever they are assigned, so ``m.eps = -1`` raises
    at once instead of giving NaN later.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "eps":
            check_eps(value)
        elif name == "momentum" and value is not None:
            check_momentum(value)
        super().__setattr__(name, value)

    def to_torch(self) -> nn.Module:
        """The ``torch.nn`` layer that computes what this one does, holding this layer's own
        parameters and buffers (so its running statistics move this layer's too). What
        ``torch.jit.script`` compiles in its place and ``convert(model, "torch")`` returns.

        Raises:
            TypeError: no torch.nn layer computes this one (SwitchNorm; ``axis=-1``,
                ``frozen``, a process group or ``scale=False`` on the torch namesakes).
        """
        raise TypeError(f"{type(self).__name__} has no torch.nn equivalent")

    def _twin(self, *args: Any) -> nn.Module:
        """The torch.nn namesake built with ``args``, holding this layer's own parameters and
        buffers; refused where that layer would compute something else."""
        torch_cls = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.nn."))
        options = (
            (f"axis={getattr(self, 'axis', 1)}", getattr(self, "axis", 1) != 1),
            ("frozen=True", getattr(self, "frozen", False)),
            ("a process_group", getattr(self, "process_group", None) is not None),
            ("scale=False", self.bias is not None and self.weight is None),
        )
        blockers = [text for text, present in options if present]
        if blockers:
            raise TypeError(
                f"{type(self).__name__} with {', '.join(blockers)} has no torch.nn equivalent: "
                f"torch.nn.{torch_cls.__name__} has no such option"
            )
        twin = torch_cls(*args, bias=not (self.weight is not None and self.bias is None), device="meta")
        twin._parameters = dict(self._parameters)
        twin._buffers = dict(self._buffers)
        twin._non_persistent_buffers_set = set(self._non_persistent_buffers_set)
        return twin.train(self.training)

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule before compiling it
        try:
            return self.to_torch()
        except TypeError as error:
            raise TypeError(
                f"{error}, and TorchScript cannot compile normkit's operators: torch.jit.script compiles a "
                "normkit layer as its torch.nn equivalent; use torch.compile or torch.export instead"
            ) from None


_SPECS: dict[tuple, MixSpec] = {}


def _spec(sources: tuple[str, ...], eps: float, batch_stats: bool, running: str,
          spec_type: type[MixSpec] = MixSpec) -> MixSpec:
    """The spec of a layer call (specs are immutable, so layers share them)."""
    key = (sources, eps, batch_stats, running, spec_type)
    spec = _SPECS.get(key)
    if spec is None:
        spec = _SPECS[key] = spec_type(sources, eps, batch_stats, running)
    return spec


class NormBase(NormModule):
    """Affine parameters, running statistics and the checks every batch-statistics layer shares.

    Subclasses set ``_ranks`` (accepted input ranks) and ``_layout`` (shape text for errors),
    and implement ``forward``. The arguments and state-dict keys are those of
    ``torch.nn.BatchNorm*d``; ``center`` / ``scale`` (Keras' names) drop ``beta`` / ``gamma``
    separately, ``center=False`` being torch's ``bias=False``.
    """

    _version = 2  # 2: num_batches_tracked present (same meaning as torch's _NormBase)
    _ranks: tuple[int, ...] = ()
    _layout: str = "(N, C, ...)"
    _needs_two_values = False  # torch's BatchNorm raises on one value per channel in training

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        center: bool = True,
        scale: bool = True,
        axis: int = 1,
        frozen: bool = False,
        process_group: Any = None,
    ) -> None:
        nn.Module.__init__(self)  # not super(): torch's _NormBase, when a base, is set up here
        factory = {"device": device, "dtype": dtype}
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.center = bool(center and bias)
        self.scale = scale
        self.track_running_stats = track_running_stats
        self.axis = axis
        self.frozen = frozen
        self.process_group = process_group
        if affine and scale:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
        if affine and self.center:
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        if track_running_stats and self._tracks_running_source():
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def _tracks_running_source(self) -> bool:
        """Whether this layer has a statistic with a population estimate (BN source)."""
        return True

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batch seen (GoMLX ``ResetWeights``)."""
        if self.running_mean is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_input(self, x: Tensor) -> int:
        """Validate x and return the normalized channel axis."""
        return check_input(type(self).__name__, x, self.num_features, self.axis, self._ranks, self._layout)

    def _batch_stats_and_factor(self, running_mean: Optional[Tensor],
                                num_batches_tracked: Optional[Tensor]) -> tuple[bool, float]:
        """Whether batch statistics are used, and the running-average factor (PyTorch's
        momentum convention; ``momentum=None`` gives a cumulative average). Counts the batch."""
        learning = self.training and not self.frozen
        use_batch = learning or running_mean is None
        factor = 0.0 if self.momentum is None else self.momentum
        if learning and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(num_batches_tracked)
        return use_batch, factor

    def _sync_group(self, x: Tensor) -> Any:
        """The process group to merge batch statistics over, or None (eval, single process).
        The first call with a group (and input dtype) checks that every rank agrees on the
        channel count and dtype."""
        if self.process_group is None or not self.training or self.frozen:
            return None
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return None
        agreed = (id(self.process_group), x.dtype)
        if self.__dict__.get("_agreed") != agreed:
            check_agreement(self.num_features, x.dtype, x.device, self.process_group)
            self.__dict__["_agreed"] = agreed
        return self.process_group

    def _run(
        self,
        x: Tensor,
        mask: Optional[Tensor],
        sources: tuple[str, ...],
        running: str = "bn",
        mean_weights: Optional[Tensor] = None,
        var_weights: Optional[Tensor] = None,
        spec_type: type[MixSpec] = MixSpec,
    ) -> Tensor:
        """The forward every batch-statistics layer shares: check, pick statistics, normalize.
        (``eps`` and ``momentum`` were checked when assigned.) ``mean_weights`` and
        ``var_weights`` are what ``spec_type``'s mix takes (logits for SN's spec)."""
        axis = self._check_input(x)
        weight, bias = registered(self, "weight"), registered(self, "bias")
        running_mean, running_var = registered(self, "running_mean"), registered(self, "running_var")
        use_batch, factor = self._batch_stats_and_factor(running_mean, registered(self, "num_batches_tracked"))
        group = self._sync_group(x) if "bn" in sources else None
        if self._needs_two_values and use_batch and mask is None and group is None and x.numel() // x.shape[axis] == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {list(x.shape)} "
                f"({type(self).__name__}); use a batch of 2 or more, eval(), or frozen=True"
            )
        return F.run(
            x,
            _spec(sources, self.eps, use_batch, running, spec_type),
            weight,
            bias,
            mean_weights,
            var_weights,
            running_mean,
            running_var,
            factor,
            axis,
            mask,
            group,
        )

    def extra_repr(self) -> str:
        # torch's fields in torch's order, then normkit's extras where they are not the default
        text = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        text += f", bias={self.bias is not None}"
        if self.affine and self.weight is None:
            text += ", scale=False"
        text += f", track_running_stats={self.track_running_stats}"
        if self.axis != 1:
            text += f", axis={self.axis}"
        if self.frozen:
            text += ", frozen=True"
        if self.process_group is not None:
            text += ", sync=True"
        return text

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        # Checkpoints written before num_batches_tracked existed (torch version < 2).
        if (version is None or version < 2) and self.num_batches_tracked is not None and key not in state_dict:
            state_dict[key] = (
                self.num_batches_tracked
                if self.num_batches_tracked.device != torch.device("meta")
                else torch.tensor(0, dtype=torch.long)
            )
        nn.Module._load_from_state_dict(  # torch's _NormBase version (a base here) does the same
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
