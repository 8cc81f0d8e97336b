"""Tests of the DAN losses: AffinityLoss, CenterLoss, PartitionLoss (and their functions).

References used here, all written in this file:

* plain Python loops over samples i, dimensions l and classes / heads k, read off the
  paper's equations (Eq. 2 affinity with the authors' 1/B; Eq. 6 partition) and the
  authors' partition variant (log of the mean variance), computed in Python floats
  (float64);
* a re-implementation of the authors' AffinityLoss (full B x N distance matrix by the
  expansion |x|^2 + |c|^2 - 2 x.c, class mask, division by the centres' summed
  variance, clamp to [1e-12, 1e12], sum / B) and PartitionLoss (x.var(dim=1).mean(),
  log(1 + K / (var + eps)), eps = float64 machine epsilon, Python 0 for one head).
"""

from __future__ import annotations

import io
import math
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import dan_layers.functional as DF
from dan_layers import AffinityLoss, CenterLoss, DANLoss, PartitionLoss

# ----------------------------------------------------------------------------- references


def loop_affinity(features, labels, centers, *, unbiased=True):
    """Paper Eq. 2 divided by the batch size (the authors' convention), with plain loops.

    sigma_c^2 = sum_l Var_k(c_{k,l}); loss = (1/B) sum_i sum_l (x_{i,l} - c_{y_i,l})^2 / sigma_c^2
    """
    x = features.tolist()
    y = labels.tolist()
    c = centers.tolist()
    num_centers, dim = len(c), len(c[0])
    sigma2 = 0.0
    for l in range(dim):  # noqa: E741 (the paper's index)
        mean = sum(c[k][l] for k in range(num_centers)) / num_centers
        ss = sum((c[k][l] - mean) ** 2 for k in range(num_centers))
        sigma2 += ss / (num_centers - 1 if unbiased else num_centers)
    total = 0.0
    for i in range(len(x)):
        for l in range(dim):  # noqa: E741 (the paper's index)
            total += (x[i][l] - c[y[i]][l]) ** 2
    return total / sigma2 / len(x)


def loop_center(features, labels, centers):
    x, y, c = features.tolist(), labels.tolist(), centers.tolist()
    total = 0.0
    for i in range(len(x)):
        for l in range(len(c[0])):  # noqa: E741 (the paper's index)
            total += (x[i][l] - c[y[i]][l]) ** 2
    return total / len(x)


def _loop_head_variances(heads, unbiased):
    """sigma^2_{i,l}: the variance over heads k of v_{i,k,l}, as a nested list [i][l]."""
    h = heads.tolist()
    num_heads = len(h[0])
    out = []
    for i in range(len(h)):
        row = []
        for l in range(len(h[0][0])):  # noqa: E741 (the paper's index)
            mean = sum(h[i][k][l] for k in range(num_heads)) / num_heads
            ss = sum((h[i][k][l] - mean) ** 2 for k in range(num_heads))
            row.append(ss / (num_heads - 1 if unbiased else num_heads))
        out.append(row)
    return out, num_heads


def loop_partition_paper(heads, *, unbiased=True, eps=sys.float_info.epsilon):
    """Paper Eq. 6: (1/(B L)) sum_i sum_l log(1 + K / sigma^2_{i,l}) (eps added as the library)."""
    var, k = _loop_head_variances(heads, unbiased)
    terms = [math.log(1.0 + k / (v + eps)) for row in var for v in row]
    return sum(terms) / len(terms)


def loop_partition_official(heads, *, unbiased=True, eps=sys.float_info.epsilon):
    """The authors' code: log(1 + K / (mean_{i,l} sigma^2_{i,l} + eps))."""
    var, k = _loop_head_variances(heads, unbiased)
    flat = [v for row in var for v in row]
    return math.log(1.0 + k / (sum(flat) / len(flat) + eps))


def authors_affinity(x, labels, centers):
    """Re-implementation of the authors' AffinityLoss.forward (their algorithm, our code)."""
    if x.ndim == 4:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
    b, n = x.shape[0], centers.shape[0]
    distmat = (
        x.pow(2).sum(dim=1, keepdim=True).expand(b, n)
        + centers.pow(2).sum(dim=1, keepdim=True).expand(n, b).t()
    )
    distmat = distmat - 2.0 * (x @ centers.t())
    classes = torch.arange(n, device=x.device)
    mask = labels.unsqueeze(1).expand(b, n).eq(classes.expand(b, n))
    dist = distmat * mask.float()
    dist = dist / centers.var(dim=0).sum()
    return dist.clamp(min=1e-12, max=1e12).sum() / b


def authors_partition(x):
    """Re-implementation of the authors' PartitionLoss.forward."""
    num_head = x.size(1)
    if num_head > 1:
        var = x.var(dim=1).mean()
        return torch.log(1 + num_head / (var + sys.float_info.epsilon))
    return 0


# ----------------------------------------------------------------------------- helpers


def draw(seed, *shape, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def draw_labels(seed, batch, num_classes):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, num_classes, (batch,), generator=g)


def assert_close_rel(actual, expected, rel):
    """|actual - expected| <= rel * max|expected| elementwise (relative to the tensor's scale)."""
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-30))


def roundtrip(module, factory):
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = factory()
    fresh.load_state_dict(state)
    return fresh


seeds = st.integers(0, 2**31 - 1)


# ============================================================================ AffinityLoss


class TestAffinityLoss:
    def test_smoke(self, device, dtype):
        loss = AffinityLoss(7, 16, device=device, dtype=dtype)
        features = torch.randn(5, 16, device=device, dtype=dtype, requires_grad=True)
        labels = torch.tensor([0, 1, 6, 3, 3], device=device)
        out = loss(features, labels)
        assert out.shape == () and out.dtype == dtype and out.device.type == device.type
        assert torch.isfinite(out) and out > 0
        out.backward()
        assert loss.centers.grad is not None and torch.isfinite(loss.centers.grad).all()
        assert loss.centers.grad.abs().sum() > 0
        assert features.grad is not None and torch.isfinite(features.grad).all()

    def test_centers_are_a_parameter_initialised_from_standard_normal(self):
        loss = AffinityLoss(7, 4096)
        assert isinstance(loss.centers, torch.nn.Parameter)
        assert loss.centers.shape == (7, 4096)
        assert [name for name, _ in loss.named_parameters()] == ["centers"]
        assert abs(loss.centers.mean().item()) < 0.02
        assert abs(loss.centers.std().item() - 1.0) < 0.02
        assert AffinityLoss(7, 8, num_centers=8).centers.shape == (8, 8)

    @pytest.mark.parametrize("reduction,shape", [("mean", ()), ("sum", ()), ("none", (6,))])
    def test_cardinality(self, reduction, shape, dtype, tol):
        loss = AffinityLoss(4, 8, reduction=reduction, dtype=dtype)
        features = torch.randn(6, 8, dtype=dtype)
        labels = torch.tensor([0, 1, 2, 3, 0, 1])
        assert loss(features, labels).shape == shape
        # the feature map is average-pooled first
        fmap = torch.randn(6, 8, 3, 5, dtype=dtype)
        torch.testing.assert_close(loss(fmap, labels), loss(fmap.mean(dim=(2, 3)), labels), **tol)

    def test_reductions_agree(self):
        features, labels, centers = draw(1, 6, 5), draw_labels(1, 6, 3), draw(2, 3, 5)
        none = DF.affinity_loss(features, labels, centers, reduction="none")
        mean = DF.affinity_loss(features, labels, centers, reduction="mean")
        total = DF.affinity_loss(features, labels, centers, reduction="sum")
        torch.testing.assert_close(none.mean(), mean)
        torch.testing.assert_close(none.sum(), total)
        torch.testing.assert_close(total, 6 * mean)

    def test_feature_known_value(self):
        centers = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # unbiased variances (2, 0): sigma^2 = 2
        features = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # distances^2: 1 and 9
        labels = torch.tensor([0, 1])
        assert DF.affinity_loss(features, labels, centers).item() == pytest.approx((1 + 9) / 2 / 2)
        assert DF.affinity_loss(features, labels, centers, reduction="sum").item() == pytest.approx(5.0)
        none = DF.affinity_loss(features, labels, centers, reduction="none")
        torch.testing.assert_close(none, torch.tensor([0.5, 4.5]))
        # biased variance: (1, 0) -> sigma^2 = 1
        biased = DF.affinity_loss(features, labels, centers, unbiased=False)
        assert biased.item() == pytest.approx(5.0)

    @pytest.mark.parametrize("unbiased", [True, False])
    @pytest.mark.parametrize("num_centers", [7, 8])
    def test_equals_plain_loop_of_paper_eq2(self, unbiased, num_centers):
        features, labels, centers = draw(3, 9, 6), draw_labels(3, 9, 7), draw(4, num_centers, 6)
        expected = loop_affinity(features, labels, centers, unbiased=unbiased)
        got = DF.affinity_loss(features, labels, centers, unbiased=unbiased, num_classes=7)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(expected, rel=1e-12)

    @pytest.mark.parametrize("num_classes,num_centers", [(7, 7), (7, 8), (3, 3)])
    @pytest.mark.parametrize("as_map", [False, True])
    def test_equals_authors_values_and_gradients_float32(self, num_classes, num_centers, as_map):
        g = torch.Generator().manual_seed(num_centers * 10 + num_classes)
        shape = (16, 64, 3, 3) if as_map else (16, 64)
        features = torch.randn(*shape, generator=g)
        labels = torch.randint(0, num_classes, (16,), generator=g)
        ours = AffinityLoss(num_classes, 64, num_centers=num_centers)
        centers_theirs = ours.centers.detach().clone().requires_grad_(True)
        f_ours = features.clone().requires_grad_(True)
        f_theirs = features.clone().requires_grad_(True)

        value_ours = ours(f_ours, labels)
        value_theirs = authors_affinity(f_theirs, labels, centers_theirs)
        assert value_ours.dtype == value_theirs.dtype == torch.float32
        assert_close_rel(value_ours, value_theirs, 1e-5)

        value_ours.backward()
        value_theirs.backward()
        assert_close_rel(f_ours.grad, f_theirs.grad, 1e-5)
        assert_close_rel(ours.centers.grad, centers_theirs.grad, 1e-5)
        if num_centers > num_classes:  # the unused centre gets a gradient through the variance only
            assert ours.centers.grad[num_classes:].abs().sum() > 0

    def test_module_equals_function(self):
        for reduction in ("mean", "sum", "none"):
            loss = AffinityLoss(5, 6, num_centers=6, reduction=reduction, unbiased=False, eps=1e-9)
            features, labels = torch.randn(4, 6), torch.tensor([0, 4, 2, 2])
            expected = DF.affinity_loss(
                features, labels, loss.centers, reduction=reduction, unbiased=False, eps=1e-9, num_classes=5
            )
            torch.testing.assert_close(loss(features, labels), expected, rtol=0, atol=0)

    def test_state_dict_roundtrip(self):
        loss = AffinityLoss(7, 12, num_centers=8)
        fresh = roundtrip(loss, lambda: AffinityLoss(7, 12, num_centers=8))
        features, labels = torch.randn(3, 12), torch.tensor([0, 6, 3])
        assert not torch.equal(AffinityLoss(7, 12, num_centers=8).centers, loss.centers)
        torch.testing.assert_close(fresh(features, labels), loss(features, labels), rtol=0, atol=0)

    def test_gradcheck(self):
        features = draw(5, 3, 4).requires_grad_(True)
        centers = draw(6, 3, 4).requires_grad_(True)
        labels = torch.tensor([0, 2, 2])
        for reduction in ("mean", "sum", "none"):
            for unbiased in (True, False):
                assert torch.autograd.gradcheck(
                    lambda f, c, r=reduction, u=unbiased: DF.affinity_loss(
                        f, labels, c, reduction=r, unbiased=u
                    ),
                    (features, centers),
                    fast_mode=True,
                )
        fmap = draw(7, 3, 4, 2, 3).requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda f, c: DF.affinity_loss(f, labels, c), (fmap, centers), fast_mode=True
        )

    def test_gradient_formula(self):
        # d/dx_i = 2 (x_i - c_{y_i}) / (B sigma^2); unused centre j: -D/S^2 * 2 (c_j - cbar) / (N - 1)
        features = draw(8, 4, 3).requires_grad_(True)
        centers = draw(9, 3, 3).requires_grad_(True)
        labels = torch.tensor([0, 1, 1, 0])
        loss = DF.affinity_loss(features, labels, centers)
        loss.backward()
        c = centers.detach()
        sigma2 = c.var(dim=0).sum()
        diff = features.detach() - c[labels]
        torch.testing.assert_close(features.grad, 2 * diff / (4 * sigma2))
        numerator = diff.pow(2).sum() / 4
        expected_unused = -numerator / sigma2**2 * 2 * (c[2] - c.mean(dim=0)) / 2
        torch.testing.assert_close(centers.grad[2], expected_unused)

    def test_empty_batch_gives_graph_connected_zero(self):
        centers = torch.randn(3, 4, requires_grad=True)
        out = DF.affinity_loss(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), centers)
        assert out.shape == () and out.item() == 0.0
        out.backward()
        assert centers.grad is not None

    @given(seed=seeds, batch=st.integers(2, 8), num_classes=st.integers(2, 5), dim=st.integers(1, 6))
    def test_property_batch_order_invariance(self, seed, batch, num_classes, dim):
        features, centers = draw(seed, batch, dim), draw(seed + 2, num_classes, dim)
        labels = draw_labels(seed, batch, num_classes)
        perm = torch.randperm(batch, generator=torch.Generator().manual_seed(seed + 3))
        for fn in (DF.affinity_loss, DF.center_loss):
            a = fn(features, labels, centers)
            b = fn(features[perm], labels[perm], centers)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
            per_sample = fn(features, labels, centers, reduction="none")
            torch.testing.assert_close(
                fn(features[perm], labels[perm], centers, reduction="none"), per_sample[perm]
            )

    @given(seed=seeds, batch=st.integers(1, 6), num_classes=st.integers(2, 5), dim=st.integers(1, 6))
    def test_property_equals_plain_loop(self, seed, batch, num_classes, dim):
        features, centers = draw(seed, batch, dim), draw(seed + 2, num_classes, dim)
        labels = draw_labels(seed, batch, num_classes)
        got = DF.affinity_loss(features, labels, centers).item()
        assert got == pytest.approx(loop_affinity(features, labels, centers), rel=1e-10)
        assert DF.center_loss(features, labels, centers).item() == pytest.approx(
            loop_center(features, labels, centers), rel=1e-10
        )

    @given(
        seed=seeds,
        batch=st.integers(1, 6),
        num_classes=st.integers(2, 5),
        dim=st.integers(1, 6),
        case=st.sampled_from(["centers_equal", "features_at_centers", "both"]),
        dtype=st.sampled_from([torch.float32, torch.float64]),
    )
    def test_property_finite_on_collapsed_inputs(self, seed, batch, num_classes, dim, case, dtype):
        centers = draw(seed + 2, num_classes, dim, dtype=dtype)
        labels = draw_labels(seed, batch, num_classes)
        if case in ("centers_equal", "both"):
            centers = centers[:1].expand(num_classes, dim).clone()
        features = centers[labels].clone() if case != "centers_equal" else draw(seed, batch, dim, dtype=dtype)
        features.requires_grad_(True)
        centers.requires_grad_(True)
        for fn in (DF.affinity_loss, DF.center_loss):
            features.grad = centers.grad = None
            out = fn(features, labels, centers)
            assert torch.isfinite(out)
            out.backward()
            assert torch.isfinite(features.grad).all() and torch.isfinite(centers.grad).all()

    @given(seed=seeds, batch=st.integers(1, 6), num_classes=st.integers(2, 5), dim=st.integers(1, 6))
    def test_property_feature_gradient_points_away_from_its_center(self, seed, batch, num_classes, dim):
        """grad_{x_i} L is a positive multiple of (x_i - c_{y_i}).

        Hence <grad, x_i - c_{y_i}> > 0, and a gradient-descent step x_i - lr * grad moves
        x_i straight towards its own centre (its distance to c_{y_i} strictly decreases).
        """
        features = draw(seed, batch, dim).requires_grad_(True)
        centers = draw(seed + 2, num_classes, dim)
        labels = draw_labels(seed, batch, num_classes)
        DF.affinity_loss(features, labels, centers).backward()
        grad = features.grad
        away = features.detach() - centers[labels]
        dots = (grad * away).sum(dim=1)
        assert (dots > 0).all()
        cosine = F.cosine_similarity(grad, away, dim=1)
        torch.testing.assert_close(cosine, torch.ones_like(cosine))
        # a descent step of 10% of the distance, along -grad, lands 10% closer to the centre
        step = 0.1 * away.norm(dim=1, keepdim=True) / grad.norm(dim=1, keepdim=True)
        stepped = features.detach() - step * grad
        torch.testing.assert_close((stepped - centers[labels]).norm(dim=1), 0.9 * away.norm(dim=1))

    @given(seed=seeds, batch=st.integers(1, 6), num_classes=st.integers(2, 5), dim=st.integers(1, 6))
    def test_property_center_gradient_pushes_centers_apart(self, seed, batch, num_classes, dim):
        """The denominator's share of grad_c L is -(D / S^2) grad_c S.

        L = D / S with D the (mean) squared distance and S = sum_l Var_k(c_{k,l}). By the product rule
        grad_c L = (grad_c D) / S - (D / S^2) grad_c S, and grad_c D / S is the centre-loss gradient
        divided by S. So the remainder must be anti-parallel to grad_c S: a descent step along it
        increases the centres' total variance S. A centre no label uses gets only that remainder.
        """
        features = draw(seed, batch, dim)
        centers = draw(seed + 2, num_classes, dim).requires_grad_(True)
        labels = draw_labels(seed, batch, num_classes)
        (grad_total,) = torch.autograd.grad(DF.affinity_loss(features, labels, centers), centers)
        (grad_pull,) = torch.autograd.grad(DF.center_loss(features, labels, centers), centers)
        spread = centers.var(dim=0).sum()
        (grad_spread,) = torch.autograd.grad(spread, centers)
        grad_push = grad_total - grad_pull / spread.detach()
        numerator = DF.center_loss(features, labels, centers).detach()
        expected_push = -numerator / spread.detach() ** 2 * grad_spread
        torch.testing.assert_close(grad_push, expected_push, rtol=1e-9, atol=1e-12)
        # a descent step along the push term strictly increases the total variance of the centres
        if numerator > 1e-9 and grad_spread.abs().sum() > 1e-9:
            stepped = centers.detach() - 1e-2 * grad_push
            assert stepped.var(dim=0).sum() > spread.detach()
        # unused centres move directly away from the centres' mean under gradient descent
        unused = [k for k in range(num_classes) if k not in labels.tolist()]
        for k in unused:
            outward = centers.detach()[k] - centers.detach().mean(dim=0)
            assert (grad_total[k] * outward).sum() <= 0
            torch.testing.assert_close(grad_total[k], expected_push[k], rtol=1e-9, atol=1e-12)


class TestAffinityLossExceptions:
    def test_wrong_feature_ndim(self):
        loss = AffinityLoss(3, 4)
        with pytest.raises(ValueError, match="expected.*got"):
            loss(torch.randn(2, 4, 3), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="expected.*got"):
            loss(torch.randn(4), torch.tensor([0]))

    def test_batch_mismatch(self):
        with pytest.raises(ValueError, match="expected.*got 3"):
            AffinityLoss(3, 4)(torch.randn(2, 4), torch.tensor([0, 1, 2]))

    def test_labels_ndim(self):
        with pytest.raises(ValueError, match="expected.*got"):
            AffinityLoss(3, 4)(torch.randn(2, 4), torch.tensor([[0], [1]]))

    def test_feature_width_vs_feat_dim(self):
        with pytest.raises(ValueError, match="expected.*4.*got 5"):
            AffinityLoss(3, 4)(torch.randn(2, 5), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="expected.*got"):  # a map with the wrong channel count
            AffinityLoss(3, 4)(torch.randn(2, 5, 3, 3), torch.tensor([0, 1]))

    @pytest.mark.parametrize("bad", [3, 9, -1])
    def test_label_out_of_range_names_the_label(self, bad):
        with pytest.raises(ValueError, match=rf"expected.*\[0, 3\).*got label {bad}\b"):
            AffinityLoss(3, 4)(torch.randn(3, 4), torch.tensor([0, bad, 1]))

    def test_label_of_the_extra_center_is_out_of_range(self):
        # 8 centres for 7 classes: label 7 indexes a centre but is not a class
        loss = AffinityLoss(7, 4, num_centers=8)
        with pytest.raises(ValueError, match="expected.*got label 7"):
            loss(torch.randn(2, 4), torch.tensor([7, 0]))
        with pytest.raises(ValueError, match="expected.*got label 7"):
            DF.affinity_loss(torch.randn(2, 4), torch.tensor([7, 0]), loss.centers, num_classes=7)

    @pytest.mark.parametrize("label_dtype", [torch.float32, torch.bool])
    def test_non_integer_labels(self, label_dtype):
        with pytest.raises(ValueError, match="expected an integer tensor, got"):
            AffinityLoss(3, 4)(torch.randn(2, 4), torch.tensor([0, 1]).to(label_dtype))

    def test_integer_features(self):
        with pytest.raises(ValueError, match="expected a floating-point tensor, got"):
            AffinityLoss(3, 4)(torch.ones(2, 4, dtype=torch.long), torch.tensor([0, 1]))

    def test_unknown_reduction(self):
        with pytest.raises(ValueError, match=r"expected one of \('mean', 'sum', 'none'\), got 'avg'"):
            AffinityLoss(3, 4, reduction="avg")
        with pytest.raises(ValueError, match="expected.*got 'avg'"):
            DF.affinity_loss(torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(3, 4), reduction="avg")

    def test_bad_centers(self):
        with pytest.raises(ValueError, match="expected at least 2.*got 1"):
            DF.affinity_loss(torch.randn(2, 4), torch.tensor([0, 0]), torch.randn(1, 4))
        with pytest.raises(ValueError, match="expected.*got"):
            DF.affinity_loss(torch.randn(2, 4), torch.tensor([0, 0]), torch.randn(3, 4, 1))
        with pytest.raises(ValueError, match="expected at most.*got 5"):
            DF.affinity_loss(torch.randn(2, 4), torch.tensor([0, 0]), torch.randn(3, 4), num_classes=5)

    @pytest.mark.parametrize(
        "args,kwargs,match",
        [
            ((1, 4), {}, "expected at least 2.*got 1"),
            ((7, 4), {"num_centers": 1}, "expected.*got 1"),
            ((7, 4), {"num_centers": 5}, "expected at least num_classes.*got 5"),
            ((0, 4), {}, "expected a positive int, got 0"),
            ((3, 0), {}, "expected a positive int, got 0"),
            ((3, 2.5), {}, "expected a positive int, got 2.5"),
        ],
    )
    def test_bad_constructor_args(self, args, kwargs, match):
        with pytest.raises(ValueError, match=match):
            AffinityLoss(*args, **kwargs)

    def test_mismatched_devices(self):
        loss = AffinityLoss(3, 4)
        with pytest.raises(ValueError, match="expected all tensors on one device, got.*meta"):
            loss(torch.randn(2, 4, device="meta"), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="expected.*one device, got.*meta"):
            loss(torch.randn(2, 4), torch.tensor([0, 1], device="meta"))

    def test_validate_false_skips_the_checks(self):
        centers = torch.randn(8, 4)
        features = torch.randn(3, 4)
        int_labels = torch.tensor([0, 7, 2])
        float_labels = int_labels.float()
        with pytest.raises(ValueError):
            DF.affinity_loss(features, float_labels, centers)
        with pytest.raises(ValueError, match="got label 7"):
            DF.affinity_loss(features, int_labels, centers, num_classes=7)
        # the float-label check and the class-range check (label 7 < 8 centres, a valid index) are skipped
        expected = DF.affinity_loss(features, int_labels, centers, num_classes=8)
        got = DF.affinity_loss(features, float_labels, centers, num_classes=7, validate=False)
        torch.testing.assert_close(got, expected)
        loss = AffinityLoss(7, 4, num_centers=8, validate=False)
        assert torch.isfinite(loss(features, int_labels))


# ============================================================================ CenterLoss


class TestCenterLoss:
    def test_smoke(self, device, dtype):
        loss = CenterLoss(3, 16, device=device, dtype=dtype)
        features = torch.randn(4, 16, device=device, dtype=dtype, requires_grad=True)
        out = loss(features, torch.tensor([0, 1, 2, 1], device=device))
        assert out.shape == () and out.dtype == dtype
        out.backward()
        assert loss.centers.grad is not None and loss.centers.grad.abs().sum() > 0

    @pytest.mark.parametrize("reduction,shape", [("mean", ()), ("sum", ()), ("none", (4,))])
    def test_cardinality(self, reduction, shape):
        loss = CenterLoss(3, 5, reduction=reduction)
        assert loss(torch.randn(4, 5), torch.tensor([0, 1, 2, 1])).shape == shape
        assert loss(torch.randn(4, 5, 2, 2), torch.tensor([0, 1, 2, 1])).shape == shape

    def test_feature_known_value(self):
        centers = torch.zeros(3, 2)
        assert DF.center_loss(torch.tensor([[3.0, 4.0]]), torch.tensor([1]), centers).item() == 25.0
        two = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
        assert DF.center_loss(two, torch.tensor([1, 2]), centers).item() == 13.0
        assert DF.center_loss(two, torch.tensor([1, 2]), centers, reduction="sum").item() == 26.0

    def test_is_affinity_times_spread(self):
        features, labels, centers = draw(1, 5, 3), draw_labels(1, 5, 4), draw(2, 4, 3)
        spread = centers.var(dim=0).sum()
        torch.testing.assert_close(
            DF.center_loss(features, labels, centers), DF.affinity_loss(features, labels, centers) * spread
        )

    def test_module_equals_function(self):
        for reduction in ("mean", "sum", "none"):
            loss = CenterLoss(4, 6, reduction=reduction)
            features, labels = torch.randn(5, 6), torch.tensor([0, 3, 2, 2, 1])
            expected = DF.center_loss(features, labels, loss.centers, reduction=reduction)
            torch.testing.assert_close(loss(features, labels), expected, rtol=0, atol=0)

    def test_state_dict_roundtrip(self):
        loss = CenterLoss(4, 6)
        fresh = roundtrip(loss, lambda: CenterLoss(4, 6))
        features, labels = torch.randn(3, 6), torch.tensor([0, 3, 1])
        torch.testing.assert_close(fresh(features, labels), loss(features, labels), rtol=0, atol=0)

    def test_gradcheck(self):
        features = draw(3, 3, 4).requires_grad_(True)
        centers = draw(4, 2, 4).requires_grad_(True)
        labels = torch.tensor([1, 0, 1])
        for reduction in ("mean", "sum", "none"):
            assert torch.autograd.gradcheck(
                lambda f, c, r=reduction: DF.center_loss(f, labels, c, reduction=r),
                (features, centers),
                fast_mode=True,
            )

    def test_exceptions(self):
        loss = CenterLoss(3, 4)
        with pytest.raises(ValueError, match="expected.*got"):
            loss(torch.randn(2, 4, 1), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="expected.*got 1"):
            loss(torch.randn(2, 4), torch.tensor([0]))
        with pytest.raises(ValueError, match="expected.*got 5"):
            loss(torch.randn(2, 5), torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="expected.*got label 3"):
            loss(torch.randn(2, 4), torch.tensor([0, 3]))
        with pytest.raises(ValueError, match="expected an integer tensor, got"):
            loss(torch.randn(2, 4), torch.tensor([0.0, 1.0]))
        with pytest.raises(ValueError, match="expected one of.*got 'max'"):
            CenterLoss(3, 4, reduction="max")
        with pytest.raises(ValueError, match="expected a positive int, got 0"):
            CenterLoss(0, 4)
        with pytest.raises(ValueError, match="expected.*one device, got.*meta"):
            loss(torch.randn(2, 4, device="meta"), torch.tensor([0, 1]))
        # validate=False: the float-label check is skipped
        got = CenterLoss(3, 4, validate=False)
        got.load_state_dict(loss.state_dict())
        labels = torch.tensor([0, 2])
        features = torch.randn(2, 4)
        torch.testing.assert_close(got(features, labels.float()), loss(features, labels))


# ============================================================================ PartitionLoss


class TestPartitionLoss:
    def test_smoke(self, device, dtype):
        heads = torch.randn(4, 3, 16, device=device, dtype=dtype, requires_grad=True)
        for variant in ("paper", "official"):
            out = PartitionLoss(variant)(heads)
            assert out.shape == () and out.dtype == dtype and out.device.type == device.type
            assert torch.isfinite(out) and out > 0
            (grad,) = torch.autograd.grad(out, heads)
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0

    @pytest.mark.parametrize("variant", ["paper", "official"])
    @pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 2, 2), (3, 4, 1)])
    def test_cardinality(self, variant, shape):
        assert PartitionLoss(variant)(torch.randn(*shape)).shape == ()

    def test_feature_known_values(self):
        heads = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]])  # unbiased variance 2 everywhere
        for variant in ("paper", "official"):
            assert DF.partition_loss(heads, variant=variant).item() == pytest.approx(math.log(2.0))
            # biased variance 1 everywhere
            assert DF.partition_loss(heads, variant=variant, unbiased=False).item() == pytest.approx(
                math.log(3.0)
            )
        # per-feature variances 2 and 8: the paper form is a mean of logs, the official a log of the mean
        heads = torch.tensor([[[0.0, 0.0], [2.0, 4.0]]], dtype=torch.float64)
        paper = DF.partition_loss(heads, variant="paper").item()
        official = DF.partition_loss(heads, variant="official").item()
        assert paper == pytest.approx((math.log(2.0) + math.log(1.25)) / 2, rel=1e-12)
        assert official == pytest.approx(math.log(1.4), rel=1e-12)
        assert paper > official

    @pytest.mark.parametrize("unbiased", [True, False])
    @pytest.mark.parametrize("shape", [(3, 4, 5), (2, 2, 7), (4, 3, 1)])
    def test_equals_plain_loop_of_paper_eq6_and_official(self, unbiased, shape):
        heads = draw(11, *shape)
        paper = DF.partition_loss(heads, variant="paper", unbiased=unbiased)
        official = DF.partition_loss(heads, variant="official", unbiased=unbiased)
        assert paper.dtype == official.dtype == torch.float64
        assert paper.item() == pytest.approx(loop_partition_paper(heads, unbiased=unbiased), rel=1e-12)
        assert official.item() == pytest.approx(loop_partition_official(heads, unbiased=unbiased), rel=1e-12)

    @pytest.mark.parametrize("num_heads", [2, 4])
    def test_official_equals_authors_values_and_gradients_float32(self, num_heads):
        heads = torch.randn(16, num_heads, 64, generator=torch.Generator().manual_seed(num_heads))
        ours_in = heads.clone().requires_grad_(True)
        theirs_in = heads.clone().requires_grad_(True)
        ours = PartitionLoss("official")(ours_in)
        theirs = authors_partition(theirs_in)
        assert ours.dtype == theirs.dtype == torch.float32
        assert_close_rel(ours, theirs, 1e-5)
        ours.backward()
        theirs.backward()
        assert_close_rel(ours_in.grad, theirs_in.grad, 1e-5)

    def test_default_eps_is_float64_machine_epsilon(self):
        assert PartitionLoss().eps == sys.float_info.epsilon
        assert DF.PARTITION_EPS == sys.float_info.epsilon
        # collapsed heads: the loss is log(1 + K / eps), visible in float64
        heads = torch.ones(2, 3, 4, dtype=torch.float64)
        for variant in ("paper", "official"):
            expected = math.log1p(3 / sys.float_info.epsilon)
            assert DF.partition_loss(heads, variant=variant).item() == pytest.approx(expected, rel=1e-12)

    @pytest.mark.parametrize("variant", ["paper", "official"])
    @pytest.mark.parametrize("float_dtype", [torch.float32, torch.float64])
    def test_single_head_is_a_graph_connected_zero_tensor(self, variant, float_dtype):
        dtype = float_dtype
        heads = (-torch.rand(3, 1, 5, dtype=dtype) - 0.5).requires_grad_(True)  # negative sum
        out = PartitionLoss(variant)(heads)
        assert isinstance(out, torch.Tensor) and out.shape == ()
        assert out.dtype == dtype and out.device == heads.device
        assert out.item() == 0.0 and not torch.signbit(out)  # not -0.0
        assert out.grad_fn is not None and out.requires_grad
        out.backward()
        torch.testing.assert_close(heads.grad, torch.zeros_like(heads))
        assert f"{out.item():.1f}" == "0.0"
        # the authors' reference returns a Python int, which is why the library differs
        assert authors_partition(heads) == 0 and not isinstance(authors_partition(heads), torch.Tensor)

    @pytest.mark.parametrize("variant", ["paper", "official"])
    def test_vit_style_input_equals_flattened(self, variant):
        heads = torch.randn(2, 3, 4, 5)
        torch.testing.assert_close(
            DF.partition_loss(heads, variant=variant),
            DF.partition_loss(heads.reshape(2, 3, 20), variant=variant),
        )
        assert DF.partition_loss(heads.transpose(2, 3), variant=variant).shape == ()  # non-contiguous

    def test_module_equals_function(self):
        heads = torch.randn(3, 4, 6)
        for variant in ("paper", "official"):
            for unbiased in (True, False):
                loss = PartitionLoss(variant, unbiased=unbiased, eps=1e-6)
                expected = DF.partition_loss(heads, variant=variant, unbiased=unbiased, eps=1e-6)
                torch.testing.assert_close(loss(heads), expected, rtol=0, atol=0)

    def test_state_dict_roundtrip(self):
        loss = PartitionLoss("official")
        assert loss.state_dict() == {}
        fresh = roundtrip(loss, lambda: PartitionLoss("official"))
        heads = torch.randn(2, 3, 4)
        torch.testing.assert_close(fresh(heads), loss(heads))

    @pytest.mark.parametrize("variant", ["paper", "official"])
    @pytest.mark.parametrize("unbiased", [True, False])
    def test_gradcheck(self, variant, unbiased):
        for shape in ((2, 3, 4), (2, 2, 2, 3), (2, 1, 3)):
            heads = draw(12, *shape).requires_grad_(True)
            assert torch.autograd.gradcheck(
                lambda h: DF.partition_loss(h, variant=variant, unbiased=unbiased), (heads,), fast_mode=True
            )

    @given(
        seed=seeds,
        batch=st.integers(1, 5),
        num_heads=st.integers(2, 5),
        width=st.integers(1, 6),
        variant=st.sampled_from(["paper", "official"]),
    )
    def test_property_batch_and_head_order_invariance(self, seed, batch, num_heads, width, variant):
        heads = draw(seed, batch, num_heads, width)
        g = torch.Generator().manual_seed(seed + 1)
        base = DF.partition_loss(heads, variant=variant)
        by_batch = DF.partition_loss(heads[torch.randperm(batch, generator=g)], variant=variant)
        by_head = DF.partition_loss(heads[:, torch.randperm(num_heads, generator=g)], variant=variant)
        by_feature = DF.partition_loss(heads[:, :, torch.randperm(width, generator=g)], variant=variant)
        for other in (by_batch, by_head, by_feature):
            torch.testing.assert_close(other, base, rtol=1e-12, atol=0)

    @given(
        seed=seeds,
        batch=st.integers(1, 5),
        num_heads=st.integers(2, 5),
        width=st.integers(1, 6),
        factor=st.floats(1.05, 20.0),
        variant=st.sampled_from(["paper", "official"]),
    )
    def test_property_more_spread_heads_give_smaller_loss(self, seed, batch, num_heads, width, factor, variant):
        heads = draw(seed, batch, num_heads, width)
        mean = heads.mean(dim=1, keepdim=True)
        spread = mean + factor * (heads - mean)  # every deviation from the head mean scaled by factor > 1
        assert DF.partition_loss(spread, variant=variant) < DF.partition_loss(heads, variant=variant)

    @given(seed=seeds, batch=st.integers(1, 5), num_heads=st.integers(2, 5), width=st.integers(1, 6))
    def test_property_paper_at_least_official_jensen(self, seed, batch, num_heads, width):
        # x -> log(1 + K / (x + eps)) is convex, so the mean of logs >= the log of the mean
        heads = draw(seed, batch, num_heads, width)
        g = torch.Generator().manual_seed(seed)
        heads = heads * torch.rand(batch, 1, width, generator=g, dtype=torch.float64) * 3  # uneven variances
        paper = DF.partition_loss(heads, variant="paper")
        official = DF.partition_loss(heads, variant="official")
        assert paper >= official * (1 - 1e-12)

    @given(
        seed=seeds,
        batch=st.integers(1, 5),
        num_heads=st.integers(1, 5),
        width=st.integers(1, 6),
        variant=st.sampled_from(["paper", "official"]),
        dtype=st.sampled_from([torch.float32, torch.float64]),
        partial=st.booleans(),
    )
    def test_property_finite_on_collapsed_heads(self, seed, batch, num_heads, width, variant, dtype, partial):
        heads = draw(seed, batch, 1, width, dtype=dtype).expand(batch, num_heads, width).clone()
        if partial and num_heads > 1:  # only some features collapsed
            heads[:, 0, : (width + 1) // 2] += 1.0
        heads.requires_grad_(True)
        out = DF.partition_loss(heads, variant=variant)
        assert torch.isfinite(out)
        (grad,) = torch.autograd.grad(out, heads)
        assert torch.isfinite(grad).all()


class TestPartitionLossExceptions:
    def test_one_dim_tensor(self):
        with pytest.raises(ValueError, match=r"expected.*\(B, K\) or \(B, K, \.\.\.\).*got shape \(4,\)"):
            PartitionLoss()(torch.randn(4))

    def test_unknown_variant(self):
        with pytest.raises(ValueError, match=r"expected one of \('paper', 'official'\), got 'authors'"):
            PartitionLoss("authors")
        with pytest.raises(ValueError, match="expected.*got 'authors'"):
            DF.partition_loss(torch.randn(2, 3, 4), variant="authors")

    def test_integer_and_empty_heads(self):
        with pytest.raises(ValueError, match="expected a floating-point tensor, got"):
            PartitionLoss()(torch.ones(2, 3, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="expected a non-empty tensor, got"):
            PartitionLoss()(torch.ones(0, 3, 4))

    def test_validate_false_skips_the_shape_check(self):
        heads = torch.randn(4)
        with pytest.raises(ValueError):
            PartitionLoss()(heads)
        with pytest.raises(Exception) as info:  # torch's own error, not ours
            PartitionLoss(validate=False)(heads)
        assert "(B, K)" not in str(info.value)


class TestPartitionLossScalarHeads:
    """(B, K): K scalar heads per sample, the same loss as (B, K, 1), for the module and the function."""

    @pytest.mark.parametrize("variant", ["paper", "official"])
    @pytest.mark.parametrize("normalize", [False, True])
    @pytest.mark.parametrize("unbiased", [True, False])
    def test_equals_one_feature_per_head(self, variant, normalize, unbiased):
        heads = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
        kwargs = {"variant": variant, "normalize": normalize, "unbiased": unbiased}
        got = PartitionLoss(**kwargs)(heads)
        want = PartitionLoss(**kwargs)(heads.unsqueeze(-1))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(DF.partition_loss(heads, **kwargs), want, rtol=0, atol=0)
        (g_got,) = torch.autograd.grad(got, heads)
        (g_want,) = torch.autograd.grad(want, heads)
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)

    def test_equals_the_plain_loop(self):
        heads = torch.randn(5, 3, dtype=torch.float64)
        # Eq. 6 written out for one feature per head: the variance across the 3 heads of each sample
        expected = sum(math.log1p(3 / (statistics.variance(row) + sys.float_info.epsilon))
                       for row in heads.tolist()) / 5
        torch.testing.assert_close(PartitionLoss()(heads), torch.tensor(expected, dtype=torch.float64))

    def test_one_head_and_in_dan_loss(self):
        assert PartitionLoss()(torch.randn(4, 1, requires_grad=True)).item() == 0.0
        criterion = DANLoss(num_classes=3, feat_dim=8)
        args = (torch.randn(4, 3), torch.randn(4, 8), torch.randn(4, 5), torch.tensor([0, 1, 2, 0]))
        out = criterion(*args)
        torch.testing.assert_close(out.partition, PartitionLoss()(args[2]))

    def test_gradcheck_float64(self):
        heads = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda h: PartitionLoss()(h), (heads,), fast_mode=True)


def loop_partition_normalized(heads, *, variant, unbiased=True, eps=sys.float_info.epsilon):
    """Our normalize=True, with loops: every head of every sample scaled to unit RMS over its
    features, then Eq. 6 (paper) or the authors' log of the mean variance (official)."""
    x = heads.tolist()
    scaled = []
    for sample in x:
        rows = []
        for head in sample:
            rms = math.sqrt(sum(v * v for v in head) / len(head))
            rows.append([v / rms for v in head])
        scaled.append(rows)
    flat = torch.tensor(scaled, dtype=torch.float64)
    if variant == "paper":
        return loop_partition_paper(flat, unbiased=unbiased, eps=eps)
    return loop_partition_official(flat, unbiased=unbiased, eps=eps)


class TestPartitionLossNormalized:
    """normalize=True: Eq. 6 on unit-RMS heads, unchanged by any positive scaling of its input."""

    @pytest.mark.parametrize("variant", ["paper", "official"])
    @pytest.mark.parametrize("shape", [(3, 4, 5), (2, 2, 7), (2, 3, 2, 3)])
    def test_equals_plain_loop(self, variant, shape):
        heads = draw(21, *shape)
        got = DF.partition_loss(heads, variant=variant, normalize=True)
        flat = heads.reshape(shape[0], shape[1], -1)
        assert got.item() == pytest.approx(loop_partition_normalized(flat, variant=variant), rel=1e-12)

    def test_known_values(self):
        opposite = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]], dtype=torch.float64)  # unit RMS, variance 2
        assert DF.partition_loss(opposite, normalize=True).item() == pytest.approx(math.log(2.0), rel=1e-12)
        scaled_copy = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]], dtype=torch.float64)  # same profile
        expected = math.log1p(2 / sys.float_info.epsilon)
        assert DF.partition_loss(scaled_copy, normalize=True).item() == pytest.approx(expected, rel=1e-12)
        assert DF.partition_loss(scaled_copy).item() < 2.0  # while Eq. 6 calls them different

    def test_the_scaling_weakness_it_fixes(self):
        # the numbers quoted in the docs: random heads x 100 take Eq. 6 from ~1.96 to ~0.0012
        heads = torch.randn(64, 4, 512, generator=torch.Generator().manual_seed(0))
        paper, paper_x100 = DF.partition_loss(heads), DF.partition_loss(100 * heads)
        assert 1.9 < paper.item() < 2.0 and paper_x100.item() < 0.002
        torch.testing.assert_close(
            DF.partition_loss(100 * heads, normalize=True), DF.partition_loss(heads, normalize=True)
        )

    @given(
        seed=seeds,
        batch=st.integers(1, 4),
        num_heads=st.integers(2, 5),
        width=st.integers(1, 6),
        exponent=st.floats(-30, 30),
        per_head=st.booleans(),
        variant=st.sampled_from(["paper", "official"]),
    )
    def test_property_invariant_to_positive_scaling(
        self, seed, batch, num_heads, width, exponent, per_head, variant
    ):
        heads = draw(seed, batch, num_heads, width)
        if per_head:  # any positive scale per sample and head, spanning up to 10 orders of magnitude
            g = torch.Generator().manual_seed(seed + 1)
            scale = 10.0 ** (exponent + 10 * torch.rand(batch, num_heads, 1, generator=g, dtype=torch.float64))
        else:
            scale = 10.0**exponent
        base = DF.partition_loss(heads, variant=variant, normalize=True)
        scaled = DF.partition_loss(heads * scale, variant=variant, normalize=True)
        torch.testing.assert_close(scaled, base, rtol=1e-10, atol=0)

    @given(seed=seeds, exponent=st.floats(-15, 15), variant=st.sampled_from(["paper", "official"]))
    def test_property_invariant_in_float32(self, seed, exponent, variant):
        heads = draw(seed, 8, 4, 64, dtype=torch.float32)
        base = DF.partition_loss(heads, variant=variant, normalize=True)
        scaled = DF.partition_loss(heads * 10.0**exponent, variant=variant, normalize=True)
        torch.testing.assert_close(scaled, base, rtol=1e-5, atol=0)

    @given(seed=seeds, batch=st.integers(1, 4), num_heads=st.integers(2, 5), width=st.integers(2, 6))
    def test_property_gradient_has_no_component_along_each_head(self, seed, batch, num_heads, width):
        # scale invariance per head means <dL/dh_ik, h_ik> = 0 for every sample i and head k
        heads = draw(seed, batch, num_heads, width).requires_grad_(True)
        (grad,) = torch.autograd.grad(DF.partition_loss(heads, normalize=True), heads)
        radial = (grad * heads).sum(dim=-1)
        assert radial.abs().max() <= 1e-10 * grad.abs().max().clamp_min(1e-300) * heads.abs().max()

    @given(
        seed=seeds,
        batch=st.integers(1, 4),
        num_heads=st.integers(1, 5),
        width=st.integers(1, 6),
        zeros=st.booleans(),
        dtype=st.sampled_from([torch.float32, torch.float64]),
        variant=st.sampled_from(["paper", "official"]),
    )
    def test_property_finite_on_collapsed_heads(self, seed, batch, num_heads, width, zeros, dtype, variant):
        one = torch.zeros(batch, 1, width, dtype=dtype) if zeros else draw(seed, batch, 1, width, dtype=dtype)
        heads = (one * torch.linspace(1, 3, num_heads, dtype=dtype).reshape(1, -1, 1)).requires_grad_(True)
        out = DF.partition_loss(heads, variant=variant, normalize=True)  # heads differ only in scale
        assert torch.isfinite(out)
        (grad,) = torch.autograd.grad(out, heads)
        assert torch.isfinite(grad).all()

    @pytest.mark.parametrize("variant", ["paper", "official"])
    def test_gradcheck(self, variant):
        for shape in ((2, 3, 4), (2, 2, 2, 3), (2, 1, 3)):
            heads = draw(13, *shape).requires_grad_(True)
            assert torch.autograd.gradcheck(
                lambda h: DF.partition_loss(h, variant=variant, normalize=True), (heads,), fast_mode=True
            )

    def test_module_equals_function_and_default_is_eq6(self):
        heads = torch.randn(3, 4, 6)
        for variant in ("paper", "official"):
            loss = PartitionLoss(variant, normalize=True)
            assert "normalize=True" in repr(loss)
            torch.testing.assert_close(
                loss(heads), DF.partition_loss(heads, variant=variant, normalize=True), rtol=0, atol=0
            )
        assert PartitionLoss().normalize is False
        assert torch.equal(PartitionLoss()(heads), DF.partition_loss(heads, variant="paper", normalize=False))


class TestErrorsThatNameTheProblem:
    @pytest.mark.parametrize("value", [float("inf"), float("nan"), -float("inf")])
    @pytest.mark.parametrize("normalize", [False, True])
    def test_single_head_is_exactly_zero_for_non_finite_input(self, value, normalize):
        heads = torch.full((2, 1, 3), value, requires_grad=True)
        out = DF.partition_loss(heads, normalize=normalize)
        assert out.item() == 0.0 and out.grad_fn is not None
        out.backward()
        assert torch.equal(heads.grad, torch.zeros_like(heads))

    def test_string_options_checked_without_validation(self):
        with pytest.raises(ValueError, match="variant: expected one of.*got 'paperr'"):
            DF.partition_loss(torch.randn(2, 3, 4), variant="paperr", validate=False)
        centers = torch.randn(3, 4)
        for fn in (DF.affinity_loss, DF.center_loss):
            with pytest.raises(ValueError, match="reduction: expected one of.*got 'avg'"):
                fn(torch.randn(2, 4), torch.tensor([0, 1]), centers, reduction="avg", validate=False)

    @pytest.mark.parametrize("cls", [AffinityLoss, CenterLoss])
    def test_labels_that_are_not_a_tensor(self, cls):
        import numpy as np

        loss = cls(3, 4)
        features = torch.randn(2, 4)
        with pytest.raises(ValueError, match="labels: expected a torch.Tensor of shape \\(B,\\), got list"):
            loss(features, [0, 1])
        with pytest.raises(ValueError, match="labels: expected a torch.Tensor of shape \\(B,\\), got ndarray"):
            loss(features, np.array([0, 1]))
        with pytest.raises(ValueError, match="features: expected a torch.Tensor.*got list"):
            loss([[0.0] * 4] * 2, torch.tensor([0, 1]))


# ============================================================================ DDP


_DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    from dan_layers import AffinityLoss

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(6, 8)
            self.affinity = AffinityLoss(num_classes=3, feat_dim=8)

        def forward(self, x, y):
            return self.affinity(self.backbone(x), y)

    def worker(rank, world, store, out):
        dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
        torch.manual_seed(100 + rank)  # different initial centres on every rank before DDP syncs them
        model = Model()
        before = model.affinity.centers.detach().clone()
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        initial = model.affinity.centers.detach().clone()
        for step in range(4):
            x = torch.randn(8, 6)
            y = torch.randint(0, 3, (8,))
            opt.zero_grad()
            ddp(x, y).backward()
            opt.step()
        centers = model.affinity.centers.detach()
        gathered = [torch.empty_like(centers) for _ in range(world)]
        dist.all_gather(gathered, centers)
        inits = [torch.empty_like(before) for _ in range(world)]
        dist.all_gather(inits, before)
        if rank == 0:
            torch.save({"centers": gathered, "before": inits, "initial": initial}, out)
        # tear down in order, and together: the DDP reducer (which holds gloo work) before its
        # process group, and neither rank before the other is done. Then leave without the
        # interpreter's finalisation: a rank exiting normally aborted once in CI inside
        # torch's C++ teardown ("terminate called without an active exception"), after all
        # the work this test checks was done and saved.
        del opt, ddp
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)

    if __name__ == "__main__":
        torch.set_num_threads(1)
        mp.spawn(worker, args=(2, sys.argv[1], sys.argv[2]), nprocs=2, join=True)
    """
)


class TestDistributed:
    @pytest.mark.slow
    def test_ddp_keeps_affinity_centers_identical_across_ranks(self, tmp_path: Path):
        if not torch.distributed.is_available():
            pytest.skip("torch.distributed is not available")
        script = tmp_path / "ddp_affinity.py"
        script.write_text(_DDP_SCRIPT)
        out = tmp_path / "result.pt"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path / "store"), str(out)],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = torch.load(out, weights_only=True)
        rank0, rank1 = result["centers"]
        assert not torch.equal(result["before"][0], result["before"][1])  # ranks started apart
        torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)
        assert not torch.equal(rank0, result["initial"])  # and they did train
        assert time.perf_counter() - start < 240
