"""examples/train_dan.py over dan_recipe: smoke runs on every data kind, checkpoints, exact resume, DDP.

The command's ``main(argv) -> dict`` is called in-process (fast); only the torchrun
test starts processes. Everything is tiny: 32 px images, a few dozen samples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import train_dan
from dan_recipe import config, train, utils
from dan_recipe import model as recipe_model

# a run as small as a run can be: 32 px, 3 steps of 8, 1 epoch, no figures
from tiny_runs import EXAMPLES, ROOT, SYNTH, TINY, run


def _check_metrics(m: dict, num_classes: int) -> None:
    final = m["final"]
    assert 0.0 <= final["accuracy"] <= 1.0
    assert 0.0 <= final["balanced_accuracy"] <= 1.0
    cm = torch.tensor(final["confusion_matrix"])
    assert cm.shape == (num_classes, num_classes)
    assert int(cm.sum()) == final["samples"]
    assert m["last"]["samples"] == final["samples"]
    assert len(m["class_names"]) == num_classes
    assert m["env"]["torch"] == torch.__version__
    assert m["env"]["world_size"] == 1
    for e in m["epochs"]:
        for k in ("loss", "ce", "affinity", "partition", "accuracy", "balanced_accuracy"):
            assert k in e["train"]
        assert e["val"] is not None


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------


def test_presets_and_overrides():
    cfg, src = config.resolve_config(["--preset", "rafdb", "--data-root", "x", "--lr", "0.01"])
    assert cfg["optimizer"] == "sgd" and cfg["momentum"] == 0.9 and cfg["weight_decay"] == 1e-4
    assert (cfg["scheduler"], cfg["step_size"], cfg["gamma"]) == ("step", 10, 0.1)
    assert (cfg["epochs"], cfg["batch_size"], cfg["image_size"]) == (40, 256, 224)
    assert cfg["num_centers"] == 8 and cfg["data"] == "rafdb"
    assert cfg["lr"] == 0.01 and src["lr"] == "flag" and src["momentum"] == "preset:rafdb"
    cfg, _ = config.resolve_config(["--data", "affectnet", "--data-root", "x"])
    assert cfg["preset"] == "affectnet" and cfg["optimizer"] == "adam" and cfg["lr"] == 1e-4
    assert (cfg["scheduler"], cfg["gamma"], cfg["balanced_sampler"]) == ("exponential", 0.6, True)
    cfg, _ = config.resolve_config([])
    assert cfg["data"] == "synthetic" and cfg["preset"] == "demo"
    with pytest.raises(utils.RecipeError):
        config.resolve_config(["--data", "rafdb"])  # needs --data-root
    with pytest.raises(utils.RecipeError):
        config.resolve_config(["--eval-only", "--resume"])  # evaluates, never resumes


def test_centres_are_optimised_and_inside_the_wrapped_module():
    cfg, _ = config.resolve_config(["--num-heads", "2", "--center-weight-decay", "0.0"])
    net = train.build_model_with_losses(cfg, 7)
    opt = train.build_optimizer(cfg, net)
    centres = net.criterion.affinity.centers
    assert any(p is centres for p in net.parameters())  # DDP wraps `net`: centres synced
    groups = [g for g in opt.param_groups if any(p is centres for p in g["params"])]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in net.parameters())


def test_atomic_write_survives_interrupt(tmp_path):
    path = tmp_path / "last.pt"
    utils.save_torch({"epoch": 1, "w": torch.ones(3)}, path)

    def boom(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        utils.atomic_write(path, boom)
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left
    best = tmp_path / "best.pt"
    utils.save_torch({"epoch": 2}, path, also=[best])
    assert torch.load(best, weights_only=True)["epoch"] == 2 and best.samefile(path)
    utils.save_torch({"epoch": 3}, path)  # best.pt keeps epoch 2
    assert torch.load(best, weights_only=True)["epoch"] == 2
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


# ----------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------


def test_synthetic_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    m = run(out, *SYNTH, "--plots", "--viz-faces", "3", "--epochs", "2")
    _check_metrics(m, 7)
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert m["final"]["epoch"] == m["best_epoch"]
    assert m["last"]["epoch"] == 2
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["final"]["confusion_matrix"] == m["final"]["confusion_matrix"]
    assert on_disk["complete"] is True and on_disk["train_seconds"] > 0
    for name in ("confusion_matrix.png", "attention_maps.png", "last.pt", "best.pt"):
        assert (out / name).stat().st_size > 0, name
    # checkpoints hold only weights_only-loadable data
    ckpt = torch.load(out / "last.pt", weights_only=True)
    for key in ("model", "loss_centers", "optimizer", "scheduler", "scaler", "epoch",
                "global_step", "best_metric", "args", "rng"):  # fmt: skip
        assert key in ckpt, key
    assert ckpt["epoch"] == 2 and isinstance(ckpt["args"], dict)
    assert torch.equal(ckpt["loss_centers"], ckpt["model"]["criterion.affinity.centers"])
    # best.pt is what people ship: the weights and what inference needs, no optimizer (a third of last.pt)
    best = torch.load(out / "best.pt", weights_only=True)
    assert not {"optimizer", "scheduler", "scaler", "rng", "history"} & set(best)
    assert best["class_names"] == m["class_names"] and best["args"]["data"] == "synthetic"
    assert best["preprocessing"]["image_size"] == m["config"]["image_size"]
    assert (out / "best.pt").stat().st_size < 0.4 * (out / "last.pt").stat().st_size
    # ... and the same model as model.safetensors + config.json, which load_model reads
    released, info = recipe_model.load_model(out)
    ours, _ = recipe_model.load_model(out / "best.pt")
    assert info.class_names == tuple(m["class_names"]) and info.data == "synthetic" and info.synthetic
    for (k, a), (k2, b) in zip(released.state_dict().items(), ours.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


def test_eval_only_reproduces_the_last_epoch(tmp_path):
    out = tmp_path / "run"
    m = run(out, *SYNTH, "--val-fraction", "0")  # no validation: final = last epoch
    assert m["final"]["epoch"] == m["last"]["epoch"] == 1
    e = train_dan.main(
        [
            *TINY,
            *SYNTH,
            "--eval-only",
            "--checkpoint",
            str(out / "last.pt"),
            "--out",
            str(tmp_path / "eval"),
        ]  # fmt: skip
    )
    assert e["final"]["confusion_matrix"] == m["last"]["confusion_matrix"]
    assert (tmp_path / "eval" / "metrics.json").exists()


def test_eval_only_authors_checkpoint(tmp_path):
    torch.manual_seed(0)
    state = recipe_model.to_official_state_dict(recipe_model.DAN(num_classes=7, num_heads=2))  # their key names
    path = tmp_path / "rafdb_epoch1_acc0.9.pth"
    torch.save({"iter": 1, "model_state_dict": state}, path)
    m = train_dan.main([*TINY, *SYNTH, "--eval-only", "--checkpoint", str(path),
                        "--out", str(tmp_path / "eval"), "--plots", "--viz-faces", "2"])  # fmt: skip
    assert m["final"]["samples"] == 14 and m["final"]["epoch"] == 1
    assert m["final"]["checkpoint_kind"].startswith("authors'")
    for name in ("metrics.json", "confusion_matrix.png", "attention_maps.png"):
        assert (tmp_path / "eval" / name).exists()
    del state["cat_head1.ca.attention.3.bias"]
    torch.save({"model_state_dict": state}, path)
    with pytest.raises(utils.CheckpointError, match=r"cat_head1\.ca\.attention\.3\.bias"):
        train_dan.main([*TINY, *SYNTH, "--eval-only", "--checkpoint", str(path),
                        "--out", str(tmp_path / "eval"), "--overwrite"])  # fmt: skip


def test_resume_rejects_a_wrong_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}}, out / "last.pt")
    with pytest.raises(utils.RecipeError, match="not a train_dan.py checkpoint"):
        run(out, *SYNTH, "--resume")
    (out / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(utils.CheckpointError, match="cannot read checkpoint"):
        run(out, *SYNTH, "--resume")


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    args = [*SYNTH, "--epochs", "3", "--scheduler", "cosine", "--warmup-epochs", "0.5",
            "--affinity", "affinity", "--partition", "official", "--num-centers", "8"]  # fmt: skip
    full = run(tmp_path / "full", *args)

    # the same run, interrupted (Ctrl-C) in the middle of epoch 3 ...
    real_update = train.RunningMetrics.update
    calls = {"n": 0}

    def interrupting_update(*a, **k):
        if torch.is_grad_enabled():  # a training step (evaluation runs under no_grad)
            calls["n"] += 1
            if calls["n"] == 2 * 3 + 2:  # 3 steps per epoch: second step of epoch 3
                raise KeyboardInterrupt
        return real_update(*a, **k)

    monkeypatch.setattr(train.RunningMetrics, "update", interrupting_update)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", *args)
    monkeypatch.setattr(train.RunningMetrics, "update", real_update)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 2

    # ... then resumed: bit-identical weights, centres, optimizer state and metrics
    resumed = run(tmp_path / "cut", *args, "--resume")
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["loss_centers"], b["loss_centers"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, sa in a["optimizer"]["state"].items():
        for name, va in sa.items():  # AdamW: step, exp_avg, exp_avg_sq
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(b["optimizer"]["state"][i][name]))
    assert a["scheduler"] == b["scheduler"] and a["global_step"] == b["global_step"]
    assert resumed["final"]["confusion_matrix"] == full["final"]["confusion_matrix"]
    assert [e["train"]["loss"] for e in resumed["epochs"]] == [e["train"]["loss"] for e in full["epochs"]]


def test_stop_after_epoch_then_resume(tmp_path):
    out = tmp_path / "run"
    part = run(out, *SYNTH, "--epochs", "2", "--stop-after-epoch", "1")
    assert part["complete"] is False and len(part["epochs"]) == 1
    done = run(out, *SYNTH, "--epochs", "2", "--resume", "--lr", "0.5")  # --lr is ignored
    assert done["complete"] is True and [e["epoch"] for e in done["epochs"]] == [1, 2]
    assert done["config"]["lr"] != 0.5 and done["config_sources"]["lr"] == "checkpoint"


def test_backbone_weights_flag_and_loss_switches(tmp_path):
    trunk = recipe_model.ResNet18Features()
    state = dict(trunk.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18_msceleb.pth"
    torch.save({"state_dict": state}, path)
    m = run(tmp_path / "run", *SYNTH, "--backbone-weights", str(path), "--affinity", "center",
            "--partition", "none", "--num-heads", "1", "--amp")  # fmt: skip
    assert m["backbone_weights_report"]["dropped"] == ["fc.bias", "fc.weight"]
    assert m["backbone_weights_report"]["missing"] == []
    assert m["epochs"][0]["train"]["partition"] == 0.0
    assert any("amp torch.bfloat16" in t for t in m["tricks"])
    del state["layer1.0.conv1.weight"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(utils.CheckpointError, match=r"layer1\.0\.conv1\.weight"):
        run(tmp_path / "run2", *SYNTH, "--backbone-weights", str(path))


def test_head_overlap_and_norm_are_logged_every_epoch(tmp_path, capsys):
    # the evidence issue's measures: validation maps' head overlap and the heads' feature norm
    m = run(tmp_path / "run", *SYNTH, "--epochs", "2", "--partition-normalize")
    for e in m["epochs"]:
        assert 0.0 <= e["val"]["head_overlap"] <= 1.0 and e["val"]["head_norm"] > 0
    assert 0.0 <= m["final"]["head_overlap"] <= 1.0
    assert any("partition loss paper (normalized)" in t for t in m["tricks"])
    epoch_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[epoch")]
    assert len(epoch_lines) == 2 and all(" overlap " in line and " head norm " in line for line in epoch_lines)


def test_head_measures_equal_a_direct_computation():
    import dan_layers
    import dan_layers.functional as DF

    torch.manual_seed(0)
    net = train.DANTraining(recipe_model.DAN(num_classes=3, num_heads=2), dan_layers.DANLoss(3, 512)).eval()
    metrics = train.RunningMetrics(3, torch.device("cpu"))
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        metrics.update(net(x, y, details=True), y)
        _, maps = net.model.head.attention(net.model.backbone(x), return_attention=True)
        raw = net.model.head.attention(net.model.backbone(x))
    summary = metrics.summary(train.Dist())
    assert summary["head_overlap"] == pytest.approx(float(DF.head_overlap(maps)), rel=1e-6)
    assert summary["head_norm"] == pytest.approx(float(raw.norm(dim=-1).mean()), rel=1e-5)
    one = train.RunningMetrics(3, torch.device("cpu"))
    single = train.DANTraining(recipe_model.DAN(num_classes=3, num_heads=1), dan_layers.DANLoss(3, 512)).eval()
    with torch.no_grad():
        one.update(single(x, y, details=True), y)
    assert one.summary(train.Dist())["head_overlap"] is None  # undefined for one head


def test_training_module_holds_the_model_and_its_criterion():
    import dan_layers

    torch.manual_seed(1)
    cfg, _ = config.resolve_config(["--num-heads", "2", "--partition", "official", "--partition-normalize",
                                    "--lambda-af", "0.5"])  # fmt: skip
    net = train.build_model_with_losses(cfg, 4).train()
    assert type(net) is train.DANTraining and isinstance(net.criterion, dan_layers.DANLoss)
    assert type(net.model) is recipe_model.DAN and isinstance(net.model.head, dan_layers.DANHead)
    assert set(k for k in net.state_dict() if not k.startswith("model.")) == {"criterion.affinity.centers"}
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    out = net(x, y)
    net.load_state_dict(state)
    logits, fmap, heads = net.model(x)
    expected = net.criterion(logits, fmap, heads, y)
    torch.testing.assert_close(out["loss"], expected.loss)
    partition = dan_layers.PartitionLoss("official", normalize=True)(heads).detach()
    torch.testing.assert_close(out["partition"], partition)
    # checkpoints written before 0.2 named the centres affinity.centers: they load, moved
    old = {("affinity.centers" if k == "criterion.affinity.centers" else k): v for k, v in state.items()}
    fresh = train.build_model_with_losses(cfg, 4)
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh.criterion.affinity.centers, state["criterion.affinity.centers"])


def test_dan_keeps_the_state_dict_keys_it_always_had():
    model = recipe_model.DAN(num_classes=3, num_heads=2)
    keys = list(model.state_dict())
    assert {k.split(".")[0] for k in keys} == {"backbone", "attention", "fusion"}
    assert "attention.spatial.conv1x1.0.weight" in keys and "fusion.fc.weight" in keys
    assert not any(k.startswith("head.") for k in keys)
    other = recipe_model.DAN(num_classes=3, num_heads=2)
    other.load_state_dict(model.state_dict())  # the flat keys load ...
    nested = {
        ("head." + k if k.startswith(("attention.", "fusion.")) else k): v
        for k, v in model.state_dict().items()
    }
    other.load_state_dict(nested)  # ... and so do the module's own names
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


# ----------------------------------------------------------------------------------------
# Real-data readers (tiny trees from conftest.py)
# ----------------------------------------------------------------------------------------


def test_rafdb_run_skips_corrupt_images(tmp_path, make_rafdb_tree):
    root = make_rafdb_tree(tmp_path, 21, n_test=7, corrupt=2, columns=3)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        m = run(tmp_path / "run", "--preset", "rafdb", "--data-root", str(root))
    _check_metrics(m, 7)
    assert m["config"]["optimizer"] == "sgd" and m["config"]["num_centers"] == 8
    e = m["epochs"][0]
    assert e["train"]["samples"] + e["val"]["samples"] == 21 - 2  # both corrupt files skipped
    assert m["final"]["samples"] == 7


def test_affectnet_seven_classes_balanced(tmp_path, make_affectnet_tree):
    root = make_affectnet_tree(tmp_path, 2)
    m = run(tmp_path / "run", "--data", "affectnet", "--data-root", str(root),
            "--num-classes", "7", "--lr", "1e-3")  # fmt: skip
    _check_metrics(m, 7)
    assert "Contempt" not in m["class_names"]
    assert m["config"]["balanced_sampler"] is True and m["config"]["optimizer"] == "adam"
    assert m["final"]["samples"] == 14  # the val folder, Contempt dropped


def test_imagefolder_run(tmp_path, make_imagefolder_tree):
    root = make_imagefolder_tree(tmp_path, 4)
    m = run(tmp_path / "run", "--data", "imagefolder", "--data-root", str(root),
            "--no-balanced-sampler", "--augment", "none")  # fmt: skip
    _check_metrics(m, 3)
    assert m["class_names"] == ["Angry", "Happy", "Neutral"]
    assert m["final"]["samples"] == 12


# ----------------------------------------------------------------------------------------
# torchrun: 2 CPU processes, gloo
# ----------------------------------------------------------------------------------------


def test_torchrun_two_processes_keep_centres_identical(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(EXAMPLES / "train_dan.py"), *TINY, *SYNTH, "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["ddp"]["world_size"] == 2 and m["env"]["batch_size_per_rank"] == 4
    hashes = m["ddp"]["centers_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1] and hashes[0] is not None
    assert m["ddp"]["model_sha256"][0] == m["ddp"]["model_sha256"][1]
    assert m["final"]["samples"] == 14  # every test face counted once over both ranks
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert train._sha256({"c": ckpt["loss_centers"]}) == hashes[0]
    assert len(ckpt["rng"]) == 2
