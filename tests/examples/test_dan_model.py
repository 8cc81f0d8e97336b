"""The reference DAN (dan_recipe.model) and the authors' checkpoints (dan_recipe.weights).

``AuthorsDAN`` below is a plain re-implementation, written for this test, of the
structure of the authors' model (yaoing/DAN networks/dan.py): a torchvision-style
ResNet-18 trunk in an ``nn.Sequential`` named ``features``, one
``cat_head{i}`` module per head holding ``sa`` (SpatialAttention) and ``ca``
(ChannelAttention) and a Python loop over them, then ``fc`` and ``bn``. Its
state-dict keys are the ones of the published checkpoints; loading its random
weights into our fused model must give the same outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from dan_recipe import model as recipe_model  # noqa: E402
from dan_recipe import utils  # noqa: E402

# noqa: E402
import dan_layers  # noqa: E402

# ----------------------------------------------------------------------------------------
# The authors' structure, written out plainly (our own code, their key names)
# ----------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


def _trunk() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),  # features.0
        nn.BatchNorm2d(64),  # features.1
        nn.ReLU(),  # features.2
        nn.MaxPool2d(3, 2, 1),  # features.3
        nn.Sequential(_Block(64, 64, 1), _Block(64, 64, 1)),  # features.4
        nn.Sequential(_Block(64, 128, 2), _Block(128, 128, 1)),
        nn.Sequential(_Block(128, 256, 2), _Block(256, 256, 1)),
        nn.Sequential(_Block(256, 512, 2), _Block(512, 512, 1)),  # features.7
    )


class _AuthorsSA(nn.Module):
    def __init__(self, c: int = 512) -> None:
        super().__init__()
        self.conv1x1 = nn.Sequential(nn.Conv2d(c, c // 2, 1), nn.BatchNorm2d(c // 2))
        self.conv_3x3 = nn.Sequential(nn.Conv2d(c // 2, c, 3, padding=1), nn.BatchNorm2d(c))
        self.conv_1x3 = nn.Sequential(nn.Conv2d(c // 2, c, (1, 3), padding=(0, 1)), nn.BatchNorm2d(c))
        self.conv_3x1 = nn.Sequential(nn.Conv2d(c // 2, c, (3, 1), padding=(1, 0)), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.conv1x1(x)
        y = F.relu(self.conv_3x3(y) + self.conv_1x3(y) + self.conv_3x1(y))
        return x * y.sum(dim=1, keepdim=True)


class _AuthorsCA(nn.Module):
    def __init__(self, c: int = 512) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            nn.Linear(c, c // 16),
            nn.BatchNorm1d(c // 16),
            nn.ReLU(),
            nn.Linear(c // 16, c),
            nn.Sigmoid(),
        )

    def forward(self, x):
        pooled = x.mean(dim=(2, 3))
        return pooled * self.attention(pooled)


class _AuthorsHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sa = _AuthorsSA()
        self.ca = _AuthorsCA()

    def forward(self, x):
        return self.ca(self.sa(x))


class AuthorsDAN(nn.Module):
    def __init__(self, num_class: int = 7, num_head: int = 4) -> None:
        super().__init__()
        self.features = _trunk()
        self.num_head = num_head
        for i in range(num_head):
            setattr(self, f"cat_head{i}", _AuthorsHead())
        self.fc = nn.Linear(512, num_class)
        self.bn = nn.BatchNorm1d(num_class)

    def forward(self, x):
        x = self.features(x)
        heads = torch.stack([getattr(self, f"cat_head{i}")(x) for i in range(self.num_head)], 1)
        if heads.size(1) > 1:
            heads = F.log_softmax(heads, dim=1)
        return self.bn(self.fc(heads.sum(dim=1))), x, heads


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm running statistics (so eval mode is not trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() > 1:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if "bn" in name else 0.0))
    return model


def _rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    scale = b.abs().max().clamp_min(1e-12)
    return bool(((a - b).abs().max() / scale) <= rtol)


# ----------------------------------------------------------------------------------------
# Architecture facts
# ----------------------------------------------------------------------------------------


def test_import_has_no_side_effects():
    assert recipe_model.DAN is not None
    assert "torchvision" not in sys.modules


def test_parameter_count_matches_authors():
    model = recipe_model.DAN(num_classes=7, num_heads=4)
    assert sum(p.numel() for p in model.parameters()) == 19_723_733
    assert sum(p.numel() for p in model.backbone.parameters()) == 11_689_512 - 513_000
    assert isinstance(model.head.attention, dan_layers.MultiHeadAttentionBlock)
    assert isinstance(model.head.fusion, dan_layers.AttentionFusion)
    # the authors' structure has the same count
    assert sum(p.numel() for p in AuthorsDAN().parameters()) == 19_723_733


def test_macs_at_224():
    model = recipe_model.DAN(num_classes=7, num_heads=4)
    macs = recipe_model.count_macs(model, torch.zeros(1, 3, 224, 224))
    assert round(macs / 1e9, 2) == 2.22
    # the authors' per-head structure: same arithmetic (up to the tiny channel-attention
    # MLPs, which the fused block computes with einsum rather than nn.Linear)
    ours = recipe_model.count_macs(model, torch.zeros(1, 3, 64, 64))
    ref = recipe_model.count_macs(AuthorsDAN(), torch.zeros(1, 3, 64, 64))
    assert abs(ours - ref) / ref < 2e-3


def test_backbone_keys_are_torchvision_names():
    keys = set(recipe_model.ResNet18Features().state_dict())
    for k in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean",
        "layer4.1.bn2.num_batches_tracked",
    ):
        assert k in keys
    assert not any(k.startswith(("fc.", "avgpool")) for k in keys)
    assert len(keys) == 122 - 2  # torchvision resnet18 state dict minus fc.weight, fc.bias


def test_forward_shapes_and_attention_maps():
    model = recipe_model.DAN(num_classes=5, num_heads=3).eval()
    x = torch.randn(2, 3, 64, 64)
    logits, fmap, heads = model(x)
    assert logits.shape == (2, 5)
    assert fmap.shape == (2, 512, 2, 2)
    assert heads.shape == (2, 3, 512)
    assert model.attention_maps(x).shape == (2, 3, 2, 2)


# ----------------------------------------------------------------------------------------
# The authors' checkpoints
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authors_model() -> AuthorsDAN:
    torch.manual_seed(0)
    return _randomise(AuthorsDAN(num_class=7, num_head=4)).eval()


def test_official_checkpoint_gives_the_authors_outputs(authors_model, tmp_path):
    state = authors_model.state_dict()
    assert set(state) == set(recipe_model.official_key_names(recipe_model.DAN()))
    path = tmp_path / "rafdb_epoch21_acc0.897.pth"  # the published files' layout
    torch.save({"iter": 21, "model_state_dict": state, "optimizer_state_dict": {}}, path)
    ours = recipe_model.load_official_checkpoint(recipe_model.DAN(num_classes=7, num_heads=4), path).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits, ref_map, ref_heads = authors_model(x)
        logits, fmap, heads = ours(x)
    assert _rel_close(fmap, ref_map)
    assert _rel_close(heads, ref_heads)
    assert _rel_close(logits, ref_logits)
    # and back: our weights under the authors' names reproduce their state dict
    # (the fused block keeps one BatchNorm batch counter for all heads, so the per-head
    # num_batches_tracked, which only matter for BatchNorm(momentum=None), are not kept)
    back = recipe_model.to_official_state_dict(ours)
    assert set(back) == set(state)
    for k in state:
        if not (k.startswith("cat_head") and k.endswith("num_batches_tracked")):
            assert torch.equal(back[k], state[k]), k


@pytest.mark.parametrize("wrap", ["model_state_dict", "bare", "module_prefix"])
def test_official_checkpoint_containers(authors_model, wrap):
    state = authors_model.state_dict()
    if wrap == "model_state_dict":
        source = {"iter": 3, "model_state_dict": state}
    elif wrap == "bare":
        source = state
    else:  # saved from DataParallel
        source = {f"module.{k}": v for k, v in state.items()}
    ours = recipe_model.load_official_checkpoint(recipe_model.DAN(), source)
    back = recipe_model.to_official_state_dict(ours)
    for k in ("features.0.weight", "cat_head2.sa.conv_3x1.1.running_var", "bn.bias"):
        assert torch.equal(back[k], state[k])


def test_official_config_inference(authors_model):
    info = recipe_model.infer_official_config({"model_state_dict": authors_model.state_dict()})
    assert info == {"num_classes": 7, "num_heads": 4}
    two = AuthorsDAN(num_class=8, num_head=2)
    assert recipe_model.infer_official_config(two.state_dict()) == {"num_classes": 8, "num_heads": 2}


def test_official_checkpoint_other_head_count():
    ref = _randomise(AuthorsDAN(num_class=8, num_head=2), seed=3).eval()
    ours = recipe_model.load_official_checkpoint(recipe_model.DAN(8, 2), ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel_close(ours(x)[0], ref(x)[0])


def test_truncated_checkpoint_names_missing_keys(authors_model):
    state = dict(authors_model.state_dict())
    del state["cat_head3.sa.conv_1x3.0.weight"]
    del state["features.7.1.bn2.running_var"]
    with pytest.raises(utils.CheckpointError) as err:
        recipe_model.load_official_checkpoint(recipe_model.DAN(), state)
    msg = str(err.value)
    assert "missing keys (2)" in msg
    assert "cat_head3.sa.conv_1x3.0.weight" in msg
    assert "features.7.1.bn2.running_var" in msg


def test_wrong_checkpoint_names_unexpected_and_shapes(authors_model):
    state = dict(authors_model.state_dict())
    state["cat_head4.sa.conv1x1.0.weight"] = torch.zeros(256, 512, 1, 1)  # a 5th head
    with pytest.raises(utils.CheckpointError, match=r"unexpected keys \(1\): cat_head4"):
        recipe_model.load_official_checkpoint(recipe_model.DAN(), state)
    with pytest.raises(utils.CheckpointError, match=r"shape mismatches.*fc.weight"):
        recipe_model.load_official_checkpoint(recipe_model.DAN(num_classes=8), authors_model.state_dict())
    with pytest.raises(utils.CheckpointError, match="missing keys"):
        recipe_model.load_official_checkpoint(recipe_model.DAN(num_heads=5), authors_model.state_dict())


def test_unreadable_and_unsafe_files(tmp_path, authors_model):
    path = tmp_path / "ckpt.pth"
    torch.save({"model_state_dict": authors_model.state_dict()}, path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(utils.CheckpointError, match="cannot read weights file"):
        recipe_model.load_official_checkpoint(recipe_model.DAN(), cut)
    # a pickle holding an arbitrary object is refused (weights_only=True)
    evil = tmp_path / "evil.pth"
    torch.save({"model_state_dict": authors_model.state_dict(), "x": _Block(1, 1, 1)}, evil)
    with pytest.raises(utils.CheckpointError, match="weights_only"):
        recipe_model.load_official_checkpoint(recipe_model.DAN(), evil)
    with pytest.raises(utils.CheckpointError, match="without tensors"):
        recipe_model.load_official_checkpoint(recipe_model.DAN(), {"iter": 3})


# ----------------------------------------------------------------------------------------
# MS-Celeb / torchvision-format backbone files
# ----------------------------------------------------------------------------------------


def _torchvision_style_resnet18_state() -> dict[str, torch.Tensor]:
    trunk = _randomise(recipe_model.ResNet18Features(), seed=5)
    state = dict(trunk.state_dict())
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    return state


def test_backbone_weights_load_and_report(tmp_path):
    state = _torchvision_style_resnet18_state()
    path = tmp_path / "resnet18_msceleb.pth"
    torch.save({"state_dict": state, "epoch": 10}, path)
    model = recipe_model.DAN()
    report = recipe_model.load_backbone_weights(model, path)
    assert report == {"missing": [], "unexpected": [], "dropped": ["fc.bias", "fc.weight"]}
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_backbone_weights_mismatch_is_never_silent():
    state = _torchvision_style_resnet18_state()
    del state["layer3.1.conv2.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(utils.CheckpointError) as err:
        recipe_model.load_backbone_weights(recipe_model.DAN(), {"state_dict": state})
    assert "layer3.1.conv2.weight" in str(err.value)
    assert "layer5.0.conv1.weight" in str(err.value)
    report = recipe_model.load_backbone_weights(recipe_model.DAN(), {"state_dict": state}, strict=False)
    assert report["missing"] == ["layer3.1.conv2.weight"]
    assert report["unexpected"] == ["layer5.0.conv1.weight"]


def test_module_prefix_is_stripped():
    state = {f"module.{k}": v for k, v in _torchvision_style_resnet18_state().items()}
    report = recipe_model.load_backbone_weights(recipe_model.DAN(), state)
    assert report["missing"] == [] and report["unexpected"] == []
