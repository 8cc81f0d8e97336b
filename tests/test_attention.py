"""Tests of the attention units: SpatialAttention, ChannelAttention, MultiHeadAttentionBlock.

The reference for checkpoint compatibility is a plain re-implementation, written here,
of the authors' per-head ``CrossAttentionHead`` (``sa`` + ``ca``, nn.Sequential
convolutions carrying their state-dict key names), looped over heads and stacked.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from module_helpers import randomize
from torch import nn

from dan_layers import (
    AttentionFusion,
    ChannelAttention,
    MultiHeadAttentionBlock,
    SpatialAttention,
    reparameterize_model,
)
from dan_layers._headwise import HeadwiseConv2d

# ----------------------------------------------------------------------------- references


class AuthorsSpatialAttention(nn.Module):
    """The authors' per-head spatial unit (their layout and key names), for C channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1x1 = nn.Sequential(nn.Conv2d(channels, half, kernel_size=1), nn.BatchNorm2d(half))
        self.conv_3x3 = nn.Sequential(
            nn.Conv2d(half, channels, kernel_size=3, padding=1), nn.BatchNorm2d(channels)
        )
        self.conv_1x3 = nn.Sequential(
            nn.Conv2d(half, channels, kernel_size=(1, 3), padding=(0, 1)), nn.BatchNorm2d(channels)
        )
        self.conv_3x1 = nn.Sequential(
            nn.Conv2d(half, channels, kernel_size=(3, 1), padding=(1, 0)), nn.BatchNorm2d(channels)
        )
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv1x1(x)
        y = self.relu(self.conv_3x3(y) + self.conv_1x3(y) + self.conv_3x1(y))
        return x * y.sum(dim=1, keepdim=True)


class AuthorsChannelAttention(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.attention = nn.Sequential(
            nn.Linear(channels, channels // 16),
            nn.BatchNorm1d(channels // 16),
            nn.ReLU(inplace=True),
            nn.Linear(channels // 16, channels),
            nn.Sigmoid(),
        )

    def forward(self, sa):
        pooled = self.gap(sa).reshape(sa.shape[0], -1)
        return pooled * self.attention(pooled)


class AuthorsCrossAttentionHead(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.sa = AuthorsSpatialAttention(channels)
        self.ca = AuthorsChannelAttention(channels)

    def forward(self, x):
        return self.ca(self.sa(x))


class AuthorsHeadsAndFusion(nn.Module):
    """The attention part of the authors' DAN: cat_head{i}, then log-softmax, sum, fc, bn."""

    def __init__(self, channels: int, num_heads: int, num_classes: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        for i in range(num_heads):
            setattr(self, f"cat_head{i}", AuthorsCrossAttentionHead(channels))
        self.fc = nn.Linear(channels, num_classes)
        self.bn = nn.BatchNorm1d(num_classes)

    def forward(self, x):
        heads = torch.stack([getattr(self, f"cat_head{i}")(x) for i in range(self.num_heads)]).permute(1, 0, 2)
        if heads.size(1) > 1:
            heads = F.log_softmax(heads, dim=1)
        out = self.bn(self.fc(heads.sum(dim=1)))
        return out, heads


# ----------------------------------------------------------------------------- helpers


def per_head_forward(spatial, channel, x):
    return torch.stack([ca(sa(x)) for sa, ca in zip(spatial, channel, strict=True)], dim=1)


def state_roundtrip(module, factory):
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    fresh = factory()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return fresh


AUTHORS_SA_KEYS = {
    f"{branch}.{idx}.{p}"
    for branch in ("conv1x1", "conv_3x3", "conv_1x3", "conv_3x1")
    for idx, params in (
        ("0", ("weight", "bias")),
        ("1", ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
    )
    for p in params
}
AUTHORS_CA_KEYS = {
    "attention.0.weight",
    "attention.0.bias",
    "attention.1.weight",
    "attention.1.bias",
    "attention.1.running_mean",
    "attention.1.running_var",
    "attention.1.num_batches_tracked",
    "attention.3.weight",
    "attention.3.bias",
}


# ============================================================================ SpatialAttention


class TestSpatialAttention:
    def test_smoke(self, device, dtype):
        sa = SpatialAttention(32, device=device, dtype=dtype)
        x = torch.randn(2, 32, 5, 6, device=device, dtype=dtype)
        out, amap = sa(x, return_attention=True)
        assert out.shape == x.shape and amap.shape == (2, 1, 5, 6)
        assert out.dtype == dtype and amap.dtype == dtype
        torch.testing.assert_close(out, x * amap)
        assert (amap >= 0).all()  # sum over channels of a ReLU: unnormalised, non-negative
        assert torch.equal(sa(x), out)

    def test_multi_head_shapes(self):
        sa = SpatialAttention(16, num_heads=3)
        x = torch.randn(2, 16, 4, 5)
        out, maps = sa(x, return_attention=True)
        assert out.shape == (2, 3, 16, 4, 5) and maps.shape == (2, 3, 4, 5)
        torch.testing.assert_close(out, x.unsqueeze(1) * maps.unsqueeze(2))

    def test_authors_key_names_and_shapes(self):
        ours = SpatialAttention(64)
        theirs = AuthorsSpatialAttention(64)
        assert set(ours.state_dict()) == AUTHORS_SA_KEYS == set(theirs.state_dict())
        for key, value in theirs.state_dict().items():
            assert ours.state_dict()[key].shape == value.shape, key

    @pytest.mark.parametrize("train", [True, False])
    def test_equals_authors_unit(self, train):
        theirs = randomize(AuthorsSpatialAttention(24), seed=1).train(train)
        ours = SpatialAttention(24).train(train)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(3, 24, 5, 4)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)

    def test_no_sigmoid_map_can_exceed_one(self):
        sa = randomize(SpatialAttention(16), seed=2).eval()
        _, amap = sa(torch.randn(2, 16, 4, 4) * 10, return_attention=True)
        assert amap.max() > 1.0

    def test_init_like_the_authors(self):
        sa = SpatialAttention(64, num_heads=2)
        for name in ("conv1x1", "conv_3x3", "conv_1x3", "conv_3x1"):
            conv, bn = getattr(sa, name)
            assert torch.count_nonzero(conv.bias) == 0
            assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
            fan_out = conv.weight.shape[0] // 2 * conv.weight[0, 0].numel()  # per head
            assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.1)

    def test_custom_kernel_sizes(self):
        sa = SpatialAttention(12, kernel_sizes=((5, 5), (1, 3)))
        assert sa.branch_names == ("conv_5x5", "conv_1x3")
        assert sa.conv_5x5[0].kernel_size == (5, 5) and sa.conv_5x5[0].padding == (2, 2)
        assert sa(torch.randn(2, 12, 3, 7)).shape == (2, 12, 3, 7)

    def test_channels_last_equals_contiguous(self):
        sa = randomize(SpatialAttention(16), seed=3).eval()
        x = torch.randn(2, 16, 5, 6)
        torch.testing.assert_close(sa(x.to(memory_format=torch.channels_last)), sa(x), rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("groups", [1, 3])
    @pytest.mark.parametrize("channels_last", [False, True])
    def test_headwise_conv_equals_grouped_conv(self, groups, channels_last):
        # on CPU the grouped branch convolutions run group by group as dense convolutions: output and
        # every gradient must be those of the grouped convolution
        conv = HeadwiseConv2d(6, 9, (3, 1), padding=(1, 0), groups=groups, dtype=torch.float64)
        x = torch.randn(4, 6, 5, 6, dtype=torch.float64)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        out = conv(x)
        expected = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, groups)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last  # follows the input
        weights = torch.randn_like(out)
        grads = torch.autograd.grad((out * weights).sum(), (x, conv.weight, conv.bias))
        expected_grads = torch.autograd.grad((expected * weights).sum(), (x, conv.weight, conv.bias))
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("train", [True, False])
    @pytest.mark.parametrize("num_heads", [1, 2])
    def test_cpu_convolutions(self, monkeypatch, train, num_heads):
        # where the CPU speed comes from: one wide 1x1 conv, then one dense conv per head and branch;
        # the layout is the input's whatever the batch size (no shape-dependent switch)
        seen = []
        real_conv2d = F.conv2d

        def spy(x, weight, *args, **kwargs):
            seen.append((x.is_contiguous(memory_format=torch.channels_last), weight.shape[0]))
            return real_conv2d(x, weight, *args, **kwargs)

        monkeypatch.setattr(F, "conv2d", spy)
        sa = SpatialAttention(16, num_heads=num_heads).train(train)
        for batch in (2, 64):
            seen.clear()
            sa(torch.randn(batch, 16, 5, 5))
            assert len(seen) == 1 + num_heads * 3
            assert {layout for layout, _ in seen} == {False}
            assert seen[0][1] == 8 * num_heads and {out for _, out in seen[1:]} == {16}

    def test_gradcheck_eval_float64(self):
        sa = randomize(SpatialAttention(4, kernel_sizes=((3, 3), (1, 3)), dtype=torch.float64), seed=4).eval()
        x = torch.randn(2, 4, 3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: sa(t), (x,), fast_mode=True)

    def test_state_dict_roundtrip(self):
        sa = randomize(SpatialAttention(8, num_heads=2), seed=5).eval()
        fresh = state_roundtrip(sa, lambda: SpatialAttention(8, num_heads=2)).eval()
        x = torch.randn(2, 8, 3, 3)
        torch.testing.assert_close(fresh(x), sa(x), rtol=0, atol=0)

    def test_exceptions(self):
        sa = SpatialAttention(8)
        with pytest.raises(ValueError, match="expected.*got shape"):
            sa(torch.randn(2, 8, 4))
        with pytest.raises(ValueError, match="expected in_channels = 8.*got 6"):
            sa(torch.randn(2, 6, 4, 4))
        with pytest.raises(ValueError, match="expected a batch of at least 2, got 1"):
            sa.train()(torch.randn(1, 8, 1, 1))
        sa.train()(torch.randn(1, 8, 2, 2))  # one sample, 4 values per channel: BatchNorm2d copes
        with pytest.raises(ValueError, match="expected at most in_channels.*got 16"):
            SpatialAttention(8, reduction=16)
        with pytest.raises(ValueError, match="expected odd positive sizes, got"):
            SpatialAttention(8, kernel_sizes=((2, 3),))
        with pytest.raises(ValueError, match="expected distinct sizes, got"):
            SpatialAttention(8, kernel_sizes=((3, 3), (3, 3)))
        with pytest.raises(ValueError, match="expected at least one kernel size, got none"):
            SpatialAttention(8, kernel_sizes=())
        with pytest.raises(ValueError, match="expected a positive int, got 0"):
            SpatialAttention(8, num_heads=0)
        with pytest.raises(ValueError, match="expected a positive int, got 0"):
            SpatialAttention(0)

    def test_validate_false_skips_the_checks(self):
        sa = SpatialAttention(8, validate=False).train()
        with pytest.raises(ValueError):
            SpatialAttention(8).train()(torch.randn(1, 8, 1, 1))
        # without validation torch's own BatchNorm error surfaces instead of ours
        with pytest.raises(Exception) as info:
            sa(torch.randn(1, 8, 1, 1))
        assert "expected a batch of at least 2" not in str(info.value)

    def test_mismatched_devices(self):
        sa = SpatialAttention(8)
        with pytest.raises(ValueError, match="expected.*got"):
            sa(torch.randn(2, 8, 3, 3, device="meta"))


# ============================================================================ ChannelAttention


class TestChannelAttention:
    def test_smoke(self, device, dtype):
        ca = ChannelAttention(32, device=device, dtype=dtype)
        x = torch.randn(3, 32, 4, 5, device=device, dtype=dtype)
        out, gate = ca(x, return_attention=True)
        assert out.shape == gate.shape == (3, 32) and out.dtype == dtype
        assert ((gate > 0) & (gate < 1)).all()
        torch.testing.assert_close(out, x.mean(dim=(2, 3)) * gate)

    def test_input_layouts(self):
        ca = randomize(ChannelAttention(32), seed=1).eval()
        x = torch.randn(3, 32, 4, 5)
        pooled = x.mean(dim=(2, 3))
        torch.testing.assert_close(ca(pooled), ca(x))
        torch.testing.assert_close(ca(pooled.unsqueeze(1)), ca(x).unsqueeze(1))
        multi = ChannelAttention(32, num_heads=3)
        assert multi(torch.randn(2, 3, 32)).shape == (2, 3, 32)

    def test_authors_key_names_and_shapes(self):
        ours = ChannelAttention(64)
        theirs = AuthorsChannelAttention(64)
        assert set(ours.state_dict()) == AUTHORS_CA_KEYS == set(theirs.state_dict())
        for key, value in theirs.state_dict().items():
            assert ours.state_dict()[key].shape == value.shape, key

    @pytest.mark.parametrize("train", [True, False])
    def test_equals_authors_unit(self, train):
        theirs = randomize(AuthorsChannelAttention(48), seed=2).train(train)
        ours = ChannelAttention(48).train(train)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(4, 48, 3, 3)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)

    def test_init_like_the_authors(self):
        ca = ChannelAttention(512)
        for idx in (0, 3):
            layer = ca.attention[idx]
            assert torch.count_nonzero(layer.bias) == 0
            assert layer.weight.std().item() == pytest.approx(0.001, rel=0.1)

    def test_gate_is_a_separate_method(self):
        ca = randomize(ChannelAttention(16, num_heads=2), seed=3).eval()
        pooled = torch.randn(2, 2, 16)
        _, gate = ca(pooled, return_attention=True)
        torch.testing.assert_close(ca._gate(pooled), gate)

    def test_gradcheck_eval_float64(self):
        ca = randomize(ChannelAttention(8, reduction=2, num_heads=2, dtype=torch.float64), seed=4).eval()
        x = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: ca(t), (x,), fast_mode=True)

    def test_state_dict_roundtrip(self):
        ca = randomize(ChannelAttention(16, num_heads=2), seed=5).eval()
        fresh = state_roundtrip(ca, lambda: ChannelAttention(16, num_heads=2)).eval()
        x = torch.randn(2, 2, 16)
        torch.testing.assert_close(fresh(x), ca(x), rtol=0, atol=0)

    def test_exceptions(self):
        ca = ChannelAttention(32)
        with pytest.raises(ValueError, match="expected.*got shape"):
            ca(torch.randn(32))
        with pytest.raises(ValueError, match="expected in_channels = 32.*got 16"):
            ca(torch.randn(2, 16, 3, 3))
        with pytest.raises(ValueError, match="expected in_channels = 32.*got 16"):
            ca(torch.randn(2, 16))
        with pytest.raises(ValueError, match="expected num_heads = 1.*got 2"):
            ca(torch.randn(2, 2, 32))
        with pytest.raises(ValueError, match="expected.*K=3.*got shape"):
            ChannelAttention(32, num_heads=3)(torch.randn(2, 32, 3, 3))
        with pytest.raises(ValueError, match="BatchNorm.*expected a batch of at least 2, got 1"):
            ca.train()(torch.randn(1, 32, 4, 4))
        ca.eval()(torch.randn(1, 32, 4, 4))  # fine in eval mode
        with pytest.raises(ValueError, match="expected at most in_channels.*got 64"):
            ChannelAttention(32, reduction=64)
        with pytest.raises(ValueError, match="expected a positive int, got 0"):
            ChannelAttention(32, reduction=0)

    def test_mismatched_devices(self):
        with pytest.raises(ValueError, match="expected.*got"):
            ChannelAttention(32).eval()(torch.randn(2, 32, device="meta"))


# ============================================================================ MultiHeadAttentionBlock


CONFIGS = [
    # (in_channels, num_heads, spatial_reduction, channel_reduction, kernel_sizes, H, W)
    pytest.param(32, 4, 2, 16, ((3, 3), (1, 3), (3, 1)), 7, 7, id="dan-like"),
    pytest.param(35, 1, 2, 16, ((3, 3), (1, 3), (3, 1)), 5, 7, id="K1-oddC"),
    pytest.param(35, 2, 2, 4, ((3, 3), (1, 3), (3, 1)), 4, 6, id="K2-oddC-nonsquare"),
    pytest.param(21, 4, 3, 5, ((5, 5), (1, 3)), 6, 3, id="K4-custom-kernels"),
]


class TestMultiHeadAttentionBlock:
    def test_smoke(self, device, dtype):
        block = MultiHeadAttentionBlock(32, 4, device=device, dtype=dtype)
        x = torch.randn(2, 32, 7, 7, device=device, dtype=dtype)
        heads, maps = block(x, return_attention=True)
        assert heads.shape == (2, 4, 32) and maps.shape == (2, 4, 7, 7)
        assert heads.dtype == maps.dtype == dtype
        assert torch.equal(block(x), heads)

    @pytest.mark.parametrize("batch,heads_,height,width", [(1, 1, 1, 1), (3, 2, 4, 9), (2, 5, 2, 3)])
    def test_cardinality(self, batch, heads_, height, width):
        block = MultiHeadAttentionBlock(16, heads_, channel_reduction=4).eval()
        out, maps = block(torch.randn(batch, 16, height, width), return_attention=True)
        assert out.shape == (batch, heads_, 16) and maps.shape == (batch, heads_, height, width)

    def test_state_dict_of_one_head_has_authors_keys(self):
        block = MultiHeadAttentionBlock(64, 1)
        keys = set(block.state_dict())
        assert keys == {f"spatial.{k}" for k in AUTHORS_SA_KEYS} | {f"channel.{k}" for k in AUTHORS_CA_KEYS}

    @pytest.mark.parametrize("in_channels,num_heads,sred,cred,kernels,height,width", CONFIGS)
    @pytest.mark.parametrize("train", [True, False])
    def test_fused_equals_per_head(self, in_channels, num_heads, sred, cred, kernels, height, width, train):
        kwargs = {"spatial_reduction": sred, "channel_reduction": cred, "kernel_sizes": kernels}
        block = randomize(MultiHeadAttentionBlock(in_channels, num_heads, **kwargs), seed=num_heads).train(
            train
        )
        spatial, channel = block.split_heads()
        assert len(spatial) == len(channel) == num_heads
        assert all(m.training == train for m in spatial + channel)
        x = torch.randn(3, in_channels, height, width, requires_grad=True)
        fused, maps = block(x, return_attention=True)
        x_ref = x.detach().clone().requires_grad_(True)
        outs, map_list = [], []
        for sa, ca in zip(spatial, channel, strict=True):  # one forward per head (train mode updates stats)
            scaled, amap = sa(x_ref, return_attention=True)
            outs.append(ca(scaled))
            map_list.append(amap)
        expected, expected_maps = torch.stack(outs, dim=1), torch.cat(map_list, dim=1)
        torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(maps, expected_maps, rtol=1e-4, atol=1e-5)
        # gradients w.r.t. the input agree
        weights = torch.randn_like(fused)
        (g_fused,) = torch.autograd.grad((fused * weights).sum(), x)
        (g_ref,) = torch.autograd.grad((expected * weights).sum(), x_ref)
        torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-5)
        if train:  # running statistics were updated per head in the same way
            for k, (sa, ca) in enumerate(zip(spatial, channel, strict=True)):
                for name, bn in (
                    ("conv1x1", sa.conv1x1[1]),
                    (sa.branch_names[0], getattr(sa, sa.branch_names[0])[1]),
                ):
                    fused_bn = getattr(block.spatial, name)[1]
                    torch.testing.assert_close(fused_bn.running_mean.chunk(num_heads)[k], bn.running_mean)
                    torch.testing.assert_close(fused_bn.running_var.chunk(num_heads)[k], bn.running_var)
                torch.testing.assert_close(
                    block.channel.attention[1].running_var.chunk(num_heads)[k], ca.attention[1].running_var
                )

    def test_fused_equals_per_head_float64_exactly(self):
        block = randomize(
            MultiHeadAttentionBlock(20, 3, channel_reduction=4, dtype=torch.float64), seed=9
        ).eval()
        spatial, channel = block.split_heads()
        x = torch.randn(2, 20, 5, 4, dtype=torch.float64)
        torch.testing.assert_close(block(x), per_head_forward(spatial, channel, x), rtol=1e-10, atol=1e-12)

    def test_heads_are_independent(self):
        block = randomize(MultiHeadAttentionBlock(16, 3, channel_reduction=4), seed=3).eval()
        x = torch.randn(2, 16, 4, 4)
        before = block(x)
        with torch.no_grad():  # perturb head 1 only
            block.spatial.conv_3x3[0].weight.chunk(3)[1].mul_(3.0)
            block.channel.attention[3].weight.chunk(3)[1].add_(1.0)
        after = block(x)
        torch.testing.assert_close(after[:, [0, 2]], before[:, [0, 2]])
        assert not torch.allclose(after[:, 1], before[:, 1])

    def test_split_then_load_roundtrip(self):
        kwargs = {"channel_reduction": 4, "kernel_sizes": ((5, 5), (1, 3))}
        block = randomize(MultiHeadAttentionBlock(16, 3, **kwargs), seed=4).eval()
        other = MultiHeadAttentionBlock(16, 3, **kwargs).eval()
        other.load_from_heads(*block.split_heads())
        for key, value in block.state_dict().items():
            assert torch.equal(other.state_dict()[key], value), key
        x = torch.randn(2, 16, 3, 5)
        torch.testing.assert_close(other(x), block(x), rtol=0, atol=0)

    def test_load_then_split_roundtrip(self):
        spatial = [randomize(SpatialAttention(12), seed=10 + k) for k in range(2)]
        channel = [randomize(ChannelAttention(12, reduction=4), seed=20 + k) for k in range(2)]
        block = MultiHeadAttentionBlock(12, 2, channel_reduction=4).load_from_heads(spatial, channel)
        spatial_out, channel_out = block.split_heads()
        for originals, copies in ((spatial, spatial_out), (channel, channel_out)):
            for original, duplicate in zip(originals, copies, strict=True):
                state = duplicate.state_dict()
                assert set(state) == set(original.state_dict())
                for key, value in original.state_dict().items():
                    assert torch.equal(state[key], value), key
        # the copies are independent of the block
        with torch.no_grad():
            spatial_out[0].conv1x1[0].weight.add_(1.0)
        assert not torch.equal(spatial_out[0].conv1x1[0].weight, block.spatial.conv1x1[0].weight.chunk(2)[0])

    def test_load_from_heads_errors(self):
        block = MultiHeadAttentionBlock(12, 2, channel_reduction=4)
        spatial = [SpatialAttention(12) for _ in range(2)]
        channel = [ChannelAttention(12, reduction=4) for _ in range(2)]
        with pytest.raises(ValueError, match="expected 2 per-head modules, got 1"):
            block.load_from_heads(spatial[:1], channel)
        with pytest.raises(ValueError, match="expected 2 per-head modules, got 3"):
            block.load_from_heads(spatial, channel + [ChannelAttention(12, reduction=4)])
        with pytest.raises(ValueError, match="expected a one-head SpatialAttention, got"):
            block.load_from_heads([SpatialAttention(12, num_heads=2)] * 2, channel)
        with pytest.raises(ValueError, match="expected a one-head ChannelAttention, got SpatialAttention"):
            block.load_from_heads(spatial, spatial)
        with pytest.raises(ValueError, match="expected the keys.*missing.*unexpected"):
            block.load_from_heads([SpatialAttention(12, kernel_sizes=((5, 5),))] * 2, channel)
        with pytest.raises(ValueError, match="expected per-head.*got"):
            block.load_from_heads(spatial, [ChannelAttention(12, reduction=3)] * 2)

    @pytest.mark.parametrize("train", [True, False])
    @pytest.mark.parametrize("num_heads", [1, 4])
    def test_authors_checkpoint_loads_and_matches(self, train, num_heads):
        """The authors' cat_head{i}.sa / .ca and fc / bn keys load with strict=True and give their output."""
        channels, classes = 32, 7
        theirs = randomize(AuthorsHeadsAndFusion(channels, num_heads, classes), seed=num_heads).train(train)
        checkpoint = {"model_state_dict": theirs.state_dict()}

        state = checkpoint["model_state_dict"]
        spatial, channel = [], []
        for i in range(num_heads):
            sa, ca = SpatialAttention(channels), ChannelAttention(channels)
            sa.load_state_dict(
                {k[len(f"cat_head{i}.sa.") :]: v for k, v in state.items() if k.startswith(f"cat_head{i}.sa.")}
            )
            ca.load_state_dict(
                {k[len(f"cat_head{i}.ca.") :]: v for k, v in state.items() if k.startswith(f"cat_head{i}.ca.")}
            )
            spatial.append(sa)
            channel.append(ca)
        block = MultiHeadAttentionBlock(channels, num_heads).load_from_heads(spatial, channel).train(train)
        fusion = AttentionFusion(channels, classes)
        fusion.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] in ("fc", "bn")})
        fusion.train(train)

        x = torch.randn(4, channels, 7, 7)
        logits_theirs, heads_theirs = theirs(x)
        logits_ours, heads_ours = fusion(block(x))
        torch.testing.assert_close(heads_ours, heads_theirs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits_ours, logits_theirs, rtol=1e-4, atol=1e-4)

    def test_channels_last_equals_contiguous(self):
        block = randomize(MultiHeadAttentionBlock(32, 4), seed=6).eval()
        x = torch.randn(2, 32, 7, 7)
        out_cl = block(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(out_cl, block(x), rtol=1e-5, atol=1e-6)
        block.train()
        torch.testing.assert_close(
            block(x.to(memory_format=torch.channels_last)), block(x), rtol=1e-4, atol=1e-5
        )

    def test_float64_module(self):
        block = randomize(MultiHeadAttentionBlock(16, 2, channel_reduction=4, dtype=torch.float64), seed=7)
        out = block(torch.randn(3, 16, 4, 4, dtype=torch.float64))
        assert out.dtype == torch.float64 and torch.isfinite(out).all()
        assert all(p.dtype == torch.float64 for p in block.parameters())
        assert all(p.dtype == torch.float64 for p in block.split_heads()[0][0].parameters())

    def test_gradcheck_eval_float64(self):
        block = MultiHeadAttentionBlock(
            8, 2, channel_reduction=4, kernel_sizes=((3, 3), (1, 3), (3, 1)), dtype=torch.float64
        )
        block = randomize(block, seed=8).eval()
        x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: block(t), (x,), fast_mode=True)
        # and with respect to a parameter (the fused grouped convolution of every head)
        weight = block.spatial.conv_1x3[0].weight

        def with_weight(w):
            saved = block.spatial.conv_1x3[0].weight
            del block.spatial.conv_1x3[0].weight
            block.spatial.conv_1x3[0].weight = w
            try:
                return block(x.detach())
            finally:
                block.spatial.conv_1x3[0].weight = saved

        assert torch.autograd.gradcheck(
            with_weight, (weight.detach().clone().requires_grad_(True),), fast_mode=True
        )

    def test_every_parameter_gets_a_gradient(self):
        block = MultiHeadAttentionBlock(16, 3, channel_reduction=4).train()
        block(torch.randn(4, 16, 5, 5)).square().sum().backward()
        for name, p in block.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name

    def test_state_dict_roundtrip(self):
        block = randomize(MultiHeadAttentionBlock(16, 3, channel_reduction=4), seed=11).eval()
        fresh = state_roundtrip(block, lambda: MultiHeadAttentionBlock(16, 3, channel_reduction=4)).eval()
        x = torch.randn(2, 16, 4, 4)
        torch.testing.assert_close(fresh(x), block(x), rtol=0, atol=0)

    def test_exceptions(self):
        block = MultiHeadAttentionBlock(32, 4)
        with pytest.raises(ValueError, match="expected.*got shape"):
            block(torch.randn(2, 32, 7))
        with pytest.raises(ValueError, match="expected in_channels = 32.*got 16"):
            block(torch.randn(2, 16, 7, 7))
        with pytest.raises(ValueError, match="MultiHeadAttentionBlock.*expected a batch of at least 2, got 1"):
            block.train()(torch.randn(1, 32, 7, 7))
        assert block.eval()(torch.randn(1, 32, 7, 7)).shape == (1, 4, 32)
        with pytest.raises(ValueError, match="expected at most in_channels.*got 64"):
            MultiHeadAttentionBlock(32, 4, channel_reduction=64)
        with pytest.raises(ValueError, match="expected at most in_channels.*got 33"):
            MultiHeadAttentionBlock(32, 4, spatial_reduction=33)
        with pytest.raises(ValueError, match="expected odd positive sizes, got"):
            MultiHeadAttentionBlock(32, 4, kernel_sizes=((3, 3), (2, 2)))
        with pytest.raises(ValueError, match="expected a positive int, got 0"):
            MultiHeadAttentionBlock(32, 0)

    def test_validate_false_skips_the_checks(self):
        x = torch.randn(1, 32, 7, 7)
        with pytest.raises(ValueError):
            MultiHeadAttentionBlock(32, 2).train()(x)
        block = MultiHeadAttentionBlock(32, 2, validate=False).train()
        with pytest.raises(Exception) as info:  # torch's BatchNorm1d error, not ours
            block(x)
        assert "expected a batch of at least 2" not in str(info.value)

    def test_mismatched_devices(self):
        with pytest.raises(ValueError, match="expected.*got"):
            MultiHeadAttentionBlock(32, 2).eval()(torch.randn(2, 32, 7, 7, device="meta"))


# ============================================================================ one semantics on every slot


def module_graph_maps(sa: SpatialAttention, x: torch.Tensor) -> torch.Tensor:
    """The spatial unit's module graph written out: every norm slot called as itself, every
    convolution a plain grouped ``F.conv2d`` (no per-head path)."""

    def slot(seq, inp):
        conv, norm = seq
        out = F.conv2d(inp, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return norm(out)

    y = slot(sa.conv1x1, x)
    z = sum(slot(getattr(sa, name), y) for name in sa.branch_names)
    return torch.relu(z).reshape(x.shape[0], sa.num_heads, -1, *x.shape[2:]).sum(dim=2)


class ScaleShiftNorm(nn.Module):
    """A user-defined norm: per-channel RMS normalisation with a learnable scale (not foldable)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels, dtype=torch.float64))

    def forward(self, x):
        rms = x.pow(2).mean(dim=tuple(range(2, x.ndim)), keepdim=True).add(1e-5).sqrt()
        return x / rms * self.scale.reshape(1, -1, *([1] * (x.ndim - 2)))


def swap(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, new)


def block64(num_heads: int = 3, seed: int = 0) -> MultiHeadAttentionBlock:
    block = MultiHeadAttentionBlock(12, num_heads, channel_reduction=4, dtype=torch.float64)
    return randomize(block, seed=seed)


class TestSwappedModules:
    """Whatever sits in a conv or norm slot is computed as the module graph computes it, or refused."""

    @pytest.mark.parametrize("train", [False, True])
    def test_sync_batchnorm_equals_batchnorm(self, train):
        block = block64().train(train)
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(block)).train(train)
        assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 5
        x = torch.randn(4, 12, 5, 6, dtype=torch.float64)
        for _ in range(2):  # running statistics accumulate alike
            torch.testing.assert_close(synced(x), block(x), rtol=1e-12, atol=1e-12)
        for (name, a), (_, b) in zip(synced.named_buffers(), block.named_buffers(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)

    def test_sync_batchnorm_folds_in_reparameterize(self):
        block = block64().eval()
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(block)).eval()
        x = torch.randn(3, 12, 5, 6, dtype=torch.float64)
        expected = block(x)
        synced.reparameterize()
        assert synced.is_reparameterized
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
        torch.testing.assert_close(synced(x), expected, rtol=1e-10, atol=1e-12)

    def test_layers_without_bias_fold_in_reparameterize(self):
        # both folds go through one helper, which gives a bias-free layer the folded bias
        block = block64(seed=2)
        reduce = block.spatial.conv1x1[0]
        no_bias = nn.Conv2d(reduce.in_channels, reduce.out_channels, 1, bias=False, dtype=torch.float64)
        swap(block, "spatial.conv1x1.0", no_bias)
        channel = ChannelAttention(12, num_heads=1, reduction=4, dtype=torch.float64)
        channel.attention[0] = nn.Linear(12, 3, bias=False, dtype=torch.float64)
        for module, x in ((block, torch.randn(3, 12, 5, 6, dtype=torch.float64)),
                          (channel, torch.randn(3, 12, 5, 6, dtype=torch.float64))):
            module.train()(x)  # running statistics that are not the identity
            module.eval()
            expected = module(x)
            module.reparameterize()
            torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-12)

    @pytest.mark.parametrize(
        "path,make",
        [
            ("spatial.conv_3x3.1", lambda: nn.GroupNorm(3, 36, dtype=torch.float64)),
            ("spatial.conv1x1.1", lambda: nn.GroupNorm(3, 18, dtype=torch.float64)),
            ("spatial.conv_1x3.1", lambda: nn.Identity()),
            ("spatial.conv_3x1.1", lambda: ScaleShiftNorm(36)),
        ],
    )
    @pytest.mark.parametrize("train", [False, True])
    def test_swapped_norm_is_computed_as_itself(self, path, make, train):
        block = block64(seed=1)
        swap(block, path, make())
        block.train(train)
        x = torch.randn(4, 12, 5, 6, dtype=torch.float64)
        heads, maps = block(x, return_attention=True)
        expected_maps = module_graph_maps(block.spatial, x)
        torch.testing.assert_close(maps, expected_maps, rtol=1e-12, atol=1e-12)
        pooled = (x.unsqueeze(1) * expected_maps.unsqueeze(2)).mean(dim=(-2, -1))
        torch.testing.assert_close(heads, block.channel(pooled), rtol=1e-12, atol=1e-12)

    def test_user_norm_in_channel_attention_is_computed(self):
        block = block64(seed=2).train()
        swap(block, "channel.attention.1", ScaleShiftNorm(9))
        x = torch.randn(4, 12, 5, 6, dtype=torch.float64)
        heads = block(x)
        pooled = (x.unsqueeze(1) * module_graph_maps(block.spatial, x).unsqueeze(2)).mean(dim=(-2, -1))
        first, norm, act, second, gate = block.channel.attention
        w1, w2 = first.weight.reshape(3, 3, 12), second.weight.reshape(3, 12, 3)
        hidden = torch.einsum("bki,koi->bko", pooled, w1).reshape(4, 9) + first.bias
        hidden = act(norm(hidden)).reshape(4, 3, 3)
        expected = pooled * torch.sigmoid(torch.einsum("bki,koi->bko", hidden, w2) + second.bias.reshape(3, 12))
        torch.testing.assert_close(heads, expected, rtol=1e-12, atol=1e-12)

    def test_identity_norm_folds(self):
        block = block64(seed=3).eval()
        swap(block, "spatial.conv_1x3.1", nn.Identity())
        x = torch.randn(2, 12, 5, 6, dtype=torch.float64)
        expected = block(x)
        torch.testing.assert_close(block.reparameterize()(x), expected, rtol=1e-10, atol=1e-12)

    @pytest.mark.parametrize(
        "path,make,named",
        [
            (
                "spatial.conv_3x3.1",
                lambda: nn.GroupNorm(3, 36, dtype=torch.float64),
                r"conv_3x3\[1\] \(GroupNorm\)",
            ),
            ("spatial.conv1x1.1", lambda: ScaleShiftNorm(18), r"conv1x1\[1\] \(ScaleShiftNorm\)"),
            ("channel.attention.1", lambda: ScaleShiftNorm(9), r"attention\[1\] \(ScaleShiftNorm\)"),
            (
                "spatial.conv_3x3.1",
                lambda: nn.BatchNorm2d(36, track_running_stats=False, dtype=torch.float64),
                r"conv_3x3\[1\] \(BatchNorm2d\)",
            ),
            (
                "spatial.conv_1x3",
                lambda: nn.Conv2d(18, 36, (1, 3), padding=(0, 1), groups=3, dtype=torch.float64),
                r"expected conv_1x3 to be Sequential\(Conv2d, norm\), got Conv2d",
            ),
        ],
    )
    def test_unfoldable_slot_is_refused_and_nothing_changes(self, path, make, named):
        block = block64(seed=4)
        swap(block, path, make())
        block.eval()
        x = torch.randn(2, 12, 5, 6, dtype=torch.float64)
        before = {k: v.clone() for k, v in block.state_dict().items()}
        expected = block(x)
        with pytest.raises(ValueError, match=named):
            block.reparameterize()
        with pytest.raises(ValueError, match=named):
            reparameterize_model(nn.Sequential(block).eval())
        assert not block.is_reparameterized
        assert block.state_dict().keys() == before.keys()
        for key, value in block.state_dict().items():
            assert torch.equal(value, before[key]), key
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)

    def test_strided_conv_is_refused(self):
        sa = SpatialAttention(8, num_heads=2).eval()
        sa.conv_3x3[0] = nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=2)
        with pytest.raises(ValueError, match=r"conv_3x3\[0\] with stride 1, dilation 1"):
            sa.reparameterize()


# ============================================================================ hooks


class TestHooks:
    """Hooks on the units and their submodules fire once per call, with all heads, on one path."""

    def record(self, module: nn.Module, calls: list) -> None:
        def hook(mod, inputs, output):
            calls.append((tuple(inputs[0].shape), output))

        module.register_forward_hook(hook)

    @pytest.mark.parametrize("num_heads", [1, 4])
    @pytest.mark.parametrize("train", [True, False])
    def test_forward_hooks_fire_once_with_all_heads(self, num_heads, train):
        block = randomize(MultiHeadAttentionBlock(16, num_heads, channel_reduction=4), seed=1).train(train)
        names = ["spatial", "channel", "spatial.conv1x1", "spatial.conv1x1.0", "spatial.conv_3x3",
                 "spatial.conv_3x3.0", "spatial.conv_1x3.1", "spatial.relu", "channel.attention",
                 "channel.attention.1", "channel.attention.3"]
        calls = {name: [] for name in names}
        for name in names:
            self.record(block.get_submodule(name), calls[name])
        x = torch.randn(3, 16, 5, 6)
        heads = block(x)
        assert all(len(c) == 1 for c in calls.values()), {n: len(c) for n, c in calls.items()}
        k = num_heads
        attended_shape = (3, 16, 5, 6) if k == 1 else (3, k, 16, 5, 6)
        assert calls["spatial"][0][1].shape == attended_shape
        assert calls["spatial.relu"][0][1].shape == (3, k * 16, 5, 6)
        assert calls["spatial.conv1x1.0"][0][1].shape == (3, k * 8, 5, 6)
        assert calls["spatial.conv_3x3.0"][0][0] == (3, k * 8, 5, 6)
        assert calls["channel"][0][0] == (3, k, 16) and calls["channel"][0][1] is heads
        assert calls["channel.attention"][0][0] == (3, k * 16)
        assert calls["channel.attention.1"][0][1].shape == (3, k * 4)

    def test_spatial_hook_gives_each_heads_attended_features(self):
        # what Grad-CAM on the authors' cat_head{i}.sa takes: head i's x * map_i, and its gradient
        block = MultiHeadAttentionBlock(16, 3, channel_reduction=4, dtype=torch.float64)
        block = randomize(block, seed=2).eval()
        fusion = randomize(AttentionFusion(16, 5, dtype=torch.float64), seed=3).eval()
        store = {}

        def keep(mod, inputs, output):
            store["act"] = output
            output.register_hook(lambda grad: store.__setitem__("grad", grad))

        block.spatial.register_forward_hook(keep)
        x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
        logits, _ = fusion(block(x))
        logits[:, 1].sum().backward()

        spatial, channel = block.split_heads()
        outs = [sa(x).requires_grad_(True) for sa in spatial]
        outs = [o.detach().requires_grad_(True) for o in outs]
        ref_logits, _ = fusion(torch.stack([ca(o) for ca, o in zip(channel, outs, strict=True)], dim=1))
        grads = torch.autograd.grad(ref_logits[:, 1].sum(), outs)
        for i in range(3):
            torch.testing.assert_close(store["act"][:, i], outs[i], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(store["grad"][:, i], grads[i], rtol=1e-10, atol=1e-12)

    def test_backward_hooks_fire_once(self):
        block = MultiHeadAttentionBlock(16, 2, channel_reduction=4).train()
        seen = []
        for name in ("spatial", "channel", "spatial.conv_3x3.0", "spatial.relu"):
            block.get_submodule(name).register_full_backward_hook(
                lambda mod, gin, gout, name=name: seen.append((name, tuple(gout[0].shape)))
            )
        block(torch.randn(3, 16, 4, 4, requires_grad=True)).sum().backward()
        assert sorted(seen) == sorted(
            [("spatial", (3, 2, 16, 4, 4)), ("channel", (3, 2, 16)), ("spatial.conv_3x3.0", (3, 32, 4, 4)),
             ("spatial.relu", (3, 32, 4, 4))]
        )

    def test_a_hook_does_not_change_the_computation(self, monkeypatch):
        # one path: the same convolutions run, and the same bits come out, with or without hooks
        block = randomize(MultiHeadAttentionBlock(16, 2, channel_reduction=4), seed=4).train()
        x = torch.randn(4, 16, 5, 5)
        counts = []
        real_conv2d = F.conv2d

        def spy(*args, **kwargs):
            counts[-1] += 1
            return real_conv2d(*args, **kwargs)

        monkeypatch.setattr(F, "conv2d", spy)
        counts.append(0)
        plain = block(x)
        handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
        try:
            counts.append(0)
            hooked = block(x)
        finally:
            handle.remove()
        assert counts[0] == counts[1] == 1 + 2 * 3
        assert torch.equal(plain, hooked)


# ============================================================================ errors that name the problem


class TestConstructorErrors:
    @pytest.mark.parametrize(
        "kernel_sizes,match",
        [
            ((3, 3), r"kernel_sizes: expected a sequence of \(height, width\) pairs.*got \(3, 3\)"),
            ([3], r"kernel_sizes: expected a sequence of \(height, width\) pairs"),
            (((3, 3, 3),), r"element \(3, 3, 3\) is not a \(height, width\) pair"),
            ("33", r"kernel_sizes: expected a sequence of \(height, width\) pairs.*got '33'"),
            (((3.9, 3),), r"kernel_sizes: expected integer sizes, got \(3.9, 3\)"),
            (((3, 3.0),), r"kernel_sizes: expected integer sizes, got \(3, 3.0\)"),
            (((True, 3),), r"kernel_sizes: expected integer sizes"),
            (3, r"kernel_sizes: expected a sequence"),
        ],
    )
    def test_kernel_sizes(self, kernel_sizes, match):
        for build in (
            lambda: SpatialAttention(8, kernel_sizes=kernel_sizes),
            lambda: MultiHeadAttentionBlock(32, 2, kernel_sizes=kernel_sizes),
        ):
            with pytest.raises(ValueError, match=match):
                build()

    def test_integer_like_kernel_sizes_are_accepted(self):
        import numpy as np

        sa = SpatialAttention(8, kernel_sizes=[np.array([3, 1]), (np.int64(1), 3)])
        assert sa.kernel_sizes == ((3, 1), (1, 3)) and all(type(k) is int for s in sa.kernel_sizes for k in s)

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"channel_reduction": 32}, r"channel_reduction: expected at most in_channels \(16\).*got 32"),
            ({"spatial_reduction": 0}, r"spatial_reduction: expected a positive int, got 0"),
            ({"spatial_reduction": 17}, r"spatial_reduction: expected at most in_channels \(16\).*got 17"),
            ({"channel_reduction": 2.0}, r"channel_reduction: expected a positive int, got 2.0"),
        ],
    )
    def test_block_names_its_own_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            MultiHeadAttentionBlock(16, 4, **kwargs)
