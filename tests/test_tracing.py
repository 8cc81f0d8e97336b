"""The graph tools of PyTorch on every module and loss: torch.fx, torch.jit.trace, torch.jit.script.

* ``torch.fx.symbolic_trace`` works with the default settings, in train and eval mode,
  on each module and inside a model that holds them; the traced module computes the
  same outputs and gradients as the eager one (float64); flags go in ``concrete_args``.
* Node names are stable, so features can be picked by name (the feature-extractor
  pattern of torchvision / timm, written with torch.fx itself).
* ``torch.jit.trace`` gives the eager values; ``torch.jit.script`` is refused clearly.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.fx as fx
from module_helpers import randomize
from torch import nn

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

F64 = torch.float64


def labels(batch: int, classes: int) -> torch.Tensor:
    return torch.arange(batch) % classes


#: (id, module factory, input factory, concrete_args); every module in float64 with its defaults
#: except sizes small enough for a test.
CASES = [
    ("SpatialAttention", lambda: SpatialAttention(16, dtype=F64),
     lambda: (torch.randn(3, 16, 5, 6, dtype=F64),), {"return_attention": False}),
    ("SpatialAttention-K3", lambda: SpatialAttention(16, num_heads=3, dtype=F64),
     lambda: (torch.randn(3, 16, 5, 6, dtype=F64),), {"return_attention": False}),
    ("ChannelAttention", lambda: ChannelAttention(32, dtype=F64),
     lambda: (torch.randn(3, 32, 5, 6, dtype=F64),), {"return_attention": False}),
    ("ChannelAttention-BKC", lambda: ChannelAttention(32, num_heads=2, dtype=F64),
     lambda: (torch.randn(3, 2, 32, dtype=F64),), {"return_attention": False}),
    ("MultiHeadAttentionBlock", lambda: MultiHeadAttentionBlock(32, dtype=F64),
     lambda: (torch.randn(3, 32, 5, 6, dtype=F64),), {"return_attention": False}),
    ("AttentionFusion", lambda: AttentionFusion(32, dtype=F64),
     lambda: (torch.randn(3, 4, 32, dtype=F64),), None),
    ("DANHead", lambda: DANHead(32, dtype=F64),
     lambda: (torch.randn(3, 32, 5, 6, dtype=F64),), {"return_attention": False}),
    ("PartitionLoss", lambda: PartitionLoss(), lambda: (torch.randn(3, 4, 32, dtype=F64),), None),
    ("AffinityLoss", lambda: AffinityLoss(feat_dim=32, dtype=F64),
     lambda: (torch.randn(6, 32, 5, 6, dtype=F64), labels(6, 7)), None),
    ("CenterLoss", lambda: CenterLoss(feat_dim=32, dtype=F64),
     lambda: (torch.randn(6, 32, dtype=F64), labels(6, 7)), None),
    ("DANLoss", lambda: DANLoss(feat_dim=32, dtype=F64),
     lambda: (torch.randn(6, 7, dtype=F64), torch.randn(6, 32, 5, 6, dtype=F64),
              torch.randn(6, 4, 32, dtype=F64), labels(6, 7)), None),
]


FLAGGED = [case for case in CASES if case[3]]


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for part in out for t in _tensors(part)]


def run_with_grads(module: nn.Module, fn, inputs) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Outputs and gradients (inputs and parameters) of ``fn(*inputs)``; module state restored after."""
    state = {k: v.clone() for k, v in module.state_dict().items()}
    leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    params = [p for p in module.parameters() if p.requires_grad]
    outs = _tensors(fn(*leaves))
    total = sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in outs)
    grads = torch.autograd.grad(total, [t for t in leaves if t.is_floating_point()] + params, allow_unused=True)
    module.load_state_dict(state)  # the other run sees the same BatchNorm statistics
    return [o.detach() for o in outs], list(grads)


def assert_graph_equals_eager(module: nn.Module, graph, inputs, tol: float = 1e-12) -> None:
    """Outputs and gradients of ``graph(*inputs)`` are those of ``module(*inputs)``."""
    eager = run_with_grads(module, module, inputs)
    traced = run_with_grads(module, graph, inputs)
    assert_same(traced[0], eager[0], tol)
    assert_same(traced[1], eager[1], tol)


def assert_same(a, b, tol: float = 1e-12) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)


# ============================================================================ torch.fx


class TestSymbolicTrace:
    @pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
    @pytest.mark.parametrize("name,make,make_inputs,concrete", CASES, ids=[c[0] for c in CASES])
    def test_traced_equals_eager_outputs_and_gradients(self, name, make, make_inputs, concrete, train):
        module = randomize(make(), seed=1).train(train)
        inputs = make_inputs()
        traced = fx.symbolic_trace(module, concrete_args=concrete)
        assert isinstance(traced, fx.GraphModule)
        assert_graph_equals_eager(module, traced, inputs)

    @pytest.mark.parametrize("name,make,make_inputs,concrete", CASES, ids=[c[0] for c in CASES])
    def test_traced_module_saves_copies_and_traces_again(self, name, make, make_inputs, concrete):
        # torch.save of a GraphModule writes its code's imports: no string annotations may reach them
        module = randomize(make(), seed=5).eval()
        inputs = make_inputs()
        traced = fx.symbolic_trace(module, concrete_args=concrete)
        buffer = io.BytesIO()
        torch.save(traced, buffer)
        buffer.seek(0)
        expected = _tensors(module(*inputs))
        for again in (torch.load(buffer, weights_only=False), copy.deepcopy(traced), fx.symbolic_trace(traced)):
            assert_same(_tensors(again(*inputs)), expected)

    @pytest.mark.parametrize("name,make,make_inputs,concrete", FLAGGED, ids=[c[0] for c in FLAGGED])
    def test_return_attention_goes_in_concrete_args(self, name, make, make_inputs, concrete):
        module = randomize(make(), seed=2).eval()
        inputs = make_inputs()
        traced = fx.symbolic_trace(module, concrete_args={"return_attention": True})
        # FX keeps the argument and checks it: the traced module is called with True
        assert_same(_tensors(traced(*inputs, True)), _tensors(module(*inputs, return_attention=True)))
        with pytest.raises(ValueError, match=r"return_attention: expected a Python bool, got a torch\.fx "
                                             r"Proxy.*concrete_args=\{'return_attention': False\}"):
            fx.symbolic_trace(module)

    def test_eager_validation_is_unchanged_after_tracing(self):
        block = MultiHeadAttentionBlock(32, 4)
        fx.symbolic_trace(block, concrete_args={"return_attention": False})
        with pytest.raises(ValueError, match=r"x: expected a torch\.Tensor of shape \(B, C, H, W\), got list"):
            block([1.0])
        with pytest.raises(ValueError, match=r"x: expected in_channels = 32 \(size of dim 1\), got 16"):
            block(torch.randn(2, 16, 7, 7))
        with pytest.raises(ValueError, match="MultiHeadAttentionBlock.*expected a batch of at least 2, got 1"):
            block.train()(torch.randn(1, 32, 7, 7))

    def test_a_traced_loss_checks_its_inputs_as_the_function_does(self):
        # the losses are single nodes that run the functions themselves, checks included
        traced = fx.symbolic_trace(AffinityLoss(num_classes=5, feat_dim=8))
        assert [n.name for n in traced.graph.nodes if n.op == "call_function"] == ["affinity_loss"]
        with pytest.raises(ValueError, match=r"labels: expected values in \[0, 5\), got label 7"):
            traced(torch.randn(2, 8), torch.tensor([0, 7]))

    def test_traced_dan_loss_under_autocast_equals_eager(self):
        # eager DANLoss switches autocast off around its terms; a graph cannot record that, and need
        # not: none of its operations is one autocast runs in lower precision
        criterion = DANLoss(num_classes=7, feat_dim=32)
        traced = fx.symbolic_trace(criterion)
        args = (torch.randn(6, 7), torch.randn(6, 32, 5, 6), torch.randn(6, 4, 32), labels(6, 7))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager, graph = criterion(*args), traced(*args)
        for a, b in zip(graph, eager, strict=True):
            assert a.dtype == b.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_user_code_calling_the_functional_form_traces(self):
        import dan_layers.functional as DF
        from dan_layers.functional import partition_loss  # imported by name: not patched by torch.fx.wrap

        class Model(nn.Module):
            def forward(self, heads):
                return partition_loss(heads) + DF.partition_loss(heads, variant="official")

        heads = torch.randn(4, 3, 8, dtype=F64)
        traced = fx.symbolic_trace(Model())
        assert [n.target.__name__ for n in traced.graph.nodes if n.op == "call_function"] == [
            "partition_loss", "partition_loss", "add"]
        torch.testing.assert_close(traced(heads), Model()(heads), rtol=0, atol=0)


class Classifier(nn.Module):
    """A backbone nobody here wrote (with multiplications of its own before ours), DAN's head, its loss."""

    def __init__(self, num_heads: int = 4, gate: bool = True, validate: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.gate = gate
        self.head = DANHead(16, 5, num_heads=num_heads, channel_reduction=4, validate=validate)
        self.criterion = DANLoss(5, 16, validate=validate)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.stem(images)
        if self.gate:  # squeeze-and-excitation style: several mul nodes before the head's
            fmap = fmap * torch.sigmoid(fmap.mean(dim=(2, 3), keepdim=True)) * 2.0
        return fmap

    def forward(self, images: torch.Tensor, targets: torch.Tensor):
        fmap = self.features(images)
        out = self.head(fmap)
        losses = self.criterion(out.logits, fmap, out.heads, targets)
        return out.logits, losses.loss


def classifier(**kwargs) -> Classifier:
    return randomize(Classifier(**kwargs).double(), seed=3)


def extract(model: nn.Module, names: list[str]) -> fx.GraphModule:
    """The feature-extractor pattern (torchvision's create_feature_extractor) with torch.fx alone:
    trace, return the named nodes instead of the output, drop what they do not need."""
    traced = fx.symbolic_trace(model)
    nodes = {node.name: node for node in traced.graph.nodes}
    output = next(node for node in traced.graph.nodes if node.op == "output")
    with traced.graph.inserting_before(output):
        traced.graph.output({name: nodes[name] for name in names})
    traced.graph.erase_node(output)
    traced.graph.eliminate_dead_code()
    traced.recompile()
    return traced


FEATURES = ["head_attention_spatial_maps", "head_attention_spatial_attended", "head_attention_channel_gate",
            "head_attention_channel_gated", "head_fusion_scaled"]


class TestInsideAModel:
    @pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
    def test_traced_model_equals_eager(self, train):
        model = classifier().train(train)
        inputs = (torch.randn(4, 3, 6, 6, dtype=F64), labels(4, 5))
        assert_graph_equals_eager(model, fx.symbolic_trace(model), inputs)

    @pytest.mark.parametrize("kwargs", [{}, {"num_heads": 1}, {"gate": False}, {"validate": False}],
                             ids=["default", "one-head", "no-gate", "no-validation"])
    @pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
    def test_feature_nodes_have_the_same_names_whatever_else_changes(self, kwargs, train):
        traced = fx.symbolic_trace(classifier(**kwargs).train(train))
        names = [node.name for node in traced.graph.nodes]
        for feature in FEATURES:
            assert names.count(feature) == 1, (feature, names)
        # FX's own names for modules: the BatchNorms and ReLU of the head
        assert {"head_attention_spatial_relu", "head_fusion_fc", "head_fusion_bn"} <= set(names)

    def test_pick_each_heads_attended_features_by_name(self):
        model = classifier().eval()
        images = torch.randn(2, 3, 6, 6, dtype=F64)
        extractor = extract(model, ["head_attention_spatial_attended", "head_attention_spatial_maps"])
        assert "head_fusion_fc" not in {n.name for n in extractor.graph.nodes}  # truncated after the maps
        features = extractor(images, labels(2, 5))

        seen = {}
        spatial_unit = model.head.attention.spatial
        spatial_unit.register_forward_hook(lambda m, i, o: seen.update(attended=o[0], maps=o[1]))
        x = model.features(images)
        model.head(x, return_attention=True)
        attended = features["head_attention_spatial_attended"]
        assert attended.shape == (2, 4, 16, 6, 6)
        torch.testing.assert_close(attended, seen["attended"], rtol=0, atol=0)
        torch.testing.assert_close(features["head_attention_spatial_maps"], seen["maps"], rtol=0, atol=0)
        # head k's attended features are x * map_k, what the authors' head k computes
        spatial, _ = model.head.attention.split_heads()
        for k in range(4):
            torch.testing.assert_close(attended[:, k], spatial[k](x), rtol=1e-12, atol=1e-12)

    def test_reparameterized_model_traces_with_the_same_names(self):
        from dan_layers import reparameterize_model

        model = classifier().eval()
        fast = reparameterize_model(model)
        names = {node.name for node in fx.symbolic_trace(fast).graph.nodes}
        assert set(FEATURES) <= names
        assert not any("conv_3x3" in name for name in names)  # one merged convolution per head
        inputs = (torch.randn(2, 3, 6, 6, dtype=F64), labels(2, 5))
        logits = fx.symbolic_trace(fast)(*inputs)[0]
        torch.testing.assert_close(logits, model(*inputs)[0], rtol=1e-10, atol=1e-10)


# ============================================================================ TorchScript


class TestTorchScript:
    @pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
    @pytest.mark.parametrize("name,make,make_inputs,concrete", CASES, ids=[c[0] for c in CASES])
    def test_jit_trace_equals_eager(self, name, make, make_inputs, concrete, train):
        module = randomize(make(), seed=4).train(train)
        inputs = make_inputs()
        state = {k: v.clone() for k, v in module.state_dict().items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings of the label check (values read once)
            traced = torch.jit.trace(module, inputs, check_trace=False, strict=False)
        module.load_state_dict(state)
        # DANLoss computes in float32 by design, and the TorchScript executor may fuse float32 ops
        assert_graph_equals_eager(module, traced, inputs, 1e-5 if name == "DANLoss" else 1e-12)

    @pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
    @pytest.mark.parametrize("name,make,make_inputs,concrete", CASES, ids=[c[0] for c in CASES])
    def test_jit_script_is_refused_with_a_clear_error(self, name, make, make_inputs, concrete):
        module = make()
        message = (rf"{type(module).__name__}: torch\.jit\.script is not supported \(TorchScript is in "
                   r"maintenance mode.*torch\.export\.export")
        with pytest.raises(RuntimeError, match=message):
            torch.jit.script(module)
        # inside someone else's model as well
        with pytest.raises(RuntimeError, match=message):
            torch.jit.script(nn.Sequential(nn.Identity(), module))
