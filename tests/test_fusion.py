"""Tests of AttentionFusion, and of a DAN-like pipeline (block -> fusion -> losses) under autocast."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from dan_layers import AffinityLoss, AttentionFusion, MultiHeadAttentionBlock, PartitionLoss


def randomize_bn(fusion: AttentionFusion, seed: int = 0) -> AttentionFusion:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn = fusion.bn
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return fusion


class TestAttentionFusion:
    def test_smoke(self, device, dtype):
        fusion = AttentionFusion(16, 7, device=device, dtype=dtype)
        heads = torch.randn(3, 4, 16, device=device, dtype=dtype)
        logits, scaled = fusion(heads)
        assert logits.shape == (3, 7) and scaled.shape == (3, 4, 16)
        assert logits.dtype == scaled.dtype == dtype

    @pytest.mark.parametrize("num_heads", [1, 2, 4])
    def test_cardinality(self, num_heads):
        logits, scaled = AttentionFusion(8, 3).eval()(torch.randn(1, num_heads, 8))
        assert logits.shape == (1, 3) and scaled.shape == (1, num_heads, 8)

    @pytest.mark.parametrize("train", [True, False])
    def test_feature_log_softmax_sum_fc_bn(self, train):
        fusion = randomize_bn(AttentionFusion(6, 5), seed=1).train(train)
        heads = torch.randn(4, 3, 6)
        logits, scaled = fusion(heads)
        expected_scaled = F.log_softmax(heads, dim=1)
        torch.testing.assert_close(scaled, expected_scaled)
        torch.testing.assert_close(scaled.exp().sum(dim=1), torch.ones(4, 6))
        pre = expected_scaled.sum(dim=1) @ fusion.fc.weight.t() + fusion.fc.bias
        if train:
            mean, var = pre.mean(dim=0), pre.var(dim=0, unbiased=False)
        else:
            mean, var = fusion.bn.running_mean, fusion.bn.running_var
        expected_logits = (pre - mean) / torch.sqrt(var + fusion.bn.eps) * fusion.bn.weight + fusion.bn.bias
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)

    def test_single_head_is_not_scaled(self):
        fusion = AttentionFusion(6, 5).eval()
        heads = torch.randn(4, 1, 6)
        logits, scaled = fusion(heads)
        torch.testing.assert_close(scaled, heads, rtol=0, atol=0)
        torch.testing.assert_close(logits, fusion.bn(fusion.fc(heads[:, 0])))

    def test_authors_key_names(self):
        assert set(AttentionFusion(8, 7).state_dict()) == {
            "fc.weight",
            "fc.bias",
            "bn.weight",
            "bn.bias",
            "bn.running_mean",
            "bn.running_var",
            "bn.num_batches_tracked",
        }

    def test_gradcheck_eval_float64(self):
        fusion = randomize_bn(AttentionFusion(5, 3, dtype=torch.float64).double(), seed=2).eval()
        heads = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda h: fusion(h), (heads,), fast_mode=True)

    def test_state_dict_roundtrip(self):
        fusion = randomize_bn(AttentionFusion(8, 4), seed=3).eval()
        buf = io.BytesIO()
        torch.save(fusion.state_dict(), buf)
        buf.seek(0)
        fresh = AttentionFusion(8, 4)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        fresh.eval()
        heads = torch.randn(2, 3, 8)
        for a, b in zip(fresh(heads), fusion(heads), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_exceptions(self):
        fusion = AttentionFusion(8, 4)
        with pytest.raises(ValueError, match=r"expected.*\(B, K, C\).*got shape \(2, 8\)"):
            fusion(torch.randn(2, 8))
        with pytest.raises(ValueError, match="expected in_channels = 8.*got 6"):
            fusion(torch.randn(2, 3, 6))
        with pytest.raises(
            ValueError, match="AttentionFusion.*BatchNorm.*expected a batch of at least 2, got 1"
        ):
            fusion.train()(torch.randn(1, 3, 8))
        assert fusion.eval()(torch.randn(1, 3, 8))[0].shape == (1, 4)
        with pytest.raises(ValueError, match="expected a positive int, got 0"):
            AttentionFusion(0, 4)
        with pytest.raises(ValueError, match="expected a positive int, got 0"):
            AttentionFusion(8, 0)

    def test_validate_false_skips_the_checks(self):
        fusion = AttentionFusion(8, 4, validate=False).train()
        with pytest.raises(Exception) as info:
            fusion(torch.randn(1, 3, 8))
        assert "expected a batch of at least 2" not in str(info.value)

    def test_mismatched_devices(self):
        with pytest.raises(ValueError, match="expected.*got"):
            AttentionFusion(8, 4).eval()(torch.randn(2, 3, 8, device="meta"))


class DanLikeHead(torch.nn.Module):
    """Feature map -> MAN block -> AFN fusion, with the affinity loss on the map."""

    def __init__(self, channels=32, heads=4, classes=7, dtype=None):
        super().__init__()
        self.block = MultiHeadAttentionBlock(channels, heads, dtype=dtype)
        self.fusion = AttentionFusion(channels, classes, dtype=dtype)
        self.affinity = AffinityLoss(classes, channels, dtype=dtype)
        self.partition = PartitionLoss()

    def forward(self, fmap, labels):
        logits, scaled = self.fusion(self.block(fmap))
        return (
            F.cross_entropy(logits, labels),
            self.affinity(fmap, labels),
            self.partition(scaled),
        )


class TestPipeline:
    @pytest.mark.parametrize("train", [True, False])
    def test_autocast_bfloat16_cpu(self, train):
        model = DanLikeHead().train(train)
        fmap = torch.randn(6, 32, 7, 7)
        labels = torch.tensor([0, 1, 2, 3, 4, 6])
        reference = model(fmap, labels)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(fmap, labels)
        model.load_state_dict(state)
        for value in mixed[1:]:
            assert value.dtype == torch.float32  # the losses compute in float32
            assert torch.isfinite(value)
        # affinity sees float32 features: identical; the others went through bf16 layers
        torch.testing.assert_close(mixed[1], reference[1])
        torch.testing.assert_close(mixed[0].float(), reference[0], rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(mixed[2], reference[2], rtol=1e-2, atol=1e-3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total = sum(v.float() for v in model(fmap, labels))
        total.backward()
        assert model.affinity.centers.grad is not None
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

    def test_losses_under_autocast_with_bf16_inputs(self):
        features = torch.randn(4, 8)
        labels = torch.tensor([0, 1, 2, 1])
        loss = AffinityLoss(3, 8)
        reference = loss(features, labels)
        heads = torch.randn(4, 3, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = loss(features.bfloat16(), labels)
            part = PartitionLoss()(heads.bfloat16())
        assert got.dtype == torch.float32 and part.dtype == torch.float32
        torch.testing.assert_close(got, reference, rtol=2e-2, atol=1e-2)
        torch.testing.assert_close(part, PartitionLoss()(heads), rtol=2e-2, atol=1e-2)

    def test_float64_pipeline(self):
        model = DanLikeHead(dtype=torch.float64)
        fmap = torch.randn(4, 32, 7, 7, dtype=torch.float64)
        values = model(fmap, torch.tensor([0, 1, 2, 3]))
        assert all(v.dtype == torch.float64 for v in values)
        sum(values).backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in model.parameters())
