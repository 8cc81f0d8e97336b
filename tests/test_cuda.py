"""CUDA-vs-CPU parity for every block and loss: values and gradients (skipped without CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch

from dan_layers import (
    AffinityLoss,
    AttentionFusion,
    CenterLoss,
    ChannelAttention,
    DANHead,
    DANLoss,
    MultiHeadAttentionBlock,
    PartitionLoss,
    SpatialAttention,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="test requires cuda"),
]

DEVICE = "cuda"


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 precision on the GPU so that CPU and CUDA agree to float32 tolerance."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _tol(dtype):
    return {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}


def assert_parity(module, *inputs, device=None, **kwargs):
    """``module`` on the CPU and a copy on ``device``: same outputs, input grads, parameter grads, buffers."""
    device = DEVICE if device is None else device
    dtype = next((t.dtype for t in inputs if t.is_floating_point()), torch.float32)
    tol = _tol(dtype)
    results = []
    for dev, mod in (("cpu", module), (device, copy.deepcopy(module).to(device))):
        leaves = [t.detach().to(dev).requires_grad_(t.is_floating_point()) for t in inputs]
        out = mod(*leaves, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        weights = [torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype).reshape(o.shape).to(dev) for o in outs]
        total = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
        params = [p for p in mod.parameters() if p.requires_grad]
        grads = torch.autograd.grad(
            total, [t for t in leaves if t.is_floating_point()] + params, allow_unused=True
        )
        buffers = [b.detach() for b in mod.buffers()]
        results.append(([o.detach() for o in outs], grads, buffers))
    (cpu_out, cpu_grads, cpu_buf), (dev_out, dev_grads, dev_buf) = results
    for c, d in zip(cpu_out, dev_out, strict=True):
        assert d.device.type == torch.device(device).type and d.dtype == c.dtype
        torch.testing.assert_close(d.cpu(), c, **tol)
    for c, d in zip(cpu_grads, dev_grads, strict=True):
        assert (c is None) == (d is None)
        if c is not None:
            torch.testing.assert_close(d.cpu(), c, **tol)
    for c, d in zip(cpu_buf, dev_buf, strict=True):  # running statistics updated alike
        torch.testing.assert_close(d.cpu(), c, **tol)


DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("precision", DTYPES, ids=str)
class TestCudaParity:
    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    def test_affinity(self, precision, reduction):
        loss = AffinityLoss(7, 32, num_centers=8, reduction=reduction, dtype=precision)
        assert_parity(loss, torch.randn(6, 32, 3, 3, dtype=precision), torch.tensor([0, 1, 6, 3, 3, 2]))

    def test_center(self, precision):
        assert_parity(
            CenterLoss(4, 16, dtype=precision),
            torch.randn(5, 16, dtype=precision),
            torch.tensor([0, 3, 1, 1, 2]),
        )

    @pytest.mark.parametrize("variant", ["paper", "official"])
    @pytest.mark.parametrize("num_heads", [1, 4])
    def test_partition(self, precision, variant, num_heads):
        assert_parity(PartitionLoss(variant), torch.randn(5, num_heads, 32, dtype=precision))

    @pytest.mark.parametrize("train", [True, False])
    def test_spatial(self, precision, train):
        sa = SpatialAttention(32, num_heads=2, kernel_sizes=((5, 5), (1, 3)), dtype=precision).train(train)
        assert_parity(sa, torch.randn(3, 32, 7, 6, dtype=precision), return_attention=True)

    @pytest.mark.parametrize("train", [True, False])
    def test_channel(self, precision, train):
        assert_parity(
            ChannelAttention(32, dtype=precision).train(train), torch.randn(3, 32, 4, 4, dtype=precision)
        )

    @pytest.mark.parametrize("train", [True, False])
    def test_block(self, precision, train):
        block = MultiHeadAttentionBlock(64, 4, dtype=precision).train(train)
        assert_parity(block, torch.randn(4, 64, 7, 7, dtype=precision), return_attention=True)

    def test_reparameterized_block(self, precision):
        block = MultiHeadAttentionBlock(64, 4, dtype=precision).eval().reparameterize()
        assert_parity(block, torch.randn(2, 64, 7, 7, dtype=precision))

    @pytest.mark.parametrize("train", [True, False])
    def test_fusion(self, precision, train):
        assert_parity(
            AttentionFusion(32, 7, dtype=precision).train(train), torch.randn(4, 3, 32, dtype=precision)
        )


class TestCudaBehaviour:
    def test_label_out_of_range_raises_value_error_on_cuda(self):
        loss = AffinityLoss(3, 4, device=DEVICE)
        with pytest.raises(ValueError, match="got label 3"):
            loss(torch.randn(2, 4, device=DEVICE), torch.tensor([0, 3], device=DEVICE))

    def test_mismatched_devices_raise_value_error(self):
        loss = AffinityLoss(3, 4)  # centres on the CPU
        with pytest.raises(ValueError, match="expected all tensors on one device, got"):
            loss(torch.randn(2, 4, device=DEVICE), torch.tensor([0, 1], device=DEVICE))

    def test_single_head_partition_zero_on_cuda(self):
        out = PartitionLoss()(torch.randn(2, 1, 4, device=DEVICE, requires_grad=True))
        assert out.device.type == "cuda" and out.item() == 0.0 and out.grad_fn is not None

    def test_no_host_sync_without_validation(self):
        """With validate=False the losses and blocks never synchronise with the host."""
        block = MultiHeadAttentionBlock(32, 2, validate=False, device=DEVICE)
        fusion = AttentionFusion(32, 3, validate=False, device=DEVICE)
        affinity = AffinityLoss(3, 32, validate=False, device=DEVICE)
        center = CenterLoss(3, 32, validate=False, device=DEVICE)
        partition = PartitionLoss(validate=False)
        fmap = torch.randn(4, 32, 5, 5, device=DEVICE)
        labels = torch.tensor([0, 1, 2, 1], device=DEVICE)
        torch.cuda.synchronize()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits, scaled = fusion(block(fmap))
            total = logits.sum() + affinity(fmap, labels) + center(fmap, labels) + partition(scaled)
            total.backward()
        finally:
            torch.cuda.set_sync_debug_mode(previous)


class TestCudaOneSemantics:
    """The grouped path (CUDA) and the per-group path (CPU) compute, hook and swap alike."""

    @pytest.mark.parametrize("train", [True, False])
    def test_dan_head_and_loss(self, train):
        head = DANHead(32, 5, num_heads=3, channel_reduction=4, dtype=torch.float64).train(train)
        assert_parity(head, torch.randn(4, 32, 5, 5, dtype=torch.float64), return_attention=False)
        criterion = DANLoss(5, 32, normalize=True, dtype=torch.float64)
        inputs = (torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 32, 3, 3, dtype=torch.float64),
                  torch.randn(4, 3, 32, dtype=torch.float64))
        labels = torch.tensor([0, 4, 2, 2])
        cpu = criterion(*inputs, labels)
        gpu = copy.deepcopy(criterion).to(DEVICE)(*(t.to(DEVICE) for t in inputs), labels.to(DEVICE))
        for c, g in zip(cpu, gpu, strict=True):
            torch.testing.assert_close(g.cpu(), c, rtol=1e-10, atol=1e-12)

    def test_hooks_see_the_same_shapes_on_both_devices(self):
        shapes = {}
        for dev in ("cpu", DEVICE):
            block = MultiHeadAttentionBlock(16, 3, channel_reduction=4, device=dev).train()
            seen = []
            for name in ("spatial", "spatial.relu", "spatial.conv_3x3.0", "channel"):
                block.get_submodule(name).register_forward_hook(
                    lambda m, i, o, name=name, seen=seen: seen.append((name, tuple(o.shape)))
                )
            block(torch.randn(4, 16, 5, 5, device=dev))
            shapes[dev] = seen
        assert shapes["cpu"] == shapes[DEVICE] and len(shapes["cpu"]) == 4

    def test_sync_batchnorm_in_eval_and_folded(self):
        block = MultiHeadAttentionBlock(16, 2, channel_reduction=4, dtype=torch.float64).eval()
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(block)).eval()
        x = torch.randn(3, 16, 5, 5, dtype=torch.float64)
        expected = block(x)
        torch.testing.assert_close(synced.to(DEVICE)(x.to(DEVICE)).cpu(), expected, rtol=1e-10, atol=1e-12)
        synced.reparameterize()
        torch.testing.assert_close(synced(x.to(DEVICE)).cpu(), expected, rtol=1e-10, atol=1e-12)
