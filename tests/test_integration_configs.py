"""The shipped integration configs build with mmengine's Runner and train one iteration on fixture data."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from arnn_plugins.engine import build_runner, checkpoint_loading, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def _one_iteration(cfg, tmp_path, loop_overrides=None):
    """Train ``cfg`` for one iteration; returns the runner and the parameters before training."""
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=1, **(loop_overrides or {}))
    for key in ("val_dataloader", "val_cfg", "val_evaluator"):
        cfg.pop(key, None)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1, by_epoch=False)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.log_processor = dict(by_epoch=False)
    cfg.log_level = "WARNING"
    for key in ("train_dataloader", "test_dataloader"):
        if cfg.get(key):
            cfg[key].num_workers = 0
            cfg[key].pop("persistent_workers", None)
    runner = build_runner(cfg, work_dir=str(tmp_path / "wd"), device="cpu")
    before = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    with checkpoint_loading():
        runner.train()
    assert runner.iter == 1 and (tmp_path / "wd" / "iter_1.pth").is_file()
    return runner, before


def _changed(runner, before, prefix):
    after = runner.model.state_dict()
    return [k for k in before if k.startswith(prefix) and before[k].is_floating_point()
            and not torch.equal(before[k], after[k])]


def write_fake_cifar100(root, n_train=8, n_test=4):
    """A CIFAR-100 folder in torchvision's format (pickled dicts of uint8 rows, read with latin1 keys)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.randint(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": [int(i) % 100 for i in range(n)], "coarse_labels": [0] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    return root


@pytest.mark.parametrize("config, arnn", [("cifar100_resnet18_cbam_arnn.py", True),
                                          ("cifar100_resnet18_cbam.py", False)])
def test_cifar100_configs_train_one_iteration(tmp_path, config, arnn):
    root = write_fake_cifar100(tmp_path / "cifar")
    cfg = load_config(os.path.join(CONFIGS, config), {"data_root": str(root),
                                                      "train_dataloader.batch_size": 4})
    # Fixture files cannot match the published checksums.
    for key in ("train_dataloader", "val_dataloader"):
        cfg[key].dataset.update(root=str(root), verify=False)
    runner, before = _one_iteration(cfg, tmp_path)
    names = [n for n, _ in runner.model.named_modules()]
    assert any(n.endswith("spatial.arnn") for n in names) == arnn
    assert runner.model.net.conv1.stride == (1, 1)
    assert _changed(runner, before, "net.conv1")
    if arnn:
        assert _changed(runner, before, "net.layer1.0.se.spatial.arnn") or _changed(runner, before, "net.layer1.0")
    ds = runner.train_dataloader.dataset
    assert len(ds) == 8 and ds[0]["inputs"].shape == (3, 32, 32)


def test_cifar100_missing_folder_is_a_clear_error(tmp_path):
    from arnn_plugins.engine import CIFAR100Dict

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        CIFAR100Dict(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        CIFAR100Dict(str(tmp_path), verify=False)


def write_vqa_fixture(tmp_path, c=8, h=4, w=4):
    questions = {"questions": [
        {"image_id": 11, "question": "How many dogs are there?", "question_id": 110},
        {"image_id": 11, "question": "What color is the dog?", "question_id": 111},
        {"image_id": 12, "question": "Is it raining?", "question_id": 120},
        {"image_id": 13, "question": "How many cats?", "question_id": 130},
    ]}

    def ans(lst, mc):
        return {"answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(lst)],
                "multiple_choice_answer": mc}

    annotations = {"annotations": [
        dict(question_id=110, image_id=11, **ans(["2"] * 3 + ["3"] * 7, "3")),
        dict(question_id=111, image_id=11, **ans(["brown"] * 9 + ["white"], "brown")),
        dict(question_id=120, image_id=12, **ans(["no"] * 10, "no")),
        dict(question_id=130, image_id=13, **ans(["2"] * 6 + ["1"] * 4, "2")),
    ]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    fdir = tmp_path / "features"
    fdir.mkdir()
    for i in (11, 12, 13):
        np.save(fdir / f"{i}.npy", np.random.RandomState(i).randn(c, h, w).astype(np.float32))
    return tmp_path


def test_mcb_arnn_config_trains_and_evaluates(tmp_path):
    root = write_vqa_fixture(tmp_path)
    q, a, f = str(root / "q.json"), str(root / "a.json"), str(root / "features")
    cfg = load_config(os.path.join(CONFIGS, "mcb_arnn.py"), {
        "model.img_channels": 8, "model.num_answers": 6, "model.vocab_size": 30, "model.mcb_dim": 128,
        "model.att_hidden": 8, "model.embed_dim": 8, "model.hidden_size": 8,
        "model.arnn_kwargs.hidden_channels": 4,
    })
    for key in ("train_dataloader", "test_dataloader"):
        ds = cfg[key].dataset
        ds.update(questions=q, annotations=a, features=f, vocab_questions=q, vocab_annotations=a,
                  num_answers=6, vocab_size=30)
        cfg[key].batch_size = 4
    runner, before = _one_iteration(cfg, tmp_path)
    assert type(runner.model.vqa.attention).__name__ != "MCBGlimpseAttention"  # swapped for ARNN
    assert _changed(runner, before, "vqa.attention")
    with checkpoint_loading():
        metrics = runner.test()
    assert 0.0 <= metrics["vqa/accuracy"] <= 1.0


def write_celeba_fixture(root, n=6):
    from PIL import Image

    names = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Male", "Smiling"]
    img_dir = root / "img_align_celeba"
    img_dir.mkdir(parents=True)
    rows = []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(np.full((54, 44, 3), 40 * i, np.uint8)).save(img_dir / name)
        hair = [-1, -1, -1]
        hair[i % 3] = 1
        rows.append((name, hair + [1 if i % 2 else -1, -1 if i % 2 else 1]))
    lines = [str(n), " ".join(names)] + [nm + "".join(f"{v:>3d}" for v in vals) for nm, vals in rows]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(f"{nm} 0" for nm, _ in rows) + "\n")
    return root


def test_mgan_arnn_config_updates_both_players(tmp_path):
    root = write_celeba_fixture(tmp_path / "celeba")
    cfg = load_config(os.path.join(CONFIGS, "mgan_arnn.py"), {
        "data_root": str(root), "image_size": 16, "model.image_size": 16, "model.base": 8,
        "model.n_res_encoder": 1, "model.n_res_transformer": 1, "model.d_base": 8,
        "model.arnn_kwargs.hidden_channels": 4,
        "train_dataloader.batch_size": 3, "train_dataloader.dataset.image_size": 16,
        "train_dataloader.dataset.crop_size": 40,
    })
    cfg.train_dataloader.dataset.root = str(root)
    runner, before = _one_iteration(cfg, tmp_path)
    from arnn_plugins import AttentionRNN
    from arnn_plugins.models.modular_gan import LocalMask

    mods = list(runner.model.modules())
    assert sum(isinstance(m, AttentionRNN) for m in mods) == 3  # one mask per attribute module
    assert not any(isinstance(m, LocalMask) for m in mods)
    assert _changed(runner, before, "gan.discriminator") and _changed(runner, before, "gan.encoder")
    ck = torch.load(tmp_path / "wd" / "iter_1.pth", map_location="cpu", weights_only=False)
    assert set(ck["optimizer"]) == {"generator", "discriminator"}


def test_mmdet_retinanet_config_reads_with_arnn_plugins():
    cfg = load_config(os.path.join(CONFIGS, "mmdet_retinanet_r50_arnn.py"))
    plugins = cfg.model.backbone.plugins
    assert plugins[0]["cfg"]["type"] == "AttentionRNN" and plugins[0]["stages"] == (False, True, True, True)


@pytest.mark.parametrize("config, kind", [("pan_mbg_arnn.py", "AttentionRNN"), ("pan_mbg_ctx.py", "LocalAttention")])
def test_pan_mbg_configs_train_one_iteration(tmp_path, config, kind):
    cfg = load_config(os.path.join(CONFIGS, config))
    for key, n in (("train_dataloader", 8), ("test_dataloader", 4)):
        cfg[key].dataset.length = n
        cfg[key].dataset.cache_dir = None
        cfg[key].batch_size = 4
    runner, before = _one_iteration(cfg, tmp_path)
    pan = runner.model.pan
    assert pan.readout == "pool" and {type(m).__name__ for m in pan.attention.values()} == {kind}
    ds = runner.train_dataloader.dataset
    assert ds.options["num_digits"] == (2, 3) and ds.options["scale_range"] == (1.5, 3.0)
    assert _changed(runner, before, "pan.attention.")
