r"""Sparsemax and sparsestmax: Euclidean projections of logits onto the probability simplex.

* **sparsemax** (Martins & Astudillo, "From Softmax to Sparsemax", ICML 2016):
  :math:`\mathrm{sparsemax}(z) = \arg\min_{p \in \Delta} \lVert p - z \rVert^2` with
  :math:`\Delta = \{p \ge 0, \mathbf 1^\top p = 1\}`; the solution is :math:`(z - \tau)_+`.
* **sparsestmax** (Shao, Luo et al., "SSN: Learning Sparse Switchable Normalization via
  SparsestMax", CVPR 2019): the same projection onto the simplex *outside* the ball of radius
  :math:`r` around its centre :math:`u = \mathbf 1 / K`,

  .. math:: \mathrm{sparsestmax}(z; r) = \arg\min_{p \in \Delta,\ \lVert p - u \rVert \ge r} \lVert p - z \rVert^2 .

  ``r = 0`` is sparsemax. The largest radius, :math:`r_c = \sqrt{1 - 1/K}` (the distance from
  the centre to a vertex), leaves only the vertices: the output is one-hot.

How it is solved (exactly, for any ``K``). If the sparsemax point is at least ``r`` from the
centre it is the answer. Otherwise the answer lies on the sphere :math:`\lVert p - u \rVert = r`,
where :math:`\lVert p - z \rVert^2 = \text{const} - 2 \langle z, p \rangle`: maximise
:math:`\langle z, p\rangle` over the simplex with :math:`\lVert p \rVert^2 = R^2 = r^2 + 1/K`.
Its KKT points are, for a support :math:`S` of the ``k`` largest logits,

.. math:: p_S = \frac{1}{k} + \rho_k \frac{z_S - \bar z_S}{\lVert z_S - \bar z_S \rVert}, \qquad \rho_k = \sqrt{R^2 - 1/k},

valid when :math:`p_S \ge 0` and no excluded logit would get a positive weight; the valid one
with the largest :math:`\langle z, p\rangle` is the projection. (The official code's
stage-wise construction for ``K = 3`` reaches the same points.)

Ties. When the largest logit is shared by ``m`` entries and the sphere reaches their face
(:math:`R^2 \ge 1/m`), every point of that face on the sphere is optimal. The tie goes to the
first (lowest-index) tied entry: :math:`p = u_T + \rho_m (e_f - u_T) / \lVert e_f - u_T \rVert`
on the tied set :math:`T`, ``f`` its first index. This is also the one-hot case
(:math:`m = 1`, :math:`r = r_c`), and the case of equal logits with ``r > 0``. The outputs are a
deterministic function of ``(z, r)``: equal inputs give bit-equal outputs.

Gradients are plain autograd through the branch that was taken (the support and the branch
are piecewise-constant decisions): sparsemax's Jacobian on the sparsemax branch, the
normalised-direction Jacobian on the sphere branch, zero on the tie / one-hot branch. Away
from the kinks these are the derivatives; at a kink they are one of the one-sided ones.
Every operation is a torch op on ``(..., K)`` tensors (no host synchronisation, no Python
branching on values), so it runs under vmap, FakeTensor, the meta device and compile.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
from torch import Tensor

__all__ = ["max_radius", "sparsemax", "sparsestmax", "sparsestmax_weights"]

# Numerical slack of the KKT checks, relative to weights of order 1 (float64).
_TOL = 1e-12


def max_radius(k: int) -> float:
    """:math:`\\sqrt{1 - 1/K}`: the radius at which sparsestmax over ``k`` entries is one-hot."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of entries must be a positive int, got {k!r}")
    return math.sqrt(1.0 - 1.0 / k)


def _ranks(k: int, z: Tensor) -> Tensor:
    return torch.arange(1, k + 1, dtype=z.dtype, device=z.device)


def sparsemax(z: Tensor, dim: int = -1) -> Tensor:
    """The Euclidean projection of ``z`` onto the probability simplex along ``dim``.

    ``(z - tau)_+`` with ``tau`` the threshold that makes the entries sum to 1. Differentiable
    (its Jacobian is ``diag(s) - s s^T / |s|`` on the support ``s``).
    """
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise TypeError(f"sparsemax expects a floating-point tensor, got {type(z).__name__ if not isinstance(z, Tensor) else z.dtype}")
    z = z.movedim(dim, -1)
    k = z.shape[-1]
    s = torch.sort(z, dim=-1, descending=True).values
    cumulative = s.cumsum(-1)
    ranks = _ranks(k, z)
    in_support = 1 + ranks * s > cumulative  # true for a prefix of the sorted entries
    size = in_support.sum(-1, keepdim=True)
    tau = (cumulative.gather(-1, size - 1) - 1) / size.to(z.dtype)
    return torch.clamp(z - tau, min=0).movedim(-1, dim)


def _sphere_branches(z: Tensor, radius2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Decisions of the sphere case for rows ``z`` (..., K), no gradient: ``(tie_row, tie_point,
    support, size, rho)`` where a tie row takes the constant ``tie_point`` and the others take
    the KKT point of ``support`` (bool, original order) of ``size`` entries, with ``rho``."""
    k = z.shape[-1]
    total2 = radius2 + 1.0 / k  # R^2 = r^2 + 1/K
    ranks = _ranks(k, z)
    top = z.max(-1, keepdim=True).values
    tied = z == top
    m = tied.sum(-1, keepdim=True).to(z.dtype)
    tie_row = (total2 >= 1.0 / m - _TOL).squeeze(-1)
    # the tie point: from the tied face's centre towards its first vertex, at radius rho_m
    positions = torch.arange(k, device=z.device)
    first = (positions == tied.to(torch.uint8).argmax(-1, keepdim=True)).to(z.dtype)
    rho_m = torch.sqrt(torch.clamp(total2 - 1.0 / m, min=0.0))
    to_vertex = first - tied.to(z.dtype) / m
    length = torch.sqrt(torch.clamp((m - 1) / m, min=0.0))
    tie_point = tied.to(z.dtype) / m + torch.where(length > 0, rho_m / torch.where(length > 0, length, 1.0), 0.0) * to_vertex
    # KKT candidates: the k largest entries, k = 1..K; differences from the largest are exact
    # zeros for entries tied with it
    s, order = torch.sort(z, dim=-1, descending=True, stable=True)
    d = s - s[..., :1]
    lower = torch.tril(torch.ones(k, k, dtype=torch.bool, device=z.device))  # [k-1, i]: i < k
    mean = (d.cumsum(-1) / ranks).unsqueeze(-1)  # (..., K, 1): mean of the first k
    centred = torch.where(lower, d.unsqueeze(-2) - mean, 0.0)  # (..., K, K)
    spread = torch.sqrt((centred * centred).sum(-1, keepdim=True))
    rho = torch.sqrt(torch.clamp(total2.unsqueeze(-1) - 1.0 / ranks.unsqueeze(-1), min=0.0))
    step = rho / torch.where(spread > 0, spread, 1.0)
    weights = torch.where(lower, 1.0 / ranks.unsqueeze(-1) + step * centred, 0.0)
    smallest = weights.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # the k-th weight of candidate k
    after = torch.cat([d[..., 1:], d.new_full(d.shape[:-1] + (1,), -math.inf)], -1).unsqueeze(-1)
    excluded = 1.0 / ranks.unsqueeze(-1) + step * (after - mean)  # the weight the next entry would get
    ok = (spread > 0) & (smallest >= -_TOL) & ((excluded <= _TOL) | (after == -math.inf))
    objective = (weights * d.unsqueeze(-2)).sum(-1, keepdim=True)
    chosen = torch.where(ok, objective, -math.inf).argmax(-2, keepdim=True)  # (..., 1, 1)
    size = (chosen.squeeze(-1) + 1)
    support = order.argsort(-1) < size  # entry i is in the support when its rank is below size
    return tie_row, tie_point, support, size.to(z.dtype), rho.squeeze(-1).gather(-1, chosen.squeeze(-1))


def _checked_radius(radius: Union[float, Tensor], k: int) -> Union[float, Tensor]:
    if isinstance(radius, Tensor):
        if radius.dim() != 0:
            raise ValueError(f"radius must be a number or a 0-d tensor, got a tensor of shape {tuple(radius.shape)}")
        return radius.detach()
    if isinstance(radius, (int, float)) and not isinstance(radius, bool):
        if not 0.0 <= radius <= max_radius(k) + _TOL:
            raise ValueError(
                f"radius must be in [0, sqrt(1 - 1/K)] = [0, {max_radius(k):.6f}] for K = {k} entries, got {radius!r}"
            )
        return float(radius)
    raise ValueError(f"radius must be a number or a 0-d tensor, got {type(radius).__name__}")


def sparsestmax(z: Tensor, radius: Union[float, Tensor], dim: int = -1) -> Tensor:
    r"""The projection of ``z`` onto the simplex outside the ball of radius ``radius`` around
    its centre (see the module docstring), along ``dim``.

    Args:
        z: logits, any floating dtype (computed in it; the layers pass float64).
        radius: :math:`r \in [0, \sqrt{1 - 1/K}]`, a number or a 0-d tensor (not
            differentiated). ``0``: sparsemax; ``sqrt(1 - 1/K)``: one-hot at the largest
            logit (the first one on a tie).
        dim: the axis of the ``K`` entries. Default: -1.

    Returns:
        Weights of ``z``'s shape, non-negative, summing to 1 along ``dim``, at least
        ``radius`` from the centre.

    Raises:
        ValueError: ``radius`` outside :math:`[0, \sqrt{1 - 1/K}]` (a number), or not a
            number or 0-d tensor.

    Examples::

        >>> import torch
        >>> from normkit._core.sparsestmax import sparsestmax
        >>> sparsestmax(torch.tensor([0.2, 0.1, 0.0], dtype=torch.float64), 0.0)
        tensor([0.4333, 0.3333, 0.2333], dtype=torch.float64)
        >>> sparsestmax(torch.tensor([0.2, 0.1, 0.0], dtype=torch.float64), 0.5)
        tensor([0.7041, 0.2959, 0.0000], dtype=torch.float64)
    """
    if not isinstance(z, Tensor) or not z.is_floating_point():
        raise TypeError(f"sparsestmax expects a floating-point tensor, got {type(z).__name__ if not isinstance(z, Tensor) else z.dtype}")
    z = z.movedim(dim, -1)
    k = z.shape[-1]
    radius = _checked_radius(radius, k)
    r = torch.as_tensor(radius, dtype=z.dtype, device=z.device)
    p0 = sparsemax(z)
    with torch.no_grad():
        radius2 = (r * r).expand(z.shape[:-1]).unsqueeze(-1)
        on_sphere = (((p0 - 1.0 / k) ** 2).sum(-1, keepdim=True) < radius2).squeeze(-1)
        tie_row, tie_point, support, size, rho = _sphere_branches(z.detach(), radius2)
    inside = support.to(z.dtype)
    centred = (z - (z * inside).sum(-1, keepdim=True) / size) * inside
    norm2 = (centred * centred).sum(-1, keepdim=True)
    # sqrt of a guarded value: sqrt'(0) is infinite and would turn the unused branch's zero
    # gradient into NaN
    kkt = inside / size + rho * centred / torch.sqrt(torch.where(norm2 > 0, norm2, 1.0))
    sphere = torch.where(tie_row.unsqueeze(-1), tie_point, kkt)
    return torch.where(on_sphere.unsqueeze(-1), sphere, p0).movedim(-1, dim)


# ---- the layers' weights: the same projection with the branch decided on the host ------------

def _plan(z: list[float], r: float) -> list[float]:
    """The branch :func:`sparsestmax` takes for one row, decided in Python floats, as the row
    ``[support mask (K), 1 / size, coef, normalise, b (K)]``: the weights are ``b + coef * c``
    with ``c`` the logits centred on the support (``c / |c|`` when ``normalise``)."""
    k = len(z)
    order = sorted(range(k), key=lambda i: (-z[i], i))
    s = [z[i] for i in order]

    def on(size: int, coef: float, normalise: bool) -> list[float]:
        mask = [0.0] * k
        for i in order[:size]:
            mask[i] = 1.0
        return [*mask, 1.0 / size, coef, float(normalise), *(v / size for v in mask)]

    cumulative, size0, total = 0.0, 1, s[0]
    for j, value in enumerate(s):
        cumulative += value
        if 1 + (j + 1) * value > cumulative:
            size0, total = j + 1, cumulative
    tau = (total - 1) / size0
    if not sum((max(v - tau, 0.0) - 1.0 / k) ** 2 for v in z) < r * r:
        return on(size0, 1.0, False)  # sparsemax: b + (z - mean_S z) on the support
    total2 = r * r + 1.0 / k
    tied = [float(v == s[0]) for v in z]
    m = sum(tied)
    if total2 >= 1.0 / m - _TOL:  # the tie / one-hot point: constant
        first = tied.index(1.0)
        length = math.sqrt(max((m - 1) / m, 0.0))
        step = math.sqrt(max(total2 - 1.0 / m, 0.0)) / length if length > 0 else 0.0
        b = [t / m + step * ((i == first) - t / m) for i, t in enumerate(tied)]
        return [*([0.0] * k), 1.0, 0.0, 0.0, *b]
    d = [v - s[0] for v in s]
    best, best_size, best_rho = -math.inf, 1, 0.0
    for size in range(2, k + 1):
        mean = sum(d[:size]) / size
        spread2 = sum((v - mean) ** 2 for v in d[:size])
        if not spread2 > 0:
            continue
        rho = math.sqrt(max(total2 - 1.0 / size, 0.0))
        step = rho / math.sqrt(spread2)
        if 1.0 / size + step * (d[size - 1] - mean) < -_TOL:
            continue
        if size < k and 1.0 / size + step * (d[size] - mean) > _TOL:
            continue
        objective = sum((1.0 / size + step * (v - mean)) * v for v in d[:size])
        if objective > best:
            best, best_size, best_rho = objective, size, rho
    return on(best_size, best_rho, True)


def _host_decidable(z: Tensor) -> bool:
    """Plain eager CPU values: the branch can be read on the host at no synchronisation cost."""
    return (type(z) is Tensor or type(z) is torch.nn.Parameter) and z.device.type == "cpu" \
        and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active() \
        and torch.autograd.forward_ad._current_level < 0


def _weights_and_pullback(z: list[float], r: float) -> tuple[list[float], Callable[[list[float]], list[float]]]:
    """One row's weights in Python floats and the vector-Jacobian product of that branch."""
    k = len(z)
    plan = _plan(z, r)
    mask, inv_size, coef, normalise, b = plan[:k], plan[k], plan[k + 1], plan[k + 2], plan[k + 3:]
    mean = sum(v for v, m in zip(z, mask) if m) * inv_size
    centred = [(v - mean) * m for v, m in zip(z, mask)]
    length = math.sqrt(sum(c * c for c in centred)) if normalise else 1.0
    scale = coef / length if length > 0 else 0.0
    direction = [c / length for c in centred] if normalise and length > 0 else None
    weights = [bi + scale * c for bi, c in zip(b, centred)]

    def pullback(g: list[float]) -> list[float]:
        # J = scale * (I - v v^T) P, with P the centring on the support (symmetric, v in its range)
        g_mean = sum(gi for gi, m in zip(g, mask) if m) * inv_size
        projected = [(gi - g_mean) * m for gi, m in zip(g, mask)]
        if direction is not None:
            along = sum(p * v for p, v in zip(projected, direction))
            projected = [p - along * v for p, v in zip(projected, direction)]
        return [scale * p for p in projected]

    return weights, pullback


class _HostWeights(torch.autograd.Function):
    """Both weight vectors in one node, computed and differentiated in Python floats (the
    rows are K numbers); a graph of the gradient (double backward) or a ``torch.func``
    transform in the backward recomputes them with the all-tensor :func:`sparsestmax`."""

    @staticmethod
    def forward(ctx, mean_logits, var_logits, radius):  # type: ignore[override]
        rows = [_weights_and_pullback(t.tolist(), radius) for t in (mean_logits, var_logits)]
        ctx.pullbacks = [pullback for _, pullback in rows]
        ctx.radius = radius
        ctx.save_for_backward(mean_logits, var_logits)
        return tuple(torch.tensor(w, dtype=torch.float64) for w, _ in rows)

    @staticmethod
    def backward(ctx, grad_mean, grad_var):  # type: ignore[override]
        mean_logits, var_logits = ctx.saved_tensors
        # a gradient graph is wanted, or the incoming gradients are batched (torch's batched
        # gradient checks vmap the backward): differentiate the tensor version instead
        dense = all(torch._C._dispatch_keys(g).has(torch._C.DispatchKey.CPU) for g in (grad_mean, grad_var))
        if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active() or not dense:
            with torch.enable_grad():
                # with a graph wanted, differentiate the saved inputs themselves so that the
                # gradient stays a function of the logits (double backward)
                leaves = [t if torch.is_grad_enabled() and t.requires_grad else t.detach().requires_grad_()
                          for t in (mean_logits, var_logits)]
                w = sparsestmax(torch.stack(leaves).to(torch.float64), ctx.radius)
                grads = torch.autograd.grad(w, leaves, torch.stack([grad_mean, grad_var]),
                                            create_graph=torch.is_grad_enabled())
            return grads[0], grads[1], None
        return tuple(torch.tensor(pullback(g.tolist()), dtype=t.dtype) for pullback, g, t
                     in zip(ctx.pullbacks, (grad_mean, grad_var), (mean_logits, var_logits))) + (None,)


def sparsestmax_weights(mean_logits: Tensor, var_logits: Tensor, radius: Union[float, Tensor]
                        ) -> tuple[Tensor, Tensor]:
    """``(sparsestmax(mean_logits, r), sparsestmax(var_logits, r))`` in float64, differentiable:
    Sparse Switchable Normalization's policy (the counterpart of ``softmax_weights``).

    On plain CPU tensors in eager mode each row (K numbers) is solved and differentiated in
    Python floats behind one autograd node, which costs about what two softmaxes cost;
    elsewhere (CUDA, compile, FakeTensor, ``torch.func`` transforms) the all-tensor
    :func:`sparsestmax` runs. Both give the same weights and gradients.
    """
    k = mean_logits.shape[-1]
    radius = _checked_radius(radius, k)
    if not (_host_decidable(mean_logits) and _host_decidable(var_logits)):
        w = sparsestmax(torch.stack([mean_logits, var_logits]).to(torch.float64), radius)
        return w[0], w[1]
    return _HostWeights.apply(mean_logits, var_logits, float(radius))
