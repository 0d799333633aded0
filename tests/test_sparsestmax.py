"""Sparsemax and sparsestmax (normkit._core.sparsestmax): the projection's definition, its
limits, its gradients, its ties, and the layers' host-decided weights against the all-tensor
function."""

from __future__ import annotations

import math

import pytest
import torch

from normkit._core.sparsestmax import max_radius, sparsemax, sparsestmax, sparsestmax_weights

DOUBLE = torch.float64


def _circle_minimum(z: torch.Tensor, r: float, steps: int = 200_000) -> float:
    """min ||p - z||^2 over the feasible set for K = 3, by brute force: the optimum is the
    sparsemax point when it is feasible, else a point of the circle ||p - u|| = r inside the
    simplex (parametrised by angle in the simplex plane)."""
    u = torch.full((3,), 1 / 3, dtype=DOUBLE)
    e1 = torch.tensor([1.0, -1.0, 0.0], dtype=DOUBLE) / math.sqrt(2)
    e2 = torch.tensor([1.0, 1.0, -2.0], dtype=DOUBLE) / math.sqrt(6)
    theta = torch.linspace(0, 2 * math.pi, steps, dtype=DOUBLE)[:, None]
    points = u + r * (torch.cos(theta) * e1 + torch.sin(theta) * e2)
    points = points[(points >= 0).all(1)]
    best = ((points - z) ** 2).sum(1).min().item() if len(points) else math.inf
    p0 = sparsemax(z)
    if ((p0 - u) ** 2).sum().sqrt() >= r:
        best = min(best, ((p0 - z) ** 2).sum().item())
    return best


def _on_simplex(p: torch.Tensor) -> None:
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1], dtype=p.dtype), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(40))
def test_sparsestmax_is_the_projection_for_three_sources(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, generator=g, dtype=DOUBLE) * (0.2 + 2 * torch.rand(1, generator=g).item())
    r = torch.rand(1, generator=g).item() * max_radius(3)
    p = sparsestmax(z, r)
    _on_simplex(p)
    assert ((p - 1 / 3) ** 2).sum().sqrt() >= r - 1e-12
    got = ((p - z) ** 2).sum().item()
    # the brute-force circle is sampled, so it can only be slightly worse than the exact optimum
    assert got <= _circle_minimum(z, r) + 1e-9


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_outputs_on_simplex_outside_the_ball(k):
    z = torch.randn(200, k, dtype=DOUBLE) * torch.rand(200, 1, dtype=DOUBLE) * 3
    for r in (0.0, 0.3 * max_radius(k), 0.7 * max_radius(k), max_radius(k)):
        p = sparsestmax(z, r)
        _on_simplex(p)
        assert torch.all(((p - 1 / k) ** 2).sum(-1).sqrt() >= r - 1e-12)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_one_hot_at_the_maximum_radius(k):
    z = torch.randn(100, k, dtype=DOUBLE)
    p = sparsestmax(z, max_radius(k))
    assert torch.equal(p, torch.nn.functional.one_hot(z.argmax(-1), k).to(DOUBLE))


def test_zero_radius_is_sparsemax_and_sparsemax_is_sparse():
    z = torch.randn(100, 4, dtype=DOUBLE) * 2
    torch.testing.assert_close(sparsestmax(z, 0.0), sparsemax(z), rtol=0, atol=0)
    assert torch.any(sparsemax(z) == 0)
    # sparsemax of logits within a small range is z - mean + 1/K (no clipping): the same
    # as softmax to first order, exactly equal at equal logits
    small = torch.tensor([0.01, -0.02, 0.005], dtype=DOUBLE)
    torch.testing.assert_close(sparsemax(small), small - small.mean() + 1 / 3)
    torch.testing.assert_close(sparsemax(torch.zeros(3, dtype=DOUBLE)), torch.softmax(torch.zeros(3, dtype=DOUBLE), 0))


def test_known_values():
    # the sphere point inside the simplex: u + r (z - mean z) / |z - mean z|
    z = torch.tensor([0.2, 0.1, 0.0], dtype=DOUBLE)
    c = z - z.mean()
    torch.testing.assert_close(sparsestmax(z, 0.3), 1 / 3 + 0.3 * c / c.norm())  # sparsemax is 0.14 from u
    # the circle leaves the simplex: the edge of the two largest, at distance r from u
    z = torch.tensor([1.0, 0.5, -10.0], dtype=DOUBLE)
    p1 = (2 + math.sqrt(4 - 8 * (1 - (0.36 + 1 / 3)))) / 4
    torch.testing.assert_close(sparsestmax(z, 0.6), torch.tensor([p1, 1 - p1, 0.0], dtype=DOUBLE))


@pytest.mark.parametrize("radius", [0.0, 0.25, 0.5, 0.75])
def test_gradients_match_finite_differences_away_from_kinks(radius):
    # logits whose branch and support do not change within the finite-difference step
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(6, 3, generator=g, dtype=DOUBLE) * 0.8).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: sparsestmax(t, radius), (z,), eps=1e-7, atol=1e-7)
    assert torch.autograd.gradgradcheck(lambda t: sparsestmax(t, radius), (z,), eps=1e-7, atol=1e-7)


def test_gradient_formulas():
    # sparsemax branch: (I - 1 1^T / k) on the support
    z = torch.tensor([0.3, 0.2, -5.0], dtype=DOUBLE, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda t: sparsestmax(t, 0.0), z)
    want = torch.tensor([[0.5, -0.5, 0], [-0.5, 0.5, 0], [0, 0, 0]], dtype=DOUBLE)
    torch.testing.assert_close(jac, want)
    # one-hot branch: constant
    jac = torch.autograd.functional.jacobian(lambda t: sparsestmax(t, max_radius(3)), z)
    assert torch.equal(jac, torch.zeros(3, 3, dtype=DOUBLE))
    # sphere branch with full support: r (I - 1 1^T/K - v v^T) / |c|, c the centred logits
    z = torch.tensor([0.2, 0.1, 0.0], dtype=DOUBLE)
    c = z - z.mean()
    v = c / c.norm()
    want = 0.3 * (torch.eye(3, dtype=DOUBLE) - 1 / 3 - torch.outer(v, v)) / c.norm()
    torch.testing.assert_close(torch.autograd.functional.jacobian(lambda t: sparsestmax(t, 0.3), z), want)


def test_ties_are_deterministic_and_go_to_the_first_entry():
    equal = torch.zeros(3, dtype=DOUBLE)
    p = sparsestmax(equal, 0.3)
    step = 0.3 / math.sqrt(2 / 3)  # from the centre towards the first vertex
    torch.testing.assert_close(p, 1 / 3 + step * (torch.tensor([1.0, 0, 0], dtype=DOUBLE) - 1 / 3))
    assert torch.equal(sparsestmax(equal, max_radius(3)), torch.tensor([1.0, 0.0, 0.0], dtype=DOUBLE))
    tied_top = torch.tensor([0.0, 1.0, 1.0], dtype=DOUBLE)  # the second entry wins the tie
    p = sparsestmax(tied_top, 0.7)
    assert p[1] > p[2] and p[0] == 0
    assert torch.equal(sparsestmax(tied_top, max_radius(3)), torch.tensor([0.0, 1.0, 0.0], dtype=DOUBLE))
    # bit-equal on repeated and batched calls
    batch = torch.stack([tied_top, equal, tied_top])
    out = sparsestmax(batch, 0.7)
    assert torch.equal(out[0], out[2]) and torch.equal(out[0], sparsestmax(tied_top, 0.7))


def test_dim_and_tensor_radius():
    z = torch.randn(4, 3, 5, dtype=DOUBLE)
    want = sparsestmax(z.transpose(1, 2), 0.4).transpose(1, 2)
    torch.testing.assert_close(sparsestmax(z, 0.4, dim=1), want)
    torch.testing.assert_close(sparsestmax(z, torch.tensor(0.4), dim=1), want)


def test_runs_on_meta_and_under_vmap():
    assert sparsestmax(torch.zeros(2, 3, device="meta"), 0.2).shape == (2, 3)
    z = torch.randn(5, 3, dtype=DOUBLE)
    torch.testing.assert_close(torch.vmap(lambda t: sparsestmax(t, 0.5))(z), sparsestmax(z, 0.5))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_layer_weights_equal_the_tensor_function(k):
    """sparsestmax_weights decides the branch on the host; values and gradients must be the
    all-tensor function's, on every branch (ties and equal logits included)."""
    g = torch.Generator().manual_seed(k)
    for trial in range(150):
        mean_logits = torch.randn(k, generator=g, dtype=DOUBLE) * (3 * torch.rand(1, generator=g).item())
        var_logits = torch.zeros(k, dtype=DOUBLE) if trial % 5 == 0 else torch.randn(k, generator=g, dtype=DOUBLE)
        if trial % 7 == 0:
            mean_logits[-1] = mean_logits.max()
        radius = [0.0, max_radius(k), torch.rand(1, generator=g).item() * max_radius(k)][trial % 3]
        leaves = [t.clone().requires_grad_() for t in (mean_logits, var_logits)]
        got = torch.stack(sparsestmax_weights(*leaves, radius))
        want = sparsestmax(torch.stack(leaves), radius)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        probe = torch.randn(2, k, generator=g, dtype=DOUBLE)
        got_grads = torch.autograd.grad((got * probe).sum(), leaves)
        want_grads = torch.autograd.grad((want * probe).sum(), leaves)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_layer_weights_gradcheck_on_every_branch():
    for radius in (0.0, 0.45, max_radius(3)):
        leaves = [torch.randn(3, dtype=DOUBLE, requires_grad=True) for _ in range(2)]
        fn = lambda a, b: torch.stack(sparsestmax_weights(a, b, radius))  # noqa: E731
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-7, atol=1e-7)
        assert torch.autograd.gradgradcheck(fn, leaves, eps=1e-7, atol=1e-7)


def test_errors():
    with pytest.raises(ValueError, match=r"radius must be in \[0, sqrt\(1 - 1/K\)\] = \[0, 0\.816497\] for K = 3 entries, got 0\.9"):
        sparsestmax(torch.zeros(3), 0.9)
    with pytest.raises(ValueError, match=r"radius must be in .* got -0\.1"):
        sparsestmax_weights(torch.zeros(3), torch.zeros(3), -0.1)
    with pytest.raises(ValueError, match=r"radius must be a number or a 0-d tensor, got a tensor of shape \(2,\)"):
        sparsestmax(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"radius must be a number or a 0-d tensor, got str"):
        sparsestmax(torch.zeros(3), "0.1")
    with pytest.raises(TypeError, match=r"sparsestmax expects a floating-point tensor, got torch.int64"):
        sparsestmax(torch.zeros(3, dtype=torch.long), 0.1)
    with pytest.raises(TypeError, match=r"sparsemax expects a floating-point tensor, got list"):
        sparsemax([0.0, 1.0])
    with pytest.raises(ValueError, match=r"the number of entries must be a positive int, got 0"):
        max_radius(0)
