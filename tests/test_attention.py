"""Tests of the attention units: SpatialAttention, ChannelAttention, MultiHeadAttentionBlock.

The reference for checkpoint compatibility is a plain re-implementation, written here,
of the authors' per-head ``CrossAttentionHead`` (``sa`` + ``ca``, nn.Sequential
convolutions carrying their state-dict key names), looped over heads and stacked.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dan_layers import AttentionFusion, ChannelAttention, MultiHeadAttentionBlock, SpatialAttention
from dan_layers.attention import _CHANNELS_LAST_MIN_PIXELS

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


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights, biases and BatchNorm running statistics (so eval-mode BN is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.dtype == torch.long:
            continue
        rand = torch.rand(tensor.shape, generator=g, dtype=torch.float64)
        if name.endswith("running_var"):
            value = 0.5 + rand
        elif name.endswith("weight") and tensor.ndim == 1:  # BatchNorm scale
            value = 0.5 + rand
        else:
            value = (rand - 0.5) * (1.0 if tensor.ndim <= 1 else 2.0 / max(tensor[0].numel(), 1) ** 0.5)
        tensor.copy_(value.to(tensor.dtype))
    return module


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

    @pytest.mark.parametrize(
        "num_heads,kernels,bn_kwargs,mode,batch",
        [
            (1, ((3, 3), (1, 3), (3, 1)), {}, "train", 4),
            (3, ((3, 3), (1, 3), (3, 1)), {}, "train", 4),
            (3, ((3, 3), (1, 3), (3, 1)), {}, "train", 48),  # channels-last (48 x 5 x 6 pixels)
            (2, ((5, 3), (1, 1)), {"momentum": None}, "train", 48),
            (2, ((3, 3),), {"track_running_stats": False}, "train", 4),
            (3, ((3, 3), (1, 3), (3, 1)), {}, "eval", 4),
            (3, ((3, 3), (1, 3), (3, 1)), {}, "reparameterized", 4),
        ],
    )
    def test_cpu_path_equals_grouped_path(self, monkeypatch, num_heads, kernels, bn_kwargs, mode, batch):
        # on CPU the heads run apart (dense convs on chunks of the grouped weights, channels-last when
        # training on large batches); everything that path computes and updates must be what the
        # grouped convs do
        def build():
            sa = SpatialAttention(12, num_heads=num_heads, kernel_sizes=kernels, dtype=torch.float64)
            for name, module in list(sa.named_modules()):
                if isinstance(module, nn.BatchNorm2d) and bn_kwargs:
                    parent, _, child = name.rpartition(".")
                    bn = nn.BatchNorm2d(module.num_features, dtype=torch.float64, **bn_kwargs)
                    setattr(sa.get_submodule(parent), child, bn)
            sa = randomize(sa, seed=num_heads).train(mode == "train")
            return sa.reparameterize() if mode == "reparameterized" else sa

        apart, grouped = build(), build()
        grouped.load_state_dict(apart.state_dict())
        assert apart._runs_heads_apart(torch.zeros(1))
        monkeypatch.setattr(grouped, "_runs_heads_apart", lambda x: False)
        x = torch.randn(batch, 12, 5, 6, dtype=torch.float64)
        results = []
        for sa in (apart, grouped):
            xx = x.clone().requires_grad_(True)
            for _ in range(2):  # two steps: the running statistics and batch counts accumulate
                out, maps = sa(xx, return_attention=True)
            weights = torch.randn_like(out, generator=torch.Generator().manual_seed(0))
            (out * weights).sum().backward()
            results.append((out, maps, xx.grad, {n: p.grad for n, p in sa.named_parameters()}))
        (out_a, maps_a, gx_a, grads_a), (out_g, maps_g, gx_g, grads_g) = results
        torch.testing.assert_close(out_a, out_g, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(maps_a, maps_g, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gx_a, gx_g, rtol=1e-10, atol=1e-10)
        assert grads_a.keys() == grads_g.keys() and all(g is not None for g in grads_a.values())
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_g[name], rtol=1e-9, atol=1e-9, msg=name)
        buffers_g = dict(grouped.named_buffers())
        assert dict(apart.named_buffers()).keys() == buffers_g.keys()
        for name, buf in apart.named_buffers():
            torch.testing.assert_close(buf, buffers_g[name], rtol=1e-12, atol=1e-12, msg=name)

    @pytest.mark.parametrize(
        "train,num_heads,batch,channels_last",
        [(True, 2, 64, True), (True, 1, 64, True), (True, 2, 8, False), (False, 2, 64, False)],
    )
    def test_cpu_path_convolutions(self, monkeypatch, train, num_heads, batch, channels_last):
        # where the CPU path's speed comes from: one dense conv per head and branch, channels-last
        # when training on at least _CHANNELS_LAST_MIN_PIXELS pixels (64 x 5 x 5 is above, 8 x 5 x 5 below)
        assert 8 * 25 < _CHANNELS_LAST_MIN_PIXELS <= 64 * 25
        seen = []
        real_conv2d = F.conv2d

        def spy(x, weight, *args, **kwargs):
            seen.append((x.is_contiguous(memory_format=torch.channels_last), weight.shape[0]))
            return real_conv2d(x, weight, *args, **kwargs)

        monkeypatch.setattr(F, "conv2d", spy)
        SpatialAttention(16, num_heads=num_heads).train(train)(torch.randn(batch, 16, 5, 5))
        assert len(seen) == num_heads * 4
        assert {layout for layout, _ in seen} == {channels_last}
        assert {out for _, out in seen} == {8, 16}  # one head's width: C/2 for the 1x1, C for the branches

    @pytest.mark.parametrize("hook", ["module", "global"])
    def test_hooks_see_the_convolutions(self, hook):
        # FLOP counters and feature extractors hook the conv modules: then the modules must run
        sa = randomize(SpatialAttention(16, num_heads=2), seed=3).eval()
        x = torch.randn(2, 16, 5, 5)
        plain = sa(x)
        calls = []

        def record(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                calls.append(module)

        if hook == "module":
            handles = [m.register_forward_hook(record) for m in sa.modules() if isinstance(m, nn.Conv2d)]
        else:
            handles = [torch.nn.modules.module.register_module_forward_hook(record)]
        try:
            torch.testing.assert_close(sa(x), plain, rtol=1e-5, atol=1e-6)
        finally:
            for h in handles:
                h.remove()
        assert len(calls) == 4
        assert sa._runs_heads_apart(x)  # and back to the fast path once the hooks are gone

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
            for original, copy in zip(originals, copies, strict=True):
                state = copy.state_dict()
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
