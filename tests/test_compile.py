"""torch.compile(fullgraph=True) against eager for every module and loss, validation on.

The cheap tests use ``backend="eager"`` (Dynamo tracing only: catches graph breaks
without a C++ toolchain); one slow test runs the default inductor backend when a
C++ compiler is present.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import dan_layers.functional as DF
from dan_layers import (
    AffinityLoss,
    AttentionFusion,
    CenterLoss,
    ChannelAttention,
    MultiHeadAttentionBlock,
    PartitionLoss,
    SpatialAttention,
)

pytestmark = [
    pytest.mark.compile,
    pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile is not available"),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def assert_compiled_equals_eager(module, *inputs, backend="eager", rtol=1e-5, atol=1e-6, **kwargs):
    """Values and input/parameter gradients of torch.compile(fullgraph=True) equal eager ones."""
    params = [p for p in module.parameters() if p.requires_grad]
    float_inputs = [t for t in inputs if t.is_floating_point()]

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
        for p in params:
            p.grad = None
        state = {k: v.clone() for k, v in module.state_dict().items()}
        outs = _outputs(fn(*leaves, **kwargs))
        total = sum((o.float() * torch.linspace(0.5, 1.5, o.numel()).reshape(o.shape)).sum() for o in outs)
        grads = torch.autograd.grad(
            total, [t for t in leaves if t.is_floating_point()] + params, allow_unused=True
        )
        module.load_state_dict(state)  # undo running-stat updates so both runs see the same state
        return tuple(o.detach() for o in outs), grads

    eager_out, eager_grads = run(module)
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    comp_out, comp_grads = run(compiled)
    assert len(comp_out) == len(eager_out)
    for c, e in zip(comp_out, eager_out, strict=True):
        assert c.shape == e.shape and c.dtype == e.dtype
        torch.testing.assert_close(c, e, rtol=rtol, atol=atol)
    assert len(comp_grads) == len(float_inputs) + len(params)
    for c, e in zip(comp_grads, eager_grads, strict=True):
        if e is None:
            assert c is None
        else:
            torch.testing.assert_close(c, e, rtol=rtol, atol=atol)


class TestCompileLosses:
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_affinity(self, reduction):
        loss = AffinityLoss(7, 16, num_centers=8, reduction=reduction)
        assert_compiled_equals_eager(loss, torch.randn(6, 16), torch.tensor([0, 1, 6, 3, 3, 2]))

    def test_affinity_feature_map(self):
        loss = AffinityLoss(3, 8)
        assert_compiled_equals_eager(loss, torch.randn(4, 8, 3, 3), torch.tensor([0, 1, 2, 0]))

    @pytest.mark.parametrize("reduction", ["mean", "none"])
    def test_center(self, reduction):
        loss = CenterLoss(3, 8, reduction=reduction)
        assert_compiled_equals_eager(loss, torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))

    @pytest.mark.parametrize("variant", ["paper", "official"])
    @pytest.mark.parametrize("shape", [(4, 3, 8), (2, 1, 8), (2, 3, 4, 5)])
    def test_partition(self, variant, shape):
        assert_compiled_equals_eager(PartitionLoss(variant), torch.randn(*shape))

    def test_partition_single_head_compiled_is_tensor_zero(self):
        out = torch.compile(PartitionLoss(), fullgraph=True, backend="eager")(torch.randn(2, 1, 4))
        assert isinstance(out, torch.Tensor) and out.shape == () and out.item() == 0.0

    @pytest.mark.parametrize("cls", [AffinityLoss, CenterLoss])
    def test_label_check_is_a_device_assert_when_compiled(self, cls):
        loss = cls(3, 4)
        features = torch.randn(3, 4)
        bad = torch.tensor([0, 5, 1])
        with pytest.raises(ValueError, match="got label 5"):
            loss(features, bad)
        compiled = torch.compile(loss, fullgraph=True, backend="eager")
        torch.testing.assert_close(
            compiled(features, torch.tensor([0, 2, 1])), loss(features, torch.tensor([0, 2, 1]))
        )
        with pytest.raises(RuntimeError, match="labels"):
            compiled(features, bad)

    def test_shape_checks_still_raise_value_error_when_compiled(self):
        compiled = torch.compile(AffinityLoss(3, 4), fullgraph=True, backend="eager")
        with pytest.raises(Exception, match="expected.*got"):
            compiled(torch.randn(3, 5), torch.tensor([0, 1, 2]))

    def test_dynamic_batch_without_recompiling(self):
        patch = getattr(torch._dynamo.config, "patch", None)
        if patch is None or not hasattr(torch._dynamo.config, "error_on_recompile"):
            pytest.skip("torch._dynamo.config.error_on_recompile is not available")
        loss = AffinityLoss(3, 8)
        part = PartitionLoss()
        c_loss = torch.compile(loss, fullgraph=True, backend="eager", dynamic=True)
        c_part = torch.compile(part, fullgraph=True, backend="eager", dynamic=True)
        c_loss(torch.randn(2, 8), torch.tensor([0, 1]))
        c_part(torch.randn(2, 3, 8))
        with patch(error_on_recompile=True):
            for batch in (3, 5, 9):
                features, labels = torch.randn(batch, 8), torch.randint(0, 3, (batch,))
                torch.testing.assert_close(c_loss(features, labels), loss(features, labels))
                heads = torch.randn(batch, 3, 8)
                torch.testing.assert_close(c_part(heads), part(heads))


class TestCompileModules:
    @pytest.mark.parametrize("train", [True, False])
    @pytest.mark.parametrize("num_heads", [1, 3])
    def test_spatial(self, train, num_heads):
        sa = SpatialAttention(16, num_heads=num_heads).train(train)
        assert_compiled_equals_eager(sa, torch.randn(2, 16, 5, 6), return_attention=True)

    @pytest.mark.parametrize("train", [True, False])
    def test_channel(self, train):
        ca = ChannelAttention(32).train(train)
        assert_compiled_equals_eager(ca, torch.randn(3, 32, 4, 4), return_attention=True)
        assert_compiled_equals_eager(ChannelAttention(32, num_heads=2).train(train), torch.randn(3, 2, 32))

    @pytest.mark.parametrize("train", [True, False])
    def test_block(self, train):
        block = MultiHeadAttentionBlock(32, 4, kernel_sizes=((5, 5), (1, 3), (3, 1))).train(train)
        assert_compiled_equals_eager(block, torch.randn(3, 32, 7, 6), return_attention=True)

    def test_reparameterized_block(self):
        block = MultiHeadAttentionBlock(32, 4).eval().reparameterize()
        assert_compiled_equals_eager(block, torch.randn(2, 32, 7, 7))

    @pytest.mark.parametrize("train", [True, False])
    @pytest.mark.parametrize("num_heads", [1, 4])
    def test_fusion(self, train, num_heads):
        assert_compiled_equals_eager(AttentionFusion(16, 7).train(train), torch.randn(3, num_heads, 16))

    def test_block_batch_of_one_check_still_raises(self):
        compiled = torch.compile(
            MultiHeadAttentionBlock(16, 2, channel_reduction=4).train(), fullgraph=True, backend="eager"
        )
        with pytest.raises(Exception, match="expected a batch of at least 2, got 1"):
            compiled(torch.randn(1, 16, 3, 3))


class _DanHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = MultiHeadAttentionBlock(16, 2, channel_reduction=4)
        self.fusion = AttentionFusion(16, 3)
        self.affinity = AffinityLoss(3, 16)
        self.partition = PartitionLoss()

    def forward(self, fmap, labels):
        logits, scaled = self.fusion(self.block(fmap))
        return logits, self.affinity(fmap, labels) + self.partition(scaled)


def _has_cxx() -> bool:
    return any(shutil.which(name) for name in ("c++", "g++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_cxx(), reason="inductor needs a C++ compiler")
def test_inductor_matches_eager():
    model = _DanHead().train()
    assert_compiled_equals_eager(
        model, torch.randn(4, 16, 5, 5), torch.tensor([0, 1, 2, 1]), backend="inductor", rtol=1e-4, atol=1e-5
    )


def test_functional_helpers_compile():
    for fn, args in (
        (DF.attention_pool, (torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))),
        (DF.scale_heads, (torch.randn(2, 3, 4),)),
        (DF.pool_features, (torch.randn(2, 3, 4, 4),)),
    ):
        compiled = torch.compile(fn, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(*args), fn(*args))


class TestNoShapeGuards:
    """No speed heuristic of ours depends on the batch: a traced graph holds for every batch size."""

    @staticmethod
    def count_compiles(block, dtype, batches):
        compiles = []

        def counting_backend(gm, example_inputs):
            compiles.append(len(gm.graph.nodes))
            return gm.forward

        block(torch.randn(2, 16, 5, 5, dtype=dtype))  # einops registers its torch backend on first use
        compiled = torch.compile(block, fullgraph=True, backend=counting_backend, dynamic=True)
        for batch in batches:
            x = torch.randn(batch, 16, 5, 5, dtype=dtype)
            state = {k: v.clone() for k, v in block.state_dict().items()}
            got = compiled(x)
            block.load_state_dict(state)
            torch.testing.assert_close(got, block(x), rtol=1e-5, atol=1e-6)
        return len(compiles)

    @pytest.mark.parametrize("train", [True, False])
    def test_compile_dynamic_batch_2_to_256_compiles_once(self, train):
        # 5 x 5 maps: the old channels-last switch sat at 1200 pixels per channel, batch 48
        block = MultiHeadAttentionBlock(16, 3, channel_reduction=4, dtype=torch.float64).train(train)
        batches = (2, 3, 15, 16, 17, 47, 48, 49, 100, 256)
        assert self.count_compiles(block, torch.float64, batches) == 1

    @pytest.mark.parametrize("train", [True, False])
    def test_compile_dynamic_batch_float32(self, train):
        # float32 on CPU: torch's own convolution picks oneDNN or its native kernel by "batch >= 16"
        # (ConvParams::use_mkldnn), a guard every CPU conv net gets, so 2..15 and 16.. are two graphs;
        # nothing of ours adds a third
        block = MultiHeadAttentionBlock(16, 3, channel_reduction=4).train(train)
        assert self.count_compiles(block, torch.float32, (17, 47, 48, 49, 100, 256)) == 1
        torch.compiler.reset()
        assert self.count_compiles(block, torch.float32, (2, 3, 15, 17, 48, 256)) == 2

    def test_float32_batch_16_guard_is_torchs_own(self):
        # the second graph above is not ours: one plain nn.Conv2d gets the same split at batch 16
        conv = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1))
        assert self.count_compiles(conv, torch.float32, (2, 3, 15, 17, 48, 256)) == 2

    @pytest.mark.parametrize("train", [True, False])
    def test_export_dynamic_batch_2_to_1024(self, train):
        block = MultiHeadAttentionBlock(16, 2, channel_reduction=4).train(train)
        batch = torch.export.Dim("batch", min=2, max=1024)
        program = torch.export.export(
            block, (torch.randn(4, 16, 7, 7),), dynamic_shapes=({0: batch},)
        )
        exported = program.module()
        for n in (2, 25, 1024):  # 7 x 7 maps: 1200 pixels per channel between 24 and 25
            x = torch.randn(n, 16, 7, 7)
            torch.testing.assert_close(exported(x), block(x), rtol=1e-5, atol=1e-6)
