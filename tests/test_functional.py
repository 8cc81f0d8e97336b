"""Tests of the parameter-free helpers in dan_layers.functional (the losses: test_losses.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import dan_layers.functional as DF

seeds = st.integers(0, 2**31 - 1)


class TestPoolFeatures:
    def test_feature(self, dtype):
        x = torch.arange(2 * 3 * 2 * 2, dtype=dtype).reshape(2, 3, 2, 2)
        torch.testing.assert_close(DF.pool_features(x), F.adaptive_avg_pool2d(x, 1).flatten(1))
        vectors = torch.randn(4, 5, dtype=dtype)
        assert DF.pool_features(vectors) is vectors

    def test_exceptions(self):
        with pytest.raises(ValueError, match=r"expected.*\(B, C\) or \(B, C, H, W\), got shape \(2, 3, 4\)"):
            DF.pool_features(torch.randn(2, 3, 4))
        with pytest.raises(ValueError, match="expected a torch.Tensor.*got list"):
            DF.pool_features([1.0, 2.0])


class TestScaleHeads:
    def test_feature(self):
        heads = torch.randn(3, 4, 5)
        scaled = DF.scale_heads(heads)
        torch.testing.assert_close(scaled, heads - heads.logsumexp(dim=1, keepdim=True))
        torch.testing.assert_close(scaled.exp().sum(dim=1), torch.ones(3, 5))
        one = torch.randn(3, 1, 5)
        assert DF.scale_heads(one) is one

    def test_gradcheck(self):
        heads = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(DF.scale_heads, (heads,), fast_mode=True)


class TestAttentionPool:
    def test_equals_loop_over_heads(self, dtype, tol):
        x = torch.randn(2, 3, 4, 5, dtype=dtype)
        maps = torch.randn(2, 6, 4, 5, dtype=dtype)
        expected = torch.stack([(x * maps[:, k : k + 1]).mean(dim=(2, 3)) for k in range(6)], dim=1)
        torch.testing.assert_close(DF.attention_pool(x, maps), expected, **tol)

    def test_known_value(self):
        x = torch.ones(1, 2, 2, 2)
        maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        torch.testing.assert_close(DF.attention_pool(x, maps), torch.full((1, 1, 2), 2.5))

    def test_gradcheck(self):
        x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
        maps = torch.randn(2, 2, 2, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(DF.attention_pool, (x, maps), fast_mode=True)


class TestFuseConvBn:
    @pytest.mark.parametrize("bias", [True, False])
    @pytest.mark.parametrize("affine", [True, False])
    def test_conv_equals_conv_then_bn(self, bias, affine):
        conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias).double()
        bn = nn.BatchNorm2d(6, affine=affine, eps=1e-3).double()
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            if affine:
                bn.weight.uniform_(0.5, 2)
                bn.bias.uniform_(-1, 1)
        bn.eval()
        w, b = DF.fuse_conv_bn(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        )
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)), rtol=1e-12, atol=1e-12)

    def test_linear(self):
        linear = nn.Linear(5, 3)
        bn = nn.BatchNorm1d(3)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
        bn.eval()
        w, b = DF.fuse_conv_bn(
            linear.weight, linear.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        )
        x = torch.randn(4, 5)
        torch.testing.assert_close(F.linear(x, w, b), bn(linear(x)), rtol=1e-5, atol=1e-6)

    def test_known_value(self):
        w, b = DF.fuse_conv_bn(
            torch.ones(2, 3),
            torch.tensor([1.0, 2.0]),
            torch.tensor([1.0, 0.0]),
            torch.full((2,), 4.0),
            torch.tensor([2.0, 1.0]),
            torch.tensor([0.5, 0.0]),
            eps=0.0,
        )
        torch.testing.assert_close(w, torch.tensor([[1.0] * 3, [0.5] * 3]))
        torch.testing.assert_close(b, torch.tensor([0.5, 1.0]))


class TestPadKernel:
    @pytest.mark.parametrize(
        "kernel,size", [((1, 3), (3, 3)), ((3, 1), (3, 3)), ((1, 3), (5, 5)), ((3, 3), (3, 3))]
    )
    def test_padded_conv_equals_original(self, kernel, size):
        w = torch.randn(4, 2, *kernel, dtype=torch.float64)
        x = torch.randn(1, 2, 6, 7, dtype=torch.float64)
        padded = DF.pad_kernel(w, size)
        assert padded.shape == (4, 2, *size)
        original = F.conv2d(x, w, padding=(kernel[0] // 2, kernel[1] // 2))
        torch.testing.assert_close(F.conv2d(x, padded, padding=(size[0] // 2, size[1] // 2)), original)

    def test_known_value(self):
        out = DF.pad_kernel(torch.ones(1, 1, 1, 3), (3, 3))[0, 0]
        torch.testing.assert_close(out, torch.tensor([[0.0, 0, 0], [1, 1, 1], [0, 0, 0]]))

    @pytest.mark.parametrize("size", [(1, 3), (3, 2), (4, 3)])
    def test_exceptions(self, size):
        with pytest.raises(ValueError, match="expected at least the kernel size.*got"):
            DF.pad_kernel(torch.ones(1, 1, 3, 3), size)


def test_functional_all_is_sorted_and_resolves():
    assert DF.__all__ == sorted(DF.__all__)
    for name in DF.__all__:
        assert callable(getattr(DF, name)), name


# ============================================================================ head_overlap


def loop_head_overlap(maps):
    """The documented formula with loops: mean over samples and head pairs of sum_cells min(p_k, p_j)."""
    values = []
    for sample in maps.tolist():
        flat = [[v for row in m for v in row] for m in sample]
        probs = [[v / sum(m) for v in m] if sum(m) > 0 else [0.0] * len(m) for m in flat]
        pairs = [
            sum(min(a, b) for a, b in zip(probs[k], probs[j], strict=True))
            for k in range(len(probs))
            for j in range(k + 1, len(probs))
        ]
        values.append(sum(pairs) / len(pairs))
    return values


def random_maps(seed, batch, heads, height, width, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(batch, heads, height, width, generator=g, dtype=dtype)
    return maps * (torch.rand(maps.shape, generator=g, dtype=dtype) > 0.4)  # some empty cells


class TestHeadOverlap:
    def test_hand_computed(self):
        # head 0 on the left column, head 1 on the right, head 2 spread: 1/4 on each cell
        maps = torch.tensor(
            [[[[2.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]], [[5.0, 5.0], [5.0, 5.0]]]],
            dtype=torch.float64,
        )
        # pairs: (0,1) disjoint -> 0; (0,2) min(1/2,1/4)*2 = 1/2; (1,2) 1/2
        assert DF.head_overlap(maps).item() == pytest.approx(1 / 3, rel=1e-12)
        expected = torch.tensor([1 / 3], dtype=torch.float64)
        torch.testing.assert_close(DF.head_overlap(maps, reduction="none"), expected)

    @given(
        seed=seeds,
        batch=st.integers(1, 4),
        heads=st.integers(2, 5),
        height=st.integers(1, 4),
        width=st.integers(1, 4),
    )
    def test_property_equals_loop_and_lies_in_unit_interval(self, seed, batch, heads, height, width):
        maps = random_maps(seed, batch, heads, height, width)
        per_sample = DF.head_overlap(maps, reduction="none")
        torch.testing.assert_close(per_sample, torch.tensor(loop_head_overlap(maps), dtype=torch.float64))
        assert ((per_sample >= 0) & (per_sample <= 1 + 1e-12)).all()
        torch.testing.assert_close(DF.head_overlap(maps), per_sample.mean())

    @given(seed=seeds, batch=st.integers(1, 4), heads=st.integers(2, 5), cells=st.integers(1, 9))
    def test_property_identical_maps_give_one(self, seed, batch, heads, cells):
        one = random_maps(seed, batch, 1, 1, cells) + 1e-3
        g = torch.Generator().manual_seed(seed)
        scales = 10.0 ** (6 * torch.rand(batch, heads, 1, 1, generator=g, dtype=torch.float64) - 3)
        assert DF.head_overlap(one * scales).item() == pytest.approx(1.0, rel=1e-12)

    @given(seed=seeds, batch=st.integers(1, 4), heads=st.integers(2, 5))
    def test_property_disjoint_maps_give_zero(self, seed, batch, heads):
        g = torch.Generator().manual_seed(seed)
        cells = torch.randperm(heads * 3, generator=g)[: heads * 2].reshape(heads, 2)  # 2 own cells each
        maps = torch.zeros(batch, heads, heads * 3, dtype=torch.float64)
        for k in range(heads):
            maps[:, k, cells[k]] = torch.rand(batch, 2, generator=g, dtype=torch.float64) + 0.1
        assert DF.head_overlap(maps).item() == 0.0

    @given(seed=seeds, batch=st.integers(1, 4), heads=st.integers(2, 5), exponent=st.floats(-20, 20))
    def test_property_invariant_to_scaling_and_head_and_batch_order(self, seed, batch, heads, exponent):
        maps = random_maps(seed, batch, heads, 3, 4)
        g = torch.Generator().manual_seed(seed + 1)
        base = DF.head_overlap(maps)
        per_map = 10.0 ** (exponent + torch.rand(batch, heads, 1, 1, generator=g, dtype=torch.float64))
        for other in (
            maps * per_map,
            maps[:, torch.randperm(heads, generator=g)],
            maps[torch.randperm(batch, generator=g)],
        ):
            torch.testing.assert_close(DF.head_overlap(other), base, rtol=1e-12, atol=1e-15)

    def test_zero_map_overlaps_nothing(self):
        maps = torch.zeros(1, 2, 2, 2)
        maps[0, 0] = 1.0
        assert DF.head_overlap(maps).item() == 0.0

    def test_float32_computes_in_float32_and_compiles(self):
        maps = random_maps(0, 3, 4, 5, 5, dtype=torch.float32)
        compiled = torch.compile(lambda m: DF.head_overlap(m, validate=False), fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(maps), DF.head_overlap(maps))
        assert DF.head_overlap(maps).dtype == torch.float32

    def test_exceptions(self):
        with pytest.raises(ValueError, match="maps: expected at least 2 heads to compare, got 1"):
            DF.head_overlap(torch.rand(2, 1, 3, 3))
        with pytest.raises(ValueError, match="maps: expected non-negative attention maps"):
            DF.head_overlap(torch.randn(2, 3, 3, 3) - 5)
        with pytest.raises(ValueError, match="maps: expected a tensor of shape"):
            DF.head_overlap(torch.rand(2, 3))
        with pytest.raises(ValueError, match="reduction: expected one of"):
            DF.head_overlap(torch.rand(2, 3, 3, 3), reduction="sum")
        with pytest.raises(ValueError, match="maps: expected a non-empty tensor"):
            DF.head_overlap(torch.rand(0, 3, 3, 3))
