"""Tests of deployment re-parameterization (BatchNorm folding, merged spatial branches)."""

from __future__ import annotations

import copy

import pytest
import torch
from module_helpers import randomize
from torch import nn

from dan_layers import (
    AttentionFusion,
    ChannelAttention,
    DANHead,
    MultiHeadAttentionBlock,
    SpatialAttention,
    can_reparameterize,
    reparameterize_model,
)


def conv_macs(module: nn.Module, x: torch.Tensor, *, branches_only: bool) -> int:
    """Multiply-accumulates of every Conv2d run by ``module(x)``: weight numel x output H x W."""
    total = 0

    def hook(conv, _inputs, output):
        nonlocal total
        if branches_only and conv.kernel_size == (1, 1):
            return
        total += conv.weight.numel() * output.shape[-2] * output.shape[-1]

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return total


BLOCK_CONFIGS = [
    pytest.param(32, 4, ((3, 3), (1, 3), (3, 1)), 7, 7, id="dan-like"),
    pytest.param(35, 1, ((3, 3), (1, 3), (3, 1)), 5, 6, id="K1-oddC"),
    pytest.param(21, 2, ((5, 5), (1, 3)), 4, 7, id="K2-custom"),
    pytest.param(16, 3, ((1, 5), (3, 1)), 6, 5, id="K3-rect"),
]


class TestReparameterize:
    @pytest.mark.parametrize("channels,heads,kernels,height,width", BLOCK_CONFIGS)
    def test_block_equals_train_graph_in_eval(self, channels, heads, kernels, height, width):
        block = randomize(
            MultiHeadAttentionBlock(channels, heads, channel_reduction=4, kernel_sizes=kernels), seed=heads
        )
        block.eval()
        x = torch.randn(3, channels, height, width)
        before, maps_before = block(x, return_attention=True)
        assert not block.is_reparameterized
        assert block.reparameterize() is block
        assert block.is_reparameterized
        after, maps_after = block(x, return_attention=True)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps_after, maps_before, rtol=1e-5, atol=1e-5)
        # every BatchNorm is gone and the branches are one convolution
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in block.modules())
        convs = [m for m in block.spatial.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 2
        kh, kw = max(k[0] for k in kernels), max(k[1] for k in kernels)
        assert block.spatial.conv_fused.kernel_size == (kh, kw)
        assert block.spatial.conv_fused.groups == heads

    def test_float64_is_exact(self):
        block = randomize(
            MultiHeadAttentionBlock(24, 4, channel_reduction=4, dtype=torch.float64), seed=1
        ).eval()
        x = torch.randn(2, 24, 7, 7, dtype=torch.float64)
        before = block(x)
        after = block.reparameterize()(x)
        torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-12)

    def test_units_on_their_own(self):
        sa = randomize(SpatialAttention(12, kernel_sizes=((5, 5), (1, 3), (3, 1))), seed=2).eval()
        ca = randomize(ChannelAttention(12, reduction=3), seed=3).eval()
        x = torch.randn(2, 12, 6, 5)
        sa_before, ca_before = sa(x, return_attention=True), ca(x, return_attention=True)
        sa.reparameterize()
        ca.reparameterize()
        assert sa.is_reparameterized and ca.is_reparameterized
        for a, b in zip(sa(x, return_attention=True), sa_before, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for a, b in zip(ca(x, return_attention=True), ca_before, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def test_idempotent(self):
        block = randomize(MultiHeadAttentionBlock(16, 2, channel_reduction=4), seed=4).eval()
        x = torch.randn(2, 16, 5, 5)
        block.reparameterize()
        state = copy.deepcopy(block.state_dict())
        once = block(x)
        block.reparameterize()
        reparameterize_model(block)
        assert block.state_dict().keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(block.state_dict()[key], value), key
        torch.testing.assert_close(block(x), once, rtol=0, atol=0)

    def test_train_mode_raises(self):
        for module in (
            MultiHeadAttentionBlock(16, 2, channel_reduction=4),
            SpatialAttention(16),
            ChannelAttention(16, reduction=4),
        ):
            module.train()
            with pytest.raises(RuntimeError, match="eval"):
                module.reparameterize()
            assert not module.is_reparameterized
        with pytest.raises(RuntimeError, match=r"eval\(\)"):
            reparameterize_model(MultiHeadAttentionBlock(16, 2, channel_reduction=4).train())
        # the model's own flag counts too, even when every unit inside is in eval mode
        model = nn.Sequential(MultiHeadAttentionBlock(16, 2, channel_reduction=4).eval())
        model.training = True
        with pytest.raises(RuntimeError, match=r"Sequential is in train mode; call \.eval\(\)"):
            reparameterize_model(model, inplace=True)
        assert not model[0].is_reparameterized and not can_reparameterize(model)
        # a unit left in train mode inside an eval model is caught before anything is modified
        model = nn.Sequential(MultiHeadAttentionBlock(16, 2, channel_reduction=4), SpatialAttention(16)).eval()
        model[1].train()
        with pytest.raises(RuntimeError, match="SpatialAttention at '1' is in train mode"):
            reparameterize_model(model, inplace=True)
        assert not model[0].is_reparameterized

    def test_reparameterize_model_on_sequential(self):
        model = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            MultiHeadAttentionBlock(16, 2, channel_reduction=4),
            nn.Flatten(),
        )
        randomize(model, seed=5).eval()
        x = torch.randn(2, 8, 6, 6)
        before = model(x)
        assert reparameterize_model(model, inplace=True) is model
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
        assert model[2].is_reparameterized
        assert isinstance(model[1], nn.BatchNorm2d)  # other modules are left alone

    def test_reparameterize_model_reaches_nested_units(self):
        outer = nn.ModuleDict(
            {
                "sa": SpatialAttention(8),
                "inner": nn.Sequential(ChannelAttention(8, reduction=2), AttentionFusion(8, 3)),
            }
        )
        fast = reparameterize_model(outer.eval())
        assert fast["sa"].is_reparameterized and fast["inner"][0].is_reparameterized
        assert not outer["sa"].is_reparameterized and not outer["inner"][0].is_reparameterized

    @pytest.mark.parametrize("channels,heads", [(32, 4), (16, 1)])
    def test_mac_count_branches_nine_fifteenths(self, channels, heads):
        block = MultiHeadAttentionBlock(channels, heads).eval()
        x = torch.randn(1, channels, 7, 7)
        branches_before = conv_macs(block, x, branches_only=True)
        all_before = conv_macs(block, x, branches_only=False)
        block.reparameterize()
        branches_after = conv_macs(block, x, branches_only=True)
        all_after = conv_macs(block, x, branches_only=False)
        assert branches_after * 15 == branches_before * 9  # (3x3) vs (3x3 + 1x3 + 3x1): 40% fewer
        # the 1x1 convolution (C x C/2) is unchanged: 16 -> 10 units of C*C/2 per pixel
        assert all_after * 16 == all_before * 10
        hidden = channels // 2
        assert branches_before == heads * hidden * channels * 15 * 49

    def test_split_heads_of_reparameterized_block(self):
        block = randomize(MultiHeadAttentionBlock(16, 3, channel_reduction=4), seed=6).eval().reparameterize()
        spatial, channel = block.split_heads()
        assert all(m.is_reparameterized and not m.training for m in spatial + channel)
        x = torch.randn(2, 16, 5, 5)
        expected = torch.stack([ca(sa(x)) for sa, ca in zip(spatial, channel, strict=True)], dim=1)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-6)
        fresh = MultiHeadAttentionBlock(16, 3, channel_reduction=4).eval().reparameterize()
        fresh.load_from_heads(spatial, channel)
        torch.testing.assert_close(fresh(x), block(x), rtol=0, atol=0)

    def test_reparameterized_state_dict_roundtrip(self):
        block = randomize(MultiHeadAttentionBlock(16, 2, channel_reduction=4), seed=7).eval().reparameterize()
        fresh = MultiHeadAttentionBlock(16, 2, channel_reduction=4).eval().reparameterize()
        fresh.load_state_dict(block.state_dict())
        x = torch.randn(2, 16, 4, 4)
        torch.testing.assert_close(fresh(x), block(x), rtol=0, atol=0)

    def test_gradcheck_reparameterized_float64(self):
        block = MultiHeadAttentionBlock(8, 2, channel_reduction=4, dtype=torch.float64)
        block = randomize(block, seed=8).eval().reparameterize()
        x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: block(t), (x,), fast_mode=True)


# ============================================================================ reparameterize_model, timm-style


class UserRepBlock(nn.Module):
    """A block of someone else's library with the timm / MobileOne convention: ``reparameterize()``
    merges its two parallel convolutions into one (eval only) and is idempotent."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 1)
        self.fused: nn.Conv2d | None = None
        self.calls = 0

    def forward(self, x):
        if self.fused is not None:
            return self.fused(x)
        return self.a(x) + self.b(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        self.calls += 1
        if self.fused is not None:
            return
        fused = copy.deepcopy(self.a)
        fused.weight.add_(torch.nn.functional.pad(self.b.weight, (1, 1, 1, 1)))
        fused.bias.add_(self.b.bias)
        self.fused = fused
        del self.a, self.b


class VAEStyle(nn.Module):
    """``reparameterize`` of a variational autoencoder: the sampling trick, with arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def reparameterize(self, mu, logvar):  # pragma: no cover - must never be called here
        raise AssertionError("reparameterize_model called a reparameterize that takes arguments")

    def forward(self, x):
        return self.proj(x)


def mixed_model(channels: int = 8) -> nn.Sequential:
    model = nn.Sequential(UserRepBlock(channels), DANHead(channels, 3, num_heads=2, channel_reduction=2))
    randomize(model, seed=11)
    return model.eval()


class TestReparameterizeModel:
    def test_copies_by_default_and_leaves_the_model_as_it_was(self):
        model = mixed_model()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.randn(2, 8, 5, 5)
        before = model(x)
        fast = reparameterize_model(model)
        assert fast is not model
        assert fast[1].attention.is_reparameterized and fast[0].fused is not None
        assert not model[1].attention.is_reparameterized and model[0].fused is None and model[0].calls == 0
        # the training form is intact: same keys and values, loads into a fresh model, same output
        assert model.state_dict().keys() == state.keys()
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
        fresh = mixed_model()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(x), before, rtol=0, atol=0)
        torch.testing.assert_close(fast(x).logits, before.logits, rtol=1e-5, atol=1e-5)
        # and the model can go on training
        model.train()(torch.randn(4, 8, 5, 5))

    def test_inplace_changes_and_returns_the_model(self):
        model = mixed_model()
        x = torch.randn(2, 8, 5, 5)
        before = model(x)
        assert reparameterize_model(model, inplace=True) is model
        assert model[1].attention.is_reparameterized and model[0].fused is not None
        torch.testing.assert_close(model(x).logits, before.logits, rtol=1e-5, atol=1e-5)

    def test_inplace_is_keyword_only(self):
        with pytest.raises(TypeError):
            reparameterize_model(mixed_model(), True)  # type: ignore[misc]

    def test_calls_any_modules_reparameterize_once_parents_first(self):
        order = []

        class Outer(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = UserRepBlock(4)

            def reparameterize(self):
                order.append(("outer", self.inner.fused is None))

            def forward(self, x):
                return self.inner(x)

        model = nn.Sequential(Outer(), VAEStyle().eval()).eval()
        fast = reparameterize_model(model)
        assert order == [("outer", True)]  # the parent first, while its child is still unfolded
        assert fast[0].inner.calls == 1 and fast[0].inner.fused is not None

    def test_vae_style_reparameterize_with_arguments_is_left_alone(self):
        model = nn.Sequential(VAEStyle(), MultiHeadAttentionBlock(8, 2, channel_reduction=2)).eval()
        fast = reparameterize_model(model)
        assert fast[1].is_reparameterized

    def test_every_unit_of_ours_is_checked_before_anything_changes(self):
        # the user's block comes first and would be folded first; a GroupNorm in the last unit
        # must stop everything before it, in place as well as on a copy
        model = mixed_model()
        model.append(SpatialAttention(8))
        model[2].conv_1x3[1] = nn.GroupNorm(1, 8)
        model.eval()
        for inplace in (False, True):
            with pytest.raises(ValueError, match=r"SpatialAttention at '2' cannot be re-parameterized: "
                                                 r"cannot fold conv_1x3\[1\] \(GroupNorm\)"):
                reparameterize_model(model, inplace=inplace)
            assert model[0].calls == 0 and model[0].fused is None
            assert not model[1].attention.spatial.is_reparameterized
            assert not model[1].attention.channel.is_reparameterized
        assert not can_reparameterize(model)

    def test_can_reparameterize(self):
        model = mixed_model()
        assert can_reparameterize(model)
        assert not can_reparameterize(model.train())
        model.eval()
        model[1].attention.channel.attention[1] = nn.LayerNorm(4)
        assert not can_reparameterize(model)
        assert can_reparameterize(nn.Linear(2, 2).eval())  # nothing of ours: nothing stands in the way
        folded = reparameterize_model(mixed_model())
        assert can_reparameterize(folded)  # units already folded count as foldable
        assert can_reparameterize(reparameterize_model(folded)) and folded[1].attention.is_reparameterized

    def test_cannot_deepcopy_then_inplace_works(self):
        model = mixed_model()
        model.register_buffer("not_a_leaf", torch.ones(1, requires_grad=True) * 2, persistent=False)
        with pytest.raises(RuntimeError, match="cannot deep-copy the model.*pass inplace=True"):
            reparameterize_model(model)
        assert reparameterize_model(model, inplace=True)[1].attention.is_reparameterized
