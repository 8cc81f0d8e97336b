"""Tests of the composites: DANHead (MAN + AFN on any feature map) and DANLoss (CE + affinity + partition).

The references are the building blocks themselves, composed by hand: DANHead must be
exactly ``AttentionFusion(MultiHeadAttentionBlock(x))`` and DANLoss exactly
``cross_entropy + lambda_af * AffinityLoss + lambda_pt * PartitionLoss``. The last class
puts DANHead on a backbone nobody in this project wrote (``efficientnet_pytorch``, a
pure-torch package from PyPI, in the test extra) and trains, compiles,
re-parameterizes and exports it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dan_layers import (
    AffinityLoss,
    AttentionFusion,
    CenterLoss,
    DANHead,
    DANHeadOutput,
    DANLoss,
    DANLossOutput,
    MultiHeadAttentionBlock,
    PartitionLoss,
    reparameterize_model,
)


@torch.no_grad()
def calibrate(module: nn.Module, *inputs: torch.Tensor) -> nn.Module:
    """Non-trivial BatchNorm running statistics: a few train-mode passes, then eval."""
    module.train()
    for _ in range(3):
        module(*inputs)
    return module.eval()


class TestDANHead:
    @pytest.mark.parametrize(
        "channels,classes,heads_,height,width", [(32, 7, 4, 7, 7), (24, 3, 1, 5, 6), (40, 8, 3, 2, 3)]
    )
    @pytest.mark.parametrize("train", [True, False])
    def test_equals_block_then_fusion(self, channels, classes, heads_, height, width, train):
        head = DANHead(channels, classes, num_heads=heads_, channel_reduction=4).train(train)
        block = MultiHeadAttentionBlock(channels, heads_, channel_reduction=4).train(train)
        fusion = AttentionFusion(channels, classes).train(train)
        block.load_state_dict(head.attention.state_dict())
        fusion.load_state_dict(head.fusion.state_dict())
        x = torch.randn(4, channels, height, width)
        out = head(x)
        assert isinstance(out, DANHeadOutput) and out._fields == ("logits", "heads")
        expected_logits, expected_heads = fusion(block(x))
        torch.testing.assert_close(out.logits, expected_logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.heads, expected_heads, rtol=1e-6, atol=1e-6)
        assert out.logits.shape == (4, classes) and out.heads.shape == (4, heads_, channels)

    def test_return_attention(self):
        head = calibrate(DANHead(16, 5, num_heads=3, channel_reduction=4), torch.randn(4, 16, 5, 5))
        x = torch.randn(2, 16, 5, 5)
        (logits, heads), maps = head(x, return_attention=True)
        assert maps.shape == (2, 3, 5, 5) and (maps >= 0).all()
        _, expected_maps = head.attention(x, return_attention=True)
        torch.testing.assert_close(maps, expected_maps)
        torch.testing.assert_close(logits, head(x).logits)

    def test_state_dict_keys_are_attention_and_fusion(self):
        keys = set(DANHead(16, 3, num_heads=2, channel_reduction=4).state_dict())
        assert {k.split(".")[0] for k in keys} == {"attention", "fusion"}
        assert "fusion.fc.weight" in keys and "attention.spatial.conv_3x3.0.weight" in keys

    def test_reparameterize_model(self):
        head = calibrate(DANHead(16, 5, num_heads=2, channel_reduction=4), torch.randn(6, 16, 4, 4))
        x = torch.randn(3, 16, 4, 4)
        expected = head(x)
        fast = reparameterize_model(head)
        assert fast.attention.is_reparameterized and not head.attention.is_reparameterized
        got = fast(x)
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.heads, expected.heads, rtol=1e-4, atol=1e-5)
        assert reparameterize_model(head, inplace=True) is head and head.attention.is_reparameterized
        torch.testing.assert_close(head(x).logits, got.logits, rtol=0, atol=0)

    def test_gradcheck_eval_float64(self):
        head = DANHead(8, 3, num_heads=2, channel_reduction=4, dtype=torch.float64)
        calibrate(head, torch.randn(6, 8, 3, 3, dtype=torch.float64))
        x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: tuple(head(t)), (x,), fast_mode=True)

    @pytest.mark.parametrize("train", [True, False])
    def test_compile_fullgraph_equals_eager(self, train):
        torch.compiler.reset()
        head = DANHead(16, 4, num_heads=2, channel_reduction=4).train(train)
        x = torch.randn(3, 16, 5, 5)
        state = copy.deepcopy(head.state_dict())
        eager = head(x)
        head.load_state_dict(state)
        compiled = torch.compile(head, fullgraph=True, backend="eager")(x)
        for c, e in zip(compiled, eager, strict=True):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)

    def test_export_dynamic_batch(self):
        head = calibrate(DANHead(16, 4, num_heads=2, channel_reduction=4), torch.randn(6, 16, 5, 5))
        batch = torch.export.Dim("batch", min=1, max=512)
        program = torch.export.export(head, (torch.randn(2, 16, 5, 5),), dynamic_shapes=({0: batch},))
        for n in (1, 9):
            x = torch.randn(n, 16, 5, 5)
            for got, want in zip(program.module()(x), head(x), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    def test_exceptions(self):
        with pytest.raises(ValueError, match="num_classes: expected a positive int, got 0"):
            DANHead(16, 0)
        with pytest.raises(ValueError, match="channel_reduction: expected at most in_channels"):
            DANHead(8, 3)
        head = DANHead(16, 3, channel_reduction=4)
        with pytest.raises(ValueError, match="expected in_channels = 16.*got 8"):
            head(torch.randn(2, 8, 4, 4))


class TestDANLoss:
    def inputs(self, seed=0, batch=6, classes=5, channels=16, heads_=3):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(batch, classes, generator=g, requires_grad=True)
        fmap = torch.randn(batch, channels, 4, 4, generator=g, requires_grad=True)
        heads = torch.randn(batch, heads_, channels, generator=g, requires_grad=True)
        labels = torch.randint(0, classes, (batch,), generator=g)
        return logits, fmap, heads, labels

    @pytest.mark.parametrize(
        "affinity,partition,normalize",
        [("affinity", "paper", False), ("center", "official", False), ("none", "paper", True),
         ("affinity", "none", False)],
    )
    def test_equals_the_parts_composed_by_hand(self, affinity, partition, normalize):
        criterion = DANLoss(
            5, 16, affinity=affinity, partition=partition, normalize=normalize, lambda_af=0.5, lambda_pt=2.0,
            label_smoothing=0.1,
        )
        logits, fmap, heads, labels = self.inputs()
        out = criterion(logits, fmap, heads, labels)
        assert isinstance(out, DANLossOutput) and out._fields == ("loss", "ce", "affinity", "partition")
        ce = F.cross_entropy(logits, labels, label_smoothing=0.1)
        if affinity == "none":
            af = torch.zeros(())
            assert criterion.affinity is None
        else:
            ref = AffinityLoss(5, 16) if affinity == "affinity" else CenterLoss(5, 16)
            ref.load_state_dict(criterion.affinity.state_dict())
            af = ref(fmap, labels)
        pt = torch.zeros(()) if partition == "none" else PartitionLoss(partition, normalize=normalize)(heads)
        torch.testing.assert_close(out.loss, ce + 0.5 * af + 2.0 * pt)
        for got, want in ((out.ce, ce), (out.affinity, af), (out.partition, pt)):
            torch.testing.assert_close(got, want.detach())
            assert not got.requires_grad  # the parts are for logging
        assert out.loss.requires_grad

    def test_gradients_reach_inputs_and_centres(self):
        criterion = DANLoss(5, 16)
        logits, fmap, heads, labels = self.inputs(1)
        criterion(logits, fmap, heads, labels).loss.backward()
        for t in (logits, fmap, heads, criterion.affinity.centers):
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
        assert [n for n, _ in criterion.named_parameters()] == ["affinity.centers"]

    def test_float32_under_bf16_autocast(self):
        criterion = DANLoss(5, 16)
        logits, fmap, heads, labels = self.inputs(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = criterion(logits.bfloat16(), fmap.bfloat16(), heads.bfloat16(), labels)
        assert all(t.dtype == torch.float32 for t in out)

    def test_authors_eight_centres(self):
        criterion = DANLoss(7, 16, num_centers=8)
        assert criterion.affinity.centers.shape == (8, 16)

    def test_compile_fullgraph_equals_eager(self):
        torch.compiler.reset()
        criterion = DANLoss(5, 16, normalize=True)
        args = self.inputs(3)
        compiled = torch.compile(criterion, fullgraph=True, backend="eager")
        for c, e in zip(compiled(*args), criterion(*args), strict=True):
            torch.testing.assert_close(c, e)

    def test_exceptions(self):
        with pytest.raises(ValueError, match="affinity: expected one of.*got 'centre'"):
            DANLoss(5, 16, affinity="centre")
        with pytest.raises(ValueError, match="partition: expected one of.*got 'Eq6'"):
            DANLoss(5, 16, partition="Eq6")
        with pytest.raises(ValueError, match="normalize: expected a partition term"):
            DANLoss(5, 16, partition="none", normalize=True)
        with pytest.raises(ValueError, match="num_centers: the center loss has one centre per class"):
            DANLoss(5, 16, affinity="center", num_centers=6)
        with pytest.raises(ValueError, match=r"label_smoothing: expected a value in \[0, 1\)"):
            DANLoss(5, 16, label_smoothing=1.5)
        criterion = DANLoss(5, 16)
        logits, fmap, heads, labels = self.inputs()
        with pytest.raises(ValueError, match="labels: expected values in \\[0, 5\\), got label 7"):
            criterion(logits, fmap, heads, torch.tensor([0, 1, 7, 2, 3, 4]))
        with pytest.raises(ValueError, match="logits: expected num_classes = 5.*got 4"):
            criterion(logits[:, :4], fmap, heads, labels)
        with pytest.raises(ValueError, match="labels: expected a torch.Tensor"):
            criterion(logits, fmap, heads, labels.tolist())


# ----------------------------------------------------------------------------- a backbone from PyPI


class EfficientNetDAN(nn.Module):
    """DAN's head on EfficientNet-B0 (lukemelas/EfficientNet-PyTorch, random weights, no download)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch", reason="in the test extra")
        self.backbone = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0")
        self.backbone._fc = nn.Identity()  # unused: we take the feature map
        self.head = DANHead(1280, num_classes, num_heads=2, spatial_reduction=8, channel_reduction=16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.backbone.extract_features(x)  # (B, 1280, H/32, W/32)
        logits, heads = self.head(fmap)
        return logits, fmap, heads


@pytest.mark.slow
class TestOnAnotherBackbone:
    def images(self, batch=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, 96, 96, generator=g), torch.arange(batch) % 5

    def test_trains(self):
        torch.manual_seed(0)
        model, criterion = EfficientNetDAN(), DANLoss(5, 1280, num_centers=None)
        optimizer = torch.optim.Adam([*model.parameters(), *criterion.parameters()], lr=1e-3)
        x, y = self.images()
        losses = []
        model.train()
        for _ in range(8):
            optimizer.zero_grad()
            out = criterion(*model(x), y)
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss.item())
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < losses[0]
        for name, p in model.head.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert criterion.affinity.centers.grad is not None

    def test_reparameterizes_compiles_and_exports(self):
        torch.manual_seed(1)
        model = EfficientNetDAN()
        x, _ = self.images(4, seed=1)
        calibrate(model, x)
        model.backbone.set_swish(memory_efficient=False)  # the package's export switch
        expected = model(x)
        deployed = reparameterize_model(copy.deepcopy(model))
        assert deployed.head.attention.is_reparameterized
        for got, want in zip(deployed(x), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.compiler.reset()
        compiled = torch.compile(deployed, backend="eager")
        for got, want in zip(compiled(x), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        batch = torch.export.Dim("batch", min=1, max=64)
        program = torch.export.export(deployed, (x,), dynamic_shapes=({0: batch},))
        for got, want in zip(program.module()(x[:3]), model(x[:3]), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
