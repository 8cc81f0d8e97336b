"""Grad-CAM++ (our own code) and the per-head maps of explain.py.

* The closed-form weights equal the paper's general formula (Eq. 10, second and
  third derivatives of the score) computed with exact higher-order derivatives from
  autograd, for the score exp(S) of a network that is piecewise linear after the
  target layer, whose derivatives are known in closed form (powers of dS/dA).
* A case small enough to work out by hand, and zero gradients giving zero weights.
* ``explain_heads`` on a DAN equals a per-head computation in the authors' layout
  (K one-head modules, one attended-feature tensor per head, Grad-CAM++ written as a
  plain loop over channels), for several faces with different target classes.
* The CPU path (grouped convolutions run group by group) and the grouped path
  (``benchmarks/_common.grouped_copy``: plain grouped ``nn.Conv2d``, what CUDA runs)
  give the same maps; so do the re-parameterized and the plain model; K = 1 works.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dan_recipe import gradcam
from dan_recipe import model as recipe_model
from photo_helpers import save_our_checkpoint  # noqa: F401  (puts examples/ on sys.path)
from torch import nn

import dan_layers

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _grouped_copy(net: nn.Module) -> nn.Module:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import _common

    return _common.grouped_copy(net)


# torch.func's forward-mode transforms script a helper of torch's own on first use
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_closed_form_equals_the_general_formula_with_exact_derivatives():
    torch.manual_seed(0)
    channels, h, w = 3, 4, 4
    conv = nn.Conv2d(channels, 5, 3, padding=1).double()
    readout = torch.randn(5, dtype=torch.float64)
    activations = torch.rand(channels, h, w, dtype=torch.float64)

    def score(a: torch.Tensor) -> torch.Tensor:  # piecewise linear in a
        return (readout * torch.relu(conv(a.view(1, channels, h, w)))[0].mean(dim=(-2, -1))).sum()

    def exp_score(flat: torch.Tensor) -> torch.Tensor:
        return torch.exp(score(flat))

    flat = activations.flatten()
    d1 = torch.func.grad(exp_score)(flat)

    def d2_diag(x: torch.Tensor) -> torch.Tensor:
        return torch.diagonal(torch.func.hessian(exp_score)(x))

    d2 = d2_diag(flat)
    d3 = torch.diagonal(torch.func.jacfwd(d2_diag)(flat))
    d1, d2, d3 = (t.view(channels, h, w) for t in (d1, d2, d3))
    total = activations.sum(dim=(-2, -1), keepdim=True)
    alpha = d2 / (2 * d2 + total * d3)  # Eq. 10 (no zero gradients here)
    general = (alpha * d1.clamp_min(0)).sum(dim=(-2, -1))

    grad_s = torch.func.grad(score)(flat).view(channels, h, w)
    assert (grad_s != 0).float().mean() > 0.9
    closed = gradcam.gradcam_plus_plus_weights(activations, grad_s)
    # Eq. 10 for exp(S) is exp(S) x the closed form (Eq. 19)
    torch.testing.assert_close(general, torch.exp(score(flat)) * closed, rtol=1e-10, atol=1e-12)


def test_a_case_worked_out_by_hand_and_zero_gradients():
    a = torch.tensor([[[1.0, 3.0]]])  # one channel, 1 x 2
    g = torch.tensor([[[2.0, 2.0]]])
    # alpha = 4 / (2 * 4 + (1 + 3) * 8) = 0.1 at both pixels; w = 0.1 * 2 + 0.1 * 2 = 0.4
    torch.testing.assert_close(gradcam.gradcam_plus_plus_weights(a, g), torch.tensor([0.4]))
    torch.testing.assert_close(gradcam.gradcam_plus_plus(a, g), torch.tensor([[0.4, 1.2]]))
    zero = gradcam.gradcam_plus_plus_weights(torch.rand(2, 3, 3, 3), torch.zeros(2, 3, 3, 3))
    assert torch.equal(zero, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        gradcam.gradcam_plus_plus_weights(torch.rand(2, 3, 3), torch.rand(2, 3, 4))


def _dan(num_heads: int, seed: int = 0) -> recipe_model.DAN:
    torch.manual_seed(seed)
    net = recipe_model.DAN(num_classes=3, num_heads=num_heads).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        net.head.fusion.bn.running_var.fill_(1e4)
    return net


def _loop_gradcam(attended: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM++ of one head of one face, channel by channel: (C, H, W) -> (H, W)."""
    cam = np.zeros(attended.shape[1:])
    for c in range(attended.shape[0]):
        a, g = attended[c], grads[c]
        denominator = 2 * g**2 + a.sum() * g**3
        alpha = np.divide(g**2, denominator, out=np.zeros_like(g), where=denominator != 0)
        cam += (alpha * np.maximum(g, 0)).sum() * a
    return np.maximum(cam, 0)


def test_every_head_equals_a_per_head_computation_in_the_authors_layout():
    net = _dan(num_heads=3)
    x = torch.randn(2, 3, 96, 96)  # 3 x 3 feature maps
    got = gradcam.explain_heads(net, x, target=[0, 2])
    assert got.attention.shape == got.gradcam.shape == (2, 3, 3, 3)
    assert got.target.tolist() == [0, 2]

    spatial, channel = net.head.attention.split_heads()  # the authors' cat_head{i}.sa / .ca
    with torch.no_grad():
        fmap = net.backbone(x)
    attended = [sa(fmap).detach().requires_grad_(True) for sa in spatial]  # one target layer per head
    pooled = [a.mean(dim=(-2, -1)) for a in attended]
    heads = torch.stack([ca(p) for ca, p in zip(channel, pooled, strict=True)], dim=1)
    logits, _ = net.head.fusion(heads)
    grads = torch.autograd.grad(logits[[0, 1], [0, 2]].sum(), attended)
    torch.testing.assert_close(got.probabilities, torch.softmax(logits.detach(), 1), rtol=1e-5, atol=1e-6)
    for k in range(3):
        with torch.no_grad():
            torch.testing.assert_close(got.attention[:, k], spatial[k].attention_map(fmap)[:, 0])
        for b in range(2):
            expected = _loop_gradcam(attended[k][b].double().detach().numpy(), grads[k][b].double().numpy())
            np.testing.assert_allclose(
                got.gradcam[b, k].numpy(), expected, rtol=2e-4, atol=1e-6 * expected.max()
            )
    assert not torch.allclose(got.gradcam[:, 0], got.gradcam[:, 1])  # the heads differ


def test_cpu_path_grouped_path_and_reparameterized_model_give_the_same_maps():
    net = _dan(num_heads=4, seed=3)
    x = torch.randn(2, 3, 64, 64)
    plain = gradcam.explain_heads(net, x)
    grouped = gradcam.explain_heads(_grouped_copy(net), x)
    fast = dan_layers.reparameterize_model(copy.deepcopy(net)).to(memory_format=torch.channels_last)
    fused = gradcam.explain_heads(fast, x.contiguous(memory_format=torch.channels_last))
    for other in (grouped, fused):
        assert torch.equal(other.target, plain.target)
        torch.testing.assert_close(other.attention, plain.attention, rtol=1e-4, atol=1e-5)
        scale = float(plain.gradcam.max())
        torch.testing.assert_close(other.gradcam, plain.gradcam, rtol=1e-3, atol=1e-4 * scale)


def test_one_head_and_bad_targets():
    net = _dan(num_heads=1)
    maps = gradcam.explain_heads(net, torch.randn(3, 3, 64, 64), target=1)
    assert maps.attention.shape == maps.gradcam.shape == (3, 1, 2, 2) and maps.target.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="target"):
        gradcam.explain_heads(net, torch.randn(2, 3, 64, 64), target=3)
    with pytest.raises(ValueError, match="target"):
        gradcam.explain_heads(net, torch.randn(2, 3, 64, 64), target=[0, 1, 2])
    assert gradcam.upsample_maps(maps.gradcam, 16).shape == (3, 1, 16, 16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="test requires cuda")
def test_cuda_gives_the_maps_of_the_cpu(monkeypatch):
    # full float32 on the GPU (no TF32), so that CUDA's grouped convolutions meet the CPU path's maps
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    net = _dan(num_heads=4, seed=5)
    x = torch.randn(2, 3, 64, 64)
    cpu = gradcam.explain_heads(net, x)
    cuda = gradcam.explain_heads(copy.deepcopy(net).cuda(), x.cuda())
    assert torch.equal(cuda.target, cpu.target)
    torch.testing.assert_close(cuda.attention, cpu.attention, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(cuda.gradcam, cpu.gradcam, rtol=1e-3, atol=1e-3 * float(cpu.gradcam.max()))
