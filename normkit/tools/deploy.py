"""Deployment: replace converged SN layers by the plain layer they chose, fold BN into convs.

Luo et al., "Differentiable Learning-to-Normalize via Switchable Normalization", ICLR 2019,
and Sparse SN (Shao et al., CVPR 2019), where each layer ends with one normalizer: such a
layer is exactly a BN, IN, LN or GN and can be replaced by it (:func:`harden`). An eval-mode
batch norm is an affine map per channel, so it folds into the preceding convolution or
linear layer (:func:`fuse`; Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018, Sec. 3.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from normkit.nn.registry import dim_of, kind_for_source, kind_of
from normkit.tools.convert import _taken_by

__all__ = ["FuseReport", "harden", "fuse", "fuse_conv_bn"]


def _chosen_source(sn: nn.Module, threshold: float) -> Optional[str]:
    if getattr(sn, "hardens_when_one_hot", False):
        threshold = 1.0  # its weights end exactly one-hot: harden only then, changing nothing
    mean_w, var_w = sn.mean_weights.detach(), sn.var_weights.detach()
    k = int(mean_w.argmax())
    if float(mean_w[k]) >= threshold and float(var_w[k]) >= threshold:
        return sn.sources[k]
    return None


def _plain_layer(sn: nn.Module, source: str) -> Optional[nn.Module]:
    """The layer of the kind ``source`` equals, with ``sn``'s options; None where that kind
    cannot express them."""
    kind, options = kind_for_source(source)
    dim = dim_of(sn) or 2
    ref = sn.mean_logits
    kw = {"eps": sn.eps, "affine": sn.affine, "center": sn.center, "scale": sn.scale, "axis": sn.axis,
          "device": ref.device, "dtype": ref.dtype, **options}
    # SN's running statistics are its BN source's: only a kind tracking those takes them over;
    # the other sources always use the sample's statistics.
    takes_running = kind.running == "bn"
    if takes_running:
        kw.update(momentum=sn.momentum, track_running_stats=sn.track_running_stats, frozen=sn.frozen,
                  process_group=sn.process_group)
    else:
        kw["track_running_stats"] = False
    kw = _taken_by(kind.class_for(dim), kw)
    if not (sn.affine and sn.center and sn.scale) and not {"center", "scale"} <= kw.keys():
        return None  # no center/scale-only variant (GroupNorm): keep the SN layer
    new = kind.create(sn.num_features, dim, **kw)
    if takes_running and sn.running_mean is not None:
        with torch.no_grad():
            new.running_mean.copy_(sn.running_mean)
            new.running_var.copy_(sn.running_var)
            new.num_batches_tracked.copy_(sn.num_batches_tracked)
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(sn, name) is not None:
                getattr(new, name).copy_(getattr(sn, name))
                getattr(new, name).requires_grad_(getattr(sn, name).requires_grad)
    return new.train(sn.training)


def _replace_children(model: nn.Module, make: Any) -> nn.Module:
    """Replace every module m of the tree (root included) by make(m) when it is not None."""
    done: dict[int, nn.Module] = {}

    def visit(module: nn.Module) -> nn.Module:
        if id(module) not in done:
            new = make(module)
            if new is None:
                new = module
                for name, child in list(module._modules.items()):
                    if child is not None:
                        setattr(module, name, visit(child))
            done[id(module)] = new
        return done[id(module)]

    return visit(model)


def harden(model: nn.Module, threshold: float = 0.99) -> nn.Module:
    r"""Replace each SN layer that has settled on one source by the plain layer, in place.

    A SwitchNorm layer whose mean *and* variance importance weights both put at least
    ``threshold`` on the same source ``k`` becomes:

    * ``'bn'``: :class:`normkit.BatchNorm{d}d` with its ``eps``, ``momentum``, running
      statistics, ``num_batches_tracked``, ``frozen``, ``process_group``, ``axis``;
    * ``'in'``: :class:`normkit.InstanceNorm{d}d` with ``affine`` as the SN layer (no
      running statistics: SN's IN source always uses the sample's);
    * ``'ln'``: ``normkit.GroupNorm(1, C)`` (the SN paper's LN); ``'gnG'``: ``GroupNorm(G, C)``
      (kept as SN when ``center``/``scale`` is switched off, which GroupNorm cannot express);

    carrying ``weight`` / ``bias``, device, dtype and training flag. With weights of exactly
    one the output is unchanged; with ``w_k >= threshold`` it moves by the ``1 - w_k`` share
    of the other sources. A Sparse SN layer (:class:`normkit.SparseSwitchNorm2d`) is replaced
    only once its weights are exactly one-hot, whatever ``threshold``, so hardening it never
    changes its output. Other layers are left alone (see :func:`normkit.importance_report`).

    Args:
        model: the network (returned; a SwitchNorm passed directly is replaced and returned).
        threshold: minimum weight on the chosen source, in ``(0.5, 1]``. Default: 0.99.

    Returns:
        The model with hardened layers.

    Raises:
        ValueError: ``threshold`` outside ``(0.5, 1]``.

    Examples::

        >>> import torch, normkit
        >>> sn = normkit.SwitchNorm2d(4)
        >>> with torch.no_grad():
        ...     _ = sn.mean_logits.fill_(0.0)[2].fill_(9.0), sn.var_logits.fill_(0.0)[2].fill_(9.0)
        >>> normkit.harden(sn)
        BatchNorm2d(4, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    """
    if not 0.5 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0.5, 1] so that at most one source qualifies, got {threshold}")

    def make(module: nn.Module) -> Optional[nn.Module]:
        kind = kind_of(module)
        if kind is None or not kind.switchable:
            return None
        source = _chosen_source(module, threshold)
        return module if source is None else (_plain_layer(module, source) or module)

    return _replace_children(model, make)


# --------------------------------------------------------------------------------------------
# fuse

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _foldable(linear: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn`` directly after ``linear`` is an affine map on ``linear``'s output channels."""
    kind = kind_of(bn)
    if kind is None or not kind.foldable or bn.running_mean is None:
        return False
    if isinstance(linear, nn.modules.conv._ConvTransposeNd):
        return False
    axis = getattr(bn, "axis", 1)
    if isinstance(linear, _CONVS):
        ok = axis == 1
    elif isinstance(linear, nn.Linear):  # features last: (N, C) inputs, or a channels-last normkit BN
        ok = axis == -1 or (axis == 1 and dim_of(bn) == 1)
    else:
        return False
    return ok and bn.num_features == linear.weight.shape[0]


def fuse_conv_bn(linear: nn.Module, bn: nn.Module) -> nn.Module:
    r"""Fold an eval-mode batch norm into the Conv / Linear before it, in place.

    With :math:`s = \gamma / \sqrt{\text{running\_var} + \epsilon}` per output channel:
    :math:`W' = s\,W`, :math:`b' = s\,(b - \text{running\_mean}) + \beta`. A weight
    parametrization (e.g. :func:`normkit.weight_standardization`) is baked in first.

    Args:
        linear: ``Conv1d/2d/3d`` or ``Linear`` whose output feeds ``bn``.
        bn: ``torch.nn`` or normkit batch norm with running statistics, in eval mode (or
            ``frozen``).

    Returns:
        ``linear`` (now followed by nothing: replace ``bn`` by ``nn.Identity()``).

    Raises:
        ValueError: ``bn`` is training (it would use batch statistics), has no running
            statistics, or does not match ``linear``'s output channels.
    """
    if not _foldable(linear, bn):
        raise ValueError(
            f"cannot fold {type(bn).__name__} into {type(linear).__name__}: expected a batch norm with running "
            "statistics on the output channels of a Conv1d/2d/3d or Linear (channel axis 1 after a conv, "
            "features last after a Linear)"
        )
    if bn.training and not getattr(bn, "frozen", False):
        raise ValueError(
            f"cannot fold a {type(bn).__name__} in training mode (it normalises with batch statistics); "
            "call model.eval() first"
        )
    if parametrize.is_parametrized(linear, "weight"):
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
    with torch.no_grad():
        w = linear.weight
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(dtype)
        shift = -bn.running_mean.to(dtype) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(dtype)
        if linear.bias is not None:
            shift = shift + linear.bias.to(dtype) * scale
        w.copy_((w.to(dtype) * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        if linear.bias is None:
            linear.bias = nn.Parameter(shift.to(w.dtype))
        else:
            linear.bias.copy_(shift.to(linear.bias.dtype))
    return linear


@dataclass
class FuseReport:
    """What :func:`fuse` folded (``(linear_path, bn_path)``) and every batch norm it left,
    with the reason."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)  # (bn_path, why it was not folded)
    traced: bool = True  # found the pairs by tracing (else only inside nn.Sequential)

    def __str__(self) -> str:
        lines = [f"fuse: {len(self.folded)} folded, {len(self.left)} left"
                 + ("" if self.traced else " (not traceable: Sequential pairs only)")]
        lines += [f"  folded {bn} into {linear}" for linear, bn in self.folded]
        lines += [f"  left {bn}: {why}" for bn, why in self.left]
        return "\n".join(lines)


class _NormLeafTracer(torch.fx.Tracer):
    """Traces a model down to its layers: norms (normkit's have Python checks inside) and
    torch.nn modules stay single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return kind_of(m) is not None or super().is_leaf_module(m, qualname)


def _why_not(bn: nn.Module, source: Optional[nn.Module], users: int, calls: dict, node_target: str,
             input_target: Optional[str]) -> Optional[str]:
    """Why the batch norm called at ``node_target`` cannot fold into the module before it."""
    if bn.training and not getattr(bn, "frozen", False):
        return "in training mode (it normalises with batch statistics): call model.eval() first"
    if bn.running_mean is None:
        return "no running statistics (track_running_stats=False)"
    if source is None or not isinstance(source, (*_CONVS, nn.Linear)):
        return "its input is not the output of a Conv1d/2d/3d or Linear"
    if users > 1:
        return f"the output of {input_target} is used elsewhere too"
    if calls[node_target] > 1 or calls[input_target] > 1:
        return "the batch norm or its Conv/Linear is called more than once"
    if not _foldable(source, bn):
        return f"not an affine map on the output channels of {input_target} (axis, channels or transposed conv)"
    return None


def _traced_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(foldable (linear, bn) pairs, (bn, reason) left) found on the model's torch.fx graph."""
    graph = _NormLeafTracer().trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs, left = [], []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_batch_norm(modules[node.target]):
            continue
        first = node.args[0] if node.args else None
        is_module = isinstance(first, torch.fx.Node) and first.op == "call_module"
        source = modules[first.target] if is_module else None
        users = len(first.users) if isinstance(first, torch.fx.Node) else 0
        why = _why_not(modules[node.target], source, users, calls, node.target, first.target if is_module else None)
        if why is None:
            pairs.append((first.target, node.target))
        else:
            left.append((node.target, why))
    left += [(path, "not called in forward") for path, m in modules.items() if _is_batch_norm(m) and path not in calls]
    return pairs, left


def _is_batch_norm(module: nn.Module) -> bool:
    kind = kind_of(module)
    return kind is not None and kind.foldable


def _sequential_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Foldable consecutive (linear, bn) children of every nn.Sequential, and the rest."""
    pairs = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            linear, bn = module._modules[first], module._modules[second]
            if _is_batch_norm(bn):
                prefix = f"{path}." if path else ""
                if _foldable(linear, bn) and (not bn.training or getattr(bn, "frozen", False)):
                    pairs.append((prefix + first, prefix + second))
    folded = {bn for _, bn in pairs}
    left = [(p, "not directly after a Conv/Linear in an nn.Sequential (the model is not traceable)")
            for p, m in model.named_modules() if _is_batch_norm(m) and p not in folded]
    return pairs, left


def fuse(model: nn.Module, pairs: Optional[Iterable[tuple[str, str]]] = None, *,
         report: bool = False) -> Union[nn.Module, tuple[nn.Module, FuseReport]]:
    """Fold every eval-mode batch norm that directly follows a Conv / Linear, in place.

    The pairs are found by tracing ``model`` with ``torch.fx`` (norm layers are single calls):
    a batch norm (``torch.nn`` or normkit, including SN layers :func:`harden` turned into BN)
    with running statistics, in eval mode (or ``frozen``), whose input is the output of a
    Conv1d/2d/3d or Linear used nowhere else, each called once. So a ResNet block's
    ``conv1`` / ``bn1`` fold wherever its ``forward`` calls them. Each folded batch norm
    becomes ``nn.Identity()``; the model keeps its class. A model ``torch.fx`` cannot trace
    (data-dependent control flow) falls back to consecutive children of every
    ``nn.Sequential``, and the report says so. Outputs are unchanged up to rounding
    (folding is done in float32 at least). Transposed convolutions are not folded.

    Args:
        model: the network, in eval mode.
        pairs: more ``(linear_path, bn_path)`` module paths to fold (checked as
            :func:`fuse_conv_bn` does).
        report: also return a :class:`FuseReport`: what was folded, and every batch norm
            left with the reason. Default: False.

    Returns:
        ``model``, with the report when ``report=True``.

    Raises:
        ValueError: a pair of ``pairs`` that cannot be folded or a path that does not exist.

    Examples::

        >>> import torch, normkit
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
        >>> normkit.fuse(net)[1]
        Identity()
    """
    result = FuseReport()
    try:
        found, left = _traced_pairs(model)
    except Exception as error:  # torch.fx cannot trace every model; say so and do what is sure
        result.traced = False
        found, left = _sequential_pairs(model)
        left = [(p, f"{why}; trace error: {type(error).__name__}: {error}") for p, why in left]
    asked = [pair for pair in pairs or () if tuple(pair) not in found]
    for linear_path, bn_path in found + asked:
        linear, bn = _get(model, linear_path), _get(model, bn_path)
        fuse_conv_bn(linear, bn)
        parent, _, name = bn_path.rpartition(".")
        setattr(_get(model, parent) if parent else model, name, nn.Identity())
        result.folded.append((linear_path, bn_path))
    done = {bn for _, bn in result.folded}
    result.left = [(p, why) for p, why in left if p not in done]
    return (model, result) if report else model


def _get(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"fuse: no module at path {path!r} in {type(model).__name__}") from None
