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

import array
import math
from typing import Optional, Union

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
#
# The layers' logits are K numbers (K <= 4 in practice), for which a handful of tensor ops and
# their autograd nodes cost far more than the arithmetic. So on plain eager CPU tensors both
# rows are solved, and differentiated, in straight-line Python floats behind one autograd
# node; the closed-form vector-Jacobian product of the branch taken is kept for the backward.

def _solve(z: list[float], r2: float) -> tuple[list[float], Optional[tuple]]:
    """One row of :func:`sparsestmax` at squared radius ``r2``, in Python floats: ``(weights,
    vjp)``, with ``vjp = (support, 1 / size, scale, direction)`` describing the Jacobian
    ``scale * (I - v v^T) P`` of the branch taken (``P`` the centring on the ``support``
    indices, ``v`` the unit ``direction`` on them, or None on the sparsemax branch), or
    ``None`` where the weights are locally constant (the tie / one-hot point).

    The same decisions as :func:`sparsestmax`, with each KKT candidate of the sphere branch
    in O(1) from running sums (``sum (d - mean)^2 = sum d^2 - n mean^2`` is stable here: the
    first entry of ``d`` is 0, so the spread is at least ``sum d^2 / n``)."""
    k = len(z)
    order = sorted(range(k), key=z.__getitem__, reverse=True)  # stable: ties keep index order
    s = [z[i] for i in order]
    # sparsemax: the support is the prefix of sorted entries with 1 + j s_j > sum_{i<=j} s_i
    cumulative, size, total = 0.0, 1, s[0]
    j = 0
    for value in s:
        j += 1
        cumulative += value
        if 1 + j * value > cumulative:
            size, total = j, cumulative
    if r2 > 0.0:
        tau = (total - 1) / size
        centre = 1.0 / k
        distance2 = 0.0
        for v in z:
            v = max(v - tau, 0.0) - centre
            distance2 += v * v
        if distance2 < r2:  # inside the ball: the answer is on the sphere ||p||^2 = r^2 + 1/K
            return _on_sphere(z, order, s, r2 + centre)
    inv_size = 1.0 / size
    support = sorted(order[:size])
    mean = 0.0
    for i in support:
        mean += z[i]
    mean *= inv_size
    weights = [0.0] * k
    for i in support:
        weights[i] = inv_size + (z[i] - mean)
    return weights, (support, inv_size, 1.0, None)


def _on_sphere(z: list[float], order: list[int], s: list[float], total2: float) -> tuple[list[float], Optional[tuple]]:
    """:func:`_solve`'s sphere branch, ``||p||^2 = total2 = r^2 + 1/K``."""
    k = len(z)
    top = s[0]
    m = s.count(top)
    weights = [0.0] * k
    if total2 >= 1.0 / m - _TOL:  # the tie / one-hot point: constant
        first = order[0]  # the lowest tied index
        if m == 1:
            weights[first] = 1.0
            return weights, None
        step = math.sqrt(max(total2 - 1.0 / m, 0.0)) / math.sqrt((m - 1) / m)
        share = 1.0 / m
        for i in order[:m]:
            weights[i] = share + step * -share
        weights[first] = share + step * (1.0 - share)
        return weights, None
    # KKT points on the n largest entries; differences from the largest are exact zeros for
    # entries tied with it. The objective <p, d> of candidate n is mean + rho * spread.
    best, size, best_rho = -math.inf, 1, 0.0
    sum1 = sum2 = 0.0
    for n in range(1, k + 1):
        d = s[n - 1] - top
        sum1 += d
        sum2 += d * d
        if n == 1:
            continue
        mean = sum1 / n
        spread2 = sum2 - sum1 * mean
        if not spread2 > 0:
            continue
        rho = math.sqrt(max(total2 - 1.0 / n, 0.0))
        spread = math.sqrt(spread2)
        step = rho / spread
        if 1.0 / n + step * (d - mean) < -_TOL:
            continue
        if n < k and 1.0 / n + step * (s[n] - top - mean) > _TOL:
            continue
        objective = mean + rho * spread
        if objective > best:
            best, size, best_rho = objective, n, rho
    if size == 1:  # no candidate (not reached for valid inputs): the largest entry's vertex
        weights[order[0]] = 1.0
        return weights, None
    # the weights from the logits centred on the support (as the tensor version computes them)
    support = sorted(order[:size])
    inv_size = 1.0 / size
    mean = 0.0
    for i in support:
        mean += z[i]
    mean *= inv_size
    centred = [z[i] - mean for i in support]
    length = 0.0
    for c in centred:
        length += c * c
    length = math.sqrt(length)
    if not length > 0:  # (not reached for valid inputs) the support's centre, constant
        for i in support:
            weights[i] = inv_size
        return weights, None
    scale = best_rho / length
    for i, c in zip(support, centred):
        weights[i] = inv_size + scale * c
    return weights, (support, inv_size, scale, [c / length for c in centred])


def _solve3(z: list[float], r2: float) -> tuple[list[float], Optional[tuple]]:
    """:func:`_solve` for three entries (the layers' default ``in, ln, bn``), unrolled: the
    same operations in the same order, so the same bits, at under half the interpreter's
    work. Ties at the top and non-finite logits take the general code."""
    a, b, c = z
    t = a + b + c
    if t - t != 0.0:  # inf or NaN somewhere (or an overflowing sum)
        return _solve(z, r2)
    # stable descending sort: ties keep index order
    if b > a:
        i0, v0, i1, v1 = 1, b, 0, a
    else:
        i0, v0, i1, v1 = 0, a, 1, b
    if c > v0:
        i0, i1, i2, s0, s1, s2 = 2, i0, i1, c, v0, v1
    elif c > v1:
        i0, i1, i2, s0, s1, s2 = i0, 2, i1, v0, c, v1
    else:
        i0, i1, i2, s0, s1, s2 = i0, i1, 2, v0, v1, c
    c2 = s0 + s1
    c3 = c2 + s2
    if 1 + 3 * s2 > c3:
        size, total = 3, c3
    elif 1 + 2 * s1 > c2:
        size, total = 2, c2
    else:
        size, total = 1, s0
    if r2 > 0.0:
        tau = (total - 1) / size
        centre = 1.0 / 3
        x0, x1, x2 = a - tau, b - tau, c - tau
        x0 = (x0 if x0 > 0.0 else 0.0) - centre
        x1 = (x1 if x1 > 0.0 else 0.0) - centre
        x2 = (x2 if x2 > 0.0 else 0.0) - centre
        if x0 * x0 + x1 * x1 + x2 * x2 < r2:  # on the sphere
            total2 = r2 + centre
            if s1 == s0:
                return _on_sphere(z, [i0, i1, i2], [s0, s1, s2], total2)
            if total2 >= 1.0 - _TOL:  # one-hot
                weights = [0.0, 0.0, 0.0]
                weights[i0] = 1.0
                return weights, None
            # the KKT candidates on the top 2 and on all 3 entries
            best, size, best_rho = -math.inf, 1, 0.0
            d1 = s1 - s0
            d2 = s2 - s0
            mean = d1 / 2
            spread2 = d1 * d1 - d1 * mean
            if spread2 > 0:
                rho = math.sqrt(max(total2 - 1.0 / 2, 0.0))
                spread = math.sqrt(spread2)
                step = rho / spread
                if not (1.0 / 2 + step * (d1 - mean) < -_TOL or 1.0 / 2 + step * (d2 - mean) > _TOL):
                    best, size, best_rho = mean + rho * spread, 2, rho
            sum1 = d1 + d2
            mean = sum1 / 3
            spread2 = (d1 * d1 + d2 * d2) - sum1 * mean
            if spread2 > 0:
                rho = math.sqrt(max(total2 - 1.0 / 3, 0.0))
                spread = math.sqrt(spread2)
                step = rho / spread
                if not 1.0 / 3 + step * (d2 - mean) < -_TOL and mean + rho * spread > best:
                    size, best_rho = 3, rho
            if size == 1:
                weights = [0.0, 0.0, 0.0]
                weights[i0] = 1.0
                return weights, None
            if size == 3:
                inv_size = 1.0 / 3
                mean = (a + b + c) * inv_size
                e0, e1, e2 = a - mean, b - mean, c - mean
                length = math.sqrt(e0 * e0 + e1 * e1 + e2 * e2)
                if not length > 0:
                    return [inv_size, inv_size, inv_size], None
                scale = best_rho / length
                return ([inv_size + scale * e0, inv_size + scale * e1, inv_size + scale * e2],
                        ((0, 1, 2), inv_size, scale, [e0 / length, e1 / length, e2 / length]))
            lo, hi = (i0, i1) if i0 < i1 else (i1, i0)
            mean = (z[lo] + z[hi]) * 0.5
            e0, e1 = z[lo] - mean, z[hi] - mean
            length = math.sqrt(e0 * e0 + e1 * e1)
            weights = [0.0, 0.0, 0.0]
            if not length > 0:
                weights[lo] = weights[hi] = 0.5
                return weights, None
            scale = best_rho / length
            weights[lo] = 0.5 + scale * e0
            weights[hi] = 0.5 + scale * e1
            return weights, ((lo, hi), 0.5, scale, [e0 / length, e1 / length])
    # sparsemax
    if size == 3:
        inv_size = 1.0 / 3
        mean = (a + b + c) * inv_size
        return [inv_size + (a - mean), inv_size + (b - mean), inv_size + (c - mean)], ((0, 1, 2), inv_size, 1.0, None)
    weights = [0.0, 0.0, 0.0]
    if size == 2:
        lo, hi = (i0, i1) if i0 < i1 else (i1, i0)
        mean = (z[lo] + z[hi]) * 0.5
        weights[lo] = 0.5 + (z[lo] - mean)
        weights[hi] = 0.5 + (z[hi] - mean)
        return weights, ((lo, hi), 0.5, 1.0, None)
    weights[i0] = 1.0 + (z[i0] - z[i0])
    return weights, ((i0,), 1.0, 1.0, None)


def _pullback(vjp: Optional[tuple], g: list[float]) -> list[float]:
    """``J^T g`` for one row (``J`` symmetric: ``scale (I - v v^T) P`` with ``v`` in ``P``'s range)."""
    out = [0.0] * len(g)
    if vjp is None:
        return out
    support, inv_size, scale, direction = vjp
    n = len(support)
    if n == 2:
        i, j = support
        gi, gj = g[i], g[j]
        g_mean = (gi + gj) * inv_size
        pi, pj = gi - g_mean, gj - g_mean
        if direction is not None:
            vi, vj = direction
            along = pi * vi + pj * vj
            pi, pj = pi - along * vi, pj - along * vj
        out[i], out[j] = scale * pi, scale * pj
        return out
    if n == 3 and len(g) == 3:
        g0, g1, g2 = g
        g_mean = (g0 + g1 + g2) * inv_size
        p0, p1, p2 = g0 - g_mean, g1 - g_mean, g2 - g_mean
        if direction is not None:
            v0, v1, v2 = direction
            along = p0 * v0 + p1 * v1 + p2 * v2
            p0, p1, p2 = p0 - along * v0, p1 - along * v1, p2 - along * v2
        return [scale * p0, scale * p1, scale * p2]
    g_mean = 0.0
    for i in support:
        g_mean += g[i]
    g_mean *= inv_size
    projected = [g[i] - g_mean for i in support]
    if direction is not None:
        along = 0.0
        for p, v in zip(projected, direction):
            along += p * v
        projected = [p - along * v for p, v in zip(projected, direction)]
    for i, p in zip(support, projected):
        out[i] = scale * p
    return out


_TYPECODES = {torch.float64: "d", torch.float32: "f"}


def _cpu_vector(values: list[float], dtype: torch.dtype) -> Tensor:
    """A fresh 1-D CPU tensor of ``values``: through an ``array`` buffer for float64 / float32
    (a third of ``torch.tensor``'s cost), else ``torch.tensor``."""
    code = _TYPECODES.get(dtype)
    if code is None:
        return torch.tensor(values, dtype=dtype)
    return torch.frombuffer(array.array(code, values), dtype=dtype)


def _host_decidable(z: Tensor) -> bool:
    """Plain eager CPU values: the branch can be read on the host at no synchronisation cost."""
    return (type(z) is Tensor or type(z) is torch.nn.Parameter) and z.is_cpu \
        and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active() \
        and torch.autograd.forward_ad._current_level < 0


def _plain(g: Tensor) -> bool:
    """A dense CPU tensor: not a batched gradient (torch's batched-gradient checks run the
    backward under the legacy ``Batched`` key, with no ``torch.func`` transform active)."""
    return torch._C._dispatch_keys(g).has(torch._C.DispatchKey.CPU)


class _HostWeights(torch.autograd.Function):
    """Both weight vectors in one node, computed and differentiated in Python floats (the
    rows are K numbers); a graph of the gradient (double backward) or a ``torch.func``
    transform in the backward recomputes them with the all-tensor :func:`sparsestmax`."""

    @staticmethod
    def forward(ctx, mean_logits, var_logits, radius):  # type: ignore[override]
        r2 = radius * radius
        solve = _solve3 if mean_logits.shape[0] == 3 else _solve
        mean_weights, ctx.mean_vjp = solve(mean_logits.tolist(), r2)
        var_weights, ctx.var_vjp = solve(var_logits.tolist(), r2)
        ctx.radius = radius
        ctx.dtypes = (mean_logits.dtype, var_logits.dtype)
        ctx.save_for_backward(mean_logits, var_logits)
        return _cpu_vector(mean_weights, torch.float64), _cpu_vector(var_weights, torch.float64)

    @staticmethod
    def backward(ctx, grad_mean, grad_var):  # type: ignore[override]
        # a gradient graph is wanted, or the incoming gradients are batched (torch's batched
        # gradient checks vmap the backward): differentiate the tensor version instead
        if torch.is_grad_enabled() or torch._C._are_functorch_transforms_active() \
                or not (_plain(grad_mean) and _plain(grad_var)):
            mean_logits, var_logits = ctx.saved_tensors
            with torch.enable_grad():
                # with a graph wanted, differentiate the saved inputs themselves so that the
                # gradient stays a function of the logits (double backward)
                leaves = [t if torch.is_grad_enabled() and t.requires_grad else t.detach().requires_grad_()
                          for t in (mean_logits, var_logits)]
                w = sparsestmax(torch.stack(leaves).to(torch.float64), ctx.radius)
                grads = torch.autograd.grad(w, leaves, torch.stack([grad_mean, grad_var]),
                                            create_graph=torch.is_grad_enabled())
            return grads[0], grads[1], None
        need_mean, need_var = ctx.needs_input_grad[:2]
        mean_dtype, var_dtype = ctx.dtypes
        return (_cpu_vector(_pullback(ctx.mean_vjp, grad_mean.tolist()), mean_dtype) if need_mean else None,
                _cpu_vector(_pullback(ctx.var_vjp, grad_var.tolist()), var_dtype) if need_var else None,
                None)


# Function.apply's Python wrapper only unwraps dead functorch wrappers and routes active
# transforms; the host path runs with no transform active (_host_decidable), so it calls
# autograd's entry point directly (a quarter of the node's fixed cost).
_host_weights = super(torch.autograd.Function, _HostWeights).apply


def sparsestmax_weights(mean_logits: Tensor, var_logits: Tensor, radius: Union[float, Tensor]
                        ) -> tuple[Tensor, Tensor]:
    """``(sparsestmax(mean_logits, r), sparsestmax(var_logits, r))`` in float64, differentiable:
    Sparse Switchable Normalization's policy (the counterpart of ``softmax_weights``).

    On plain CPU tensors in eager mode each row (K numbers) is solved and differentiated in
    Python floats behind one autograd node (about what two softmaxes cost); elsewhere (CUDA,
    compile, FakeTensor, ``torch.func`` transforms) the all-tensor :func:`sparsestmax` runs.
    Both give the same weights and gradients.
    """
    return layer_weights(mean_logits, var_logits, _checked_radius(radius, mean_logits.shape[-1]))


def layer_weights(mean_logits: Tensor, var_logits: Tensor, radius: Union[float, Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`sparsestmax_weights` for a radius already checked (a float, or a 0-d tensor,
    which is read on the host when it is on the CPU): the layers' entry point."""
    if not (_host_decidable(mean_logits) and _host_decidable(var_logits)):
        w = sparsestmax(torch.stack([mean_logits, var_logits]).to(torch.float64), radius)
        return w[0], w[1]
    if type(radius) is not float:
        radius = float(radius.detach().tolist() if isinstance(radius, Tensor) and radius.is_cpu else radius)
    return _host_weights(mean_logits, var_logits, radius)
