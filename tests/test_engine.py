"""The train / eval / show / demo / reproduce commands and the mmengine glue, on tiny configs."""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from arnn_plugins.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TINY = os.path.join(CONFIGS, "pan_tiny.py")


def _scalars(work_dir):
    """The last validation record mmengine logged in ``work_dir``."""
    recs = []
    for dirpath, _, files in os.walk(work_dir):
        if "scalars.json" in files:
            with open(os.path.join(dirpath, "scalars.json")) as f:
                recs += [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if "pan/accuracy" in r][-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """pan_tiny trained for 6 iterations (checkpoints at 3 and 6)."""
    wd = tmp_path_factory.mktemp("train")
    assert main(["train", TINY, "--work-dir", str(wd), "--device", "cpu"]) == 0
    return wd


def test_train_writes_checkpoints_and_logs_metrics(trained):
    assert (trained / "iter_3.pth").is_file() and (trained / "iter_6.pth").is_file()
    assert (trained / "last_checkpoint").read_text().strip().endswith("iter_6.pth")
    ck = torch.load(trained / "iter_6.pth", map_location="cpu", weights_only=False)
    assert ck["meta"]["iter"] == 6
    assert any(k.startswith("pan.attention.") for k in ck["state_dict"])  # the ARNN layers were trained
    rec = _scalars(trained)
    assert 0.0 <= rec["pan/accuracy"] <= 1.0 and 0.0 < rec["pan/correctness"] < 1.0


def test_eval_on_the_train_checkpoint_gives_the_logged_metric(trained, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["eval", TINY, str(trained / "iter_6.pth"), "--work-dir", str(tmp_path / "e"), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    logged = _scalars(trained)
    assert got["pan/accuracy"] == pytest.approx(logged["pan/accuracy"], abs=1e-6)
    assert got["pan/correctness"] == pytest.approx(logged["pan/correctness"], abs=1e-4)
    assert "pan/accuracy" in capsys.readouterr().out
    # Another checkpoint gives other masks, so correctness must change.
    out3 = tmp_path / "m3.json"
    argv = ["eval", TINY, str(trained / "iter_3.pth"), "--work-dir", str(tmp_path / "e3"), "--out", str(out3)]
    assert main(argv) == 0
    assert json.loads(out3.read_text())["pan/correctness"] != got["pan/correctness"]


def test_resume_continues_the_iteration_counter(trained, tmp_path):
    import shutil

    wd = tmp_path / "resume"
    shutil.copytree(trained, wd)
    assert main(["train", TINY, "--work-dir", str(wd), "--resume", "--cfg-options", "train_cfg.max_iters=8"]) == 0
    ck = torch.load(wd / "iter_8.pth", map_location="cpu", weights_only=False)
    assert ck["meta"]["iter"] == 8
    # Only iterations 7 and 8 ran: the step counts of Adam continue from 6.
    state = next(iter(ck["optimizer"]["state"].values()))
    assert int(state["step"]) == 8
    ck6 = torch.load(wd / "iter_6.pth", map_location="cpu", weights_only=False)
    assert int(next(iter(ck6["optimizer"]["state"].values()))["step"]) == 6


def test_cfg_options_change_the_model(tmp_path):
    wd = tmp_path / "ctx"
    assert main(["train", TINY, "--work-dir", str(wd), "--cfg-options", "model.attention=ctx",
                 "train_cfg.max_iters=2", "default_hooks.checkpoint.interval=2"]) == 0
    sd = torch.load(wd / "iter_2.pth", map_location="cpu", weights_only=False)["state_dict"]
    assert "pan.attention.0.context.weight" in sd  # LocalAttention's 3x3 context conv
    assert sd["pan.attention.0.context.weight"].shape[-1] == 3


def test_show_writes_masks_of_several_models_side_by_side(trained, tmp_path, capsys):
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    ck = str(trained / "iter_6.pth")
    assert main(["show", TINY, ck, "--out", str(one), "--num", "3"]) == 0
    assert main(["show", TINY, ck, TINY, str(trained / "iter_3.pth"), "--out", str(two), "--num", "3"]) == 0
    a, b = Image.open(one), Image.open(two)
    # pan_tiny has 3 attention layers: input + 3 layers + product = 5 columns, 9 with a second model,
    # each as wide as the others, beside a colour-bar margin of 160 px.
    column = (a.size[0] - 160) / 5
    assert (b.size[0] - a.size[0]) / 4 == pytest.approx(column, abs=1) and a.size[1] == b.size[1]
    arr = np.asarray(b.convert("RGB")).astype(int)
    assert arr.std() > 10  # not blank
    assert "ARNN" in capsys.readouterr().out


def test_build_model_loads_the_checkpoint_in_eval_mode(trained):
    from arnn_plugins.engine.runner import build_model, load_config

    ck = str(trained / "iter_6.pth")
    model = build_model(load_config(TINY), ck, device="cpu")
    sd = torch.load(ck, map_location="cpu", weights_only=False)["state_dict"]
    assert not model.training and next(model.parameters()).device.type == "cpu"
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    fresh = build_model(load_config(TINY))
    assert any(not torch.equal(v, sd[k]) for k, v in fresh.state_dict().items() if v.is_floating_point())


@pytest.mark.parametrize("argv, message", [
    (["train", "configs/no_such_config.py"], "config file not found"),
    (["train", TINY, "--cfg-options", "no_such_key=1"], "no top-level key 'no_such_key'"),
    (["train", TINY, "--cfg-options", "model.type=NoSuchModel"], "NoSuchModel is not in"),
    (["eval", TINY, "no_such.pth"], "checkpoint not found"),
    (["show", TINY, "no_such.pth"], "checkpoint not found"),
    (["show", TINY], "CONFIG CHECKPOINT pairs"),
    (["show", TINY, "no_such.pth", "--device", "tpu"], "--device must be cpu or cuda"),
    (["reproduce", "--scale", "tiny", "--device", "tpu"], "--device must be cpu or cuda"),
    (["train", TINY, "--device", "cpu", "--amp"], "--amp needs a CUDA device"),
    (["demo", "--quick", "--threads", "0"], "--threads must be >= 1"),
    (["demo", "--quick", "--jobs", "0"], "--jobs must be >= 1"),
    (["train", TINY, "--cfg-options", "model.hiden_channels=3"], "did you mean 'hidden_channels'?"),
    (["train", TINY, "--cfg-options", "train_cfg.max_iter=3"], "did you mean 'max_iters'?"),
    (["train", TINY, "--cfg-options", "train_cfg.max_iters=-1"], "train_cfg.max_iters must be an int >= 1"),
])
def test_bad_config_or_option_exits_2_with_a_message(argv, message, tmp_path, capsys):
    code = main(argv + (["--work-dir", str(tmp_path)] if argv[0] == "train" else []))
    assert code == 2
    assert message in capsys.readouterr().err


def test_bad_config_file_and_malformed_option_exit_2(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("model = dict(type='PANModel'\n")
    assert main(["train", str(broken)]) == 2
    assert "could not read config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", TINY, "--cfg-options", "not_a_pair"])
    assert e.value.code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_reproduce_tiny_writes_tables_and_json(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["reproduce", "--tiny", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    # tiny: 3 kinds x 2 variants x 2 seeds for Table 1, 2 kinds x 2 seeds for the inverse task.
    assert len(runs) == 12 + 4
    assert {(r["group"], r["variant"]) for r in runs} == {("table1", "mref"), ("table1", "mbg"), ("inverse", "mbg")}
    assert {r["kind"] for r in runs} == {"san", "ctx", "arnn"}
    assert {r["seed"] for r in runs} == {0, 1}
    # Seeds give different data and models, so the spread is measured, not zero by construction.
    acc = {(r["group"], r["variant"], r["kind"], r["seed"]): r["correctness"] for r in runs}
    assert any(acc[k[:3] + (0,)] != acc[k[:3] + (1,)] for k in acc)
    for r in runs:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["correctness"] <= 1 and r["sec_per_step"] > 0
    # The curves along training, one plot per table part.
    assert sorted(p.name for p in out.glob("curves_*.png")) == [
        "curves_inverse_mbg.png", "curves_table1_mbg.png", "curves_table1_mref.png"]
    md = (out / "results.md").read_text()
    for word in ("Table 1", "Table 2", "Inverse", "SAN", "CTX", "ARNN", "MREF", "MBG", "±", "0.5-1", "[87.4]",
                 "| query-blind |", "per layer, first to last"):
        assert word in md
    # Per-layer correctness: one value per attention layer (SAN has one, CTX / ARNN one per stack).
    nl = {r["kind"]: sum(k.startswith("correctness_l") for k in r) for r in runs}
    assert nl == {"san": 1, "ctx": 3, "arnn": 3}
    san = [r for r in runs if r["kind"] == "san"]
    assert all(r["correctness_l1"] == pytest.approx(r["correctness"], abs=1e-6) for r in san)
    assert set(res["baselines"]) == {"table1/mref/0", "table1/mref/1", "table1/mbg/0", "table1/mbg/1",
                                     "inverse/mbg/0", "inverse/mbg/1"}
    assert set(res["uniform_correctness"]) == set(res["baselines"])
    assert all(0 < v < 1 for v in res["uniform_correctness"].values())
    assert "| uniform mask |" in md
    assert "Table 1" in capsys.readouterr().out
    # A second call finds every run done and trains nothing.
    before = (out / "results.json").read_text()
    assert main(["reproduce", "--tiny", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == json.loads(before)["runs"]


def test_plateau_line_counts_the_seeds_above_the_blind_level_per_kind():
    from arnn_plugins.experiments.demo import plateau_line

    arnn = {0: {"accuracy": 0.88}, 1: {"accuracy": 0.66}, 2: {"accuracy": 0.87}}
    ctx = {0: {"accuracy": 0.29}, 1: {"accuracy": 0.76}, 2: {"accuracy": 0.416}}  # seed 2 at the level: not above
    assert plateau_line({"ARNN": arnn, "CTX": ctx}, (0, 1, 2), 0.416) == (
        "left the query-blind plateau (accuracy above the blind level): ARNN in 3/3 seeds, CTX in 1/3")
    assert plateau_line({"ARNN": arnn, "CTX": ctx}, (1,), 0.7).endswith("ARNN in 0/1 seeds, CTX in 1/1")


def test_demo_trains_both_kinds_per_seed_prints_spreads_writes_files(tmp_path, capsys):
    from arnn_plugins.experiments.demo import plateau_line, run_pan_demo

    out = tmp_path / "demo.png"
    wd = tmp_path / "wd"
    threads = torch.get_num_threads()
    res = run_pan_demo(out=str(out), work_dir=str(wd), progress=False, show_items=2, seeds=(0, 1), jobs=1,
                       outline_steps=2, size=32, n_train=32, n_test=16, iters=2, batch=8)
    assert torch.get_num_threads() == threads  # the runs' thread setting does not leak out
    text = capsys.readouterr().out
    assert "accuracy" in text and "mask corr." in text and "s/step" in text and "seeds [0, 1]" in text
    # Every figure with its spread over seeds; one per-layer correctness per attention layer (32 px: 4 maps).
    pan_part = text.split("PAN on", 1)[1]
    rows = [line for line in pan_part.splitlines() if line.startswith(("ctx ", "arnn "))]
    assert len(rows) == 2 and all(row.count(" / ") == 3 and row.count("±") == 3 + 4 for row in rows)
    assert "with 2-3 digits" in text and "query a colour, answer the digit" in text
    assert "masks starting at 0.88" in text  # the demo's masks start open
    assert "masks starting at 0.88, the query also scaling the features attention reads)" in text
    assert re.search(r"^blind\s+\d+\.\d%\s+0\.\d{3}\s", text, re.M)
    assert re.search(r"mask correctness higher in \d/2 seeds, accuracy higher in \d/2", text)
    blind = json.loads((wd / "results.json").read_text())["blind_accuracy"]
    assert plateau_line({"ARNN": res["arnn"]["per_seed"], "CTX": res["ctx"]["per_seed"]}, (0, 1), blind) in text
    assert set(res) == {"ctx", "arnn"} and all(r["sec_per_step"] > 0 for r in res.values())
    assert set(res["arnn"]["per_seed"]) == {0, 1} and "accuracy_sd" in res["arnn"]
    assert Image.open(out).size[0] > 32 * 2 * 9  # input + (4 layers + product) x 2 models
    for kind in ("ctx", "arnn"):
        for seed in (0, 1):
            assert (wd / f"{kind}_s{seed}" / "iter_2.pth").is_file() and (wd / f"{kind}_s{seed}" / "config.py").is_file()
    # The curves along training, per kind and seed: step 0, then every interval, the last step included.
    curves = json.loads((wd / "curves.json").read_text())
    assert curves["task"] == "digit" and curves["interval"] == 1
    assert sorted((r["kind"], r["seed"]) for r in curves["runs"]) == [("arnn", 0), ("arnn", 1), ("ctx", 0), ("ctx", 1)]
    for run in curves["runs"]:
        assert [p["step"] for p in run["points"]] == [0, 1, 2]
        p = run["points"][-1]
        assert len(p["layer_correctness"]) == len(p["layer_entropy"]) == 4 and 0 <= p["accuracy"] <= 1
        assert set(p["grad_norm"]) == {"attention", "backbone", "head"}
    final = json.loads((wd / "results.json").read_text())
    assert len(final["runs"]) == 4 and final["seeds"] == [0, 1]
    # The files and the command that redraws the masks.
    show = text.split("arnn-plugins show ", 1)[1].splitlines()[0].split()
    assert show[:4] == [str(wd / "ctx_s0" / "config.py"), str(wd / "ctx_s0" / "iter_2.pth"),
                        str(wd / "arnn_s0" / "config.py"), str(wd / "arnn_s0" / "iter_2.pth")]
    assert main(["show", *show[:4], "--out", str(tmp_path / "again.png"), "--num", "2"]) == 0
    assert str(wd / "curves.json") in text
    assert Image.open(tmp_path / "demo_curves.png").size[0] > 400
    from arnn_plugins.experiments.plots import read_curves

    assert set(read_curves(str(wd))) == {"ctx", "arnn"} and set(read_curves(str(wd))["arnn"]) == {"0", "1"}
    # The outline-fill part: its table with spreads, per-seed comparison and picture.
    outline_part = text.split("Outline fill", 1)[1].split("PAN on", 1)[0]
    assert re.search(r"^arnn\s+\d\.\d{3} ± \d\.\d{3}", outline_part, re.M) and "IoU higher in" in outline_part
    assert Image.open(tmp_path / "demo_outline.png").size[0] > 4 * 24
    assert len(final["outline"]["runs"]) == 4


def test_a_demo_run_sets_its_own_threads(tmp_path):
    """A run's figures do not depend on the caller's thread count (the run sets its own)."""
    import dataclasses

    from arnn_plugins.experiments.demo import _train
    from arnn_plugins.experiments.recipes import DEMO_SCALES, pan_config

    sc = dataclasses.replace(DEMO_SCALES["quick"], size=32, n_train=32, n_test=16, iters=3, batch=8)
    threads = torch.get_num_threads()
    got = []
    try:
        for caller in (1, 2):
            torch.set_num_threads(caller)
            cfg = pan_config("arnn", sc, task="digit", seed=0, work_dir=str(tmp_path / str(caller)),
                             cache_dir=None, progress=False, checkpoint=False, curve_interval=1, curve_items=16)
            got.append(_train(cfg.to_dict(), 1, "cpu"))
    finally:
        torch.set_num_threads(threads)
    assert [p["loss"] for p in got[0]["curve"][1:]] == [p["loss"] for p in got[1]["curve"][1:]]
    a, b = got[0]["metrics"], got[1]["metrics"]
    timing = ("sec_per_step", "train_s")
    same = lambda m: json.dumps({k: v for k, v in m.items() if k not in timing}, sort_keys=True)  # noqa: E731
    assert same(a) == same(b)  # bit for bit (NaN buckets included)


def test_pan_metric_buckets_and_model_modes():
    from arnn_plugins.engine import PANMetric, PANModel

    m = PANMetric()
    m.process(None, [dict(pred=1, answer=1, correctness=0.5, layer_correctness=[0.2, 0.9], scale=0.7),
                     dict(pred=0, answer=1, correctness=0.1, layer_correctness=[0.4, 0.3], scale=0.9),
                     dict(pred=2, answer=2, correctness=0.3, layer_correctness=[0.0, 0.6], scale=3.0)])
    got = m.evaluate(3)
    assert got["pan/accuracy"] == pytest.approx(2 / 3)
    assert got["pan/correctness"] == pytest.approx(0.3)
    assert got["pan/correctness_l1"] == pytest.approx(0.2) and got["pan/correctness_l2"] == pytest.approx(0.6)
    assert "pan/correctness_l3" not in got
    assert got["pan/acc_scale_0.5-1"] == pytest.approx(0.5)
    assert got["pan/acc_scale_2.5-3"] == 1.0  # the top edge belongs to the last bucket
    assert np.isnan(got["pan/acc_scale_1-1.5"])
    torch.manual_seed(0)
    model = PANModel("ctx", image_size=16, channels=4, num_stacks=2, hidden_channels=2)
    x, q, a = torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 4])
    mask = torch.zeros(3, 16, 16, dtype=torch.bool)
    mask[:, :8] = True
    loss = model(x, q, a, mask, torch.ones(3), mode="loss")["loss"]
    logits, masks = model(x, q, mode="tensor")
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, a).item(), rel=1e-5)
    preds = model(x, q, a, mask, torch.ones(3), mode="predict")
    assert [p["pred"] for p in preds] == logits.argmax(1).tolist()
    assert 0 < preds[0]["correctness"] < 1
    # Each layer's own correctness is that mask alone against the target; the product's is the paper's metric.
    from arnn_plugins.models.pan import mask_correctness

    assert len(preds[0]["layer_correctness"]) == len(masks) == 2
    for k, m_k in enumerate(masks):
        want = mask_correctness([m_k], mask)
        assert [p["layer_correctness"][k] for p in preds] == pytest.approx(want.tolist(), abs=1e-6)
    lc = torch.tensor([p["layer_correctness"] for p in preds])
    assert not torch.allclose(lc[:, 0], torch.tensor([p["correctness"] for p in preds]))
    with pytest.raises(ValueError, match="mode"):
        model(x, q, mode="nope")


def test_multidigit_tensors_cache_round_trip(tmp_path):
    from arnn_plugins.engine import MultiDigitTensors

    a = MultiDigitTensors("mref", "test", 4, cache_dir=str(tmp_path), size=32, seed=3)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".pt")
    b = MultiDigitTensors("mref", "test", 4, cache_dir=str(tmp_path), size=32, seed=3)
    c = MultiDigitTensors("mref", "test", 4, cache_dir=None, size=32, seed=4)
    assert torch.equal(a[2]["image"], b[2]["image"]) and not torch.equal(a[2]["image"], c[2]["image"])
    assert a[0]["image"].shape == (3, 32, 32) and a[0]["mask"].dtype == torch.bool
    assert len(os.listdir(tmp_path)) == 1


def test_reproduce_scales_cover_the_papers_tables():
    from arnn_plugins.experiments import INVERSE_KINDS, SCALES, TABLE1_KINDS

    for name in ("small", "full"):
        sc = SCALES[name]
        assert sc.kinds == TABLE1_KINDS and sc.variants == ("mref", "mdist", "mbg")
        assert sc.inverse_kinds == INVERSE_KINDS and len(sc.seeds) >= 2
    assert SCALES["full"].size == 100 and SCALES["full"].n_train == 30000 and SCALES["full"].n_test == 10000
    # long: the small layout on MBG only (Table 2 and the inverse task need no other variant), trained longer.
    small, long = SCALES["small"], SCALES["long"]
    assert long.variants == ("mbg",) and long.kinds == TABLE1_KINDS and long.inverse_kinds == INVERSE_KINDS
    assert long.iters > small.iters and len(long.seeds) >= 2
    assert (long.size, long.n_train, long.num_digits, long.scale_range, long.readout) == (
        small.size, small.n_train, small.num_digits, small.scale_range, small.readout)
    # ... with the demo's masks, which start open.
    from arnn_plugins.experiments import DEMO_SCALES

    assert long.mask_bias == DEMO_SCALES["default"].mask_bias > 0
    # The demo's query FiLM is not in the long tables (they were measured without it).
    assert DEMO_SCALES["default"].query_film and not long.query_film


def test_query_film_reaches_the_model_and_the_headers():
    from mmengine.registry import MODELS

    import arnn_plugins.engine  # noqa: F401  (registers PANModel)
    from arnn_plugins.experiments import DEMO_SCALES, SCALES
    from arnn_plugins.experiments.recipes import pan_config, query_phrase

    demo = pan_config("ctx", DEMO_SCALES["quick"], task="digit", cache_dir=None)
    plain = pan_config("ctx", SCALES["tiny"], task="digit", cache_dir=None)
    assert demo.model["query_film"] is True and "query_film" not in plain.model
    model = MODELS.build(dict(demo.model, image_size=48))
    assert sorted(model.pan.query_film) == sorted(model.pan.attention) == ["0", "1", "2", "3"]
    assert len(MODELS.build(dict(plain.model)).pan.query_film) == 0
    assert query_phrase(True) == ", the query also scaling the features attention reads" and query_phrase(False) == ""


def test_reproduce_full_layout_runs_on_a_custom_scale(tmp_path):
    from dataclasses import replace

    from arnn_plugins.experiments import SCALES, reproduce

    # The paper's layout (100 px, 5-9 digits, flatten head) with sizes cut to seconds.
    sc = replace(SCALES["full"], n_train=8, n_test=8, iters=1, batch=4, seeds=(0,), kinds=("arnn",),
                 inverse_kinds=("ctx",))
    res = reproduce(sc, out=str(tmp_path), progress=False, log=lambda s: None, cache_dir=None)
    assert res["scale_name"] == "custom" and res["scale"]["size"] == 100
    assert [(r["group"], r["kind"]) for r in res["runs"]] == [("table1", "arnn")] * 3 + [("inverse", "ctx")]
    for r in res["runs"]:
        assert r["iters"] == 1 and sorted(k for k in r if k.startswith("correctness_l")) == [
            "correctness_l1", "correctness_l2", "correctness_l3", "correctness_l4"]  # 50, 25, 12, 6 px maps
    md = (tmp_path / "results.md").read_text()
    assert "100 px images with 5-9 digits at scales 0.5-3" in md and "readout `flatten`" in md
    from arnn_plugins.experiments.reproduce import format_tables

    assert "masks starting" not in md  # the tables say where masks start only when they do not start at 0.5
    assert "masks starting at 0.88" in format_tables(dict(res, scale=dict(res["scale"], mask_bias=2.0)))
    assert "the query also scaling" not in md
    assert "the query also scaling" in format_tables(dict(res, scale=dict(res["scale"], query_film=True)))
    # A larger plan on the same sizes trains only the new runs; the old ones come back as they were.
    trained = []
    more = replace(sc, seeds=(0, 1), inverse_kinds=())
    res2 = reproduce(more, out=str(tmp_path), progress=False, log=trained.append, cache_dir=None)
    assert len(trained) == 3 and all("seed 1" in line for line in trained)
    keep = [r for r in res["runs"] if r["group"] == "table1"]
    assert [r for r in res2["runs"] if r["seed"] == 0] == keep
    assert sorted((r["variant"], r["seed"]) for r in res2["runs"]) == [
        (v, s) for v in ("mbg", "mdist", "mref") for s in (0, 1)]
    # Other sizes in the same folder start afresh instead of mixing runs.
    trained.clear()
    res3 = reproduce(replace(more, iters=2, seeds=(0,), variants=("mbg",)), out=str(tmp_path), progress=False,
                     log=trained.append, cache_dir=None)
    assert len(trained) == 1 and [(r["variant"], r["iters"]) for r in res3["runs"]] == [("mbg", 2)]
    with pytest.raises(ValueError, match="reproduce: scale must be one of"):
        reproduce("huge", out=str(tmp_path))


def test_query_blind_accuracy_known_layouts():
    from types import SimpleNamespace

    import numpy as np

    from arnn_plugins.data import MultiDigitDataset
    from arnn_plugins.experiments import query_blind_accuracy

    class Layouts:
        """Fixed layouts in the shape MultiDigitDataset.sample gives them."""

        def __init__(self, task, items):
            self.task, self.items = task, items

        def __len__(self):
            return len(self.items)

        def sample(self, i):
            colours, classes, target = self.items[i]
            return SimpleNamespace(colours=np.array(colours), classes=np.array(classes), target=target)

    colour = Layouts("color", [
        ([0, 0, 1], [3, 4, 5], 0),  # target shares the majority colour: 1
        ([0, 0, 1], [3, 4, 5], 2),  # target is the odd one out: 0
        ([2, 3], [1, 2], 0),        # a tie of two colours: 1/2
    ])
    assert query_blind_accuracy(colour) == pytest.approx((1 + 0 + 0.5) / 3)
    digit = Layouts("digit", [([0, 1], [3, 4], 0), ([0, 1, 2], [3, 4, 5], 1)])  # 1/2 and 1/3
    assert query_blind_accuracy(digit) == pytest.approx((1 / 2 + 1 / 3) / 2)
    # With 2-3 digits per image it lies between 1/3 (three different colours) and 1.
    real = MultiDigitDataset("mref", "test", 8, size=32, seed=2, num_digits=(2, 3), scale_range=(1.0, 1.5))
    assert 1 / 3 <= query_blind_accuracy(real) <= 1


def test_uniform_mask_correctness_is_what_a_flat_mask_scores():
    from arnn_plugins.data import MultiDigitDataset
    from arnn_plugins.experiments import uniform_mask_correctness
    from arnn_plugins.models.pan import mask_correctness

    ds = MultiDigitDataset("mbg", "test", 6, size=32, seed=1, num_digits=(2, 3), scale_range=(1.0, 1.5))
    target = torch.stack([ds[i]["mask"] for i in range(len(ds))])
    flat = [torch.full((6, 1, 4, 4), 0.3), torch.full((6, 1, 2, 2), 0.7)]
    want = mask_correctness(flat, target).mean().item()
    assert uniform_mask_correctness(ds) == pytest.approx(want, rel=1e-5)
    assert uniform_mask_correctness(ds) == pytest.approx(target.float().mean().item(), rel=1e-5)
    assert 0 < want < 0.5


def test_pan_config_carries_digit_layout_and_readout():
    from arnn_plugins.data import MultiDigitDataset
    from arnn_plugins.experiments import SCALES, pan_config

    cfg = pan_config("ctx", SCALES["small"], size=32, cache_dir=None)
    data = dict(cfg.train_dataloader.dataset)
    assert cfg.model.readout == "pool" and cfg.model.image_size == 32
    assert tuple(data["num_digits"]) == (2, 3) and tuple(data["scale_range"]) == (1.5, 3.0)
    data.pop("type"), data.pop("cache_dir")
    ds = MultiDigitDataset(**dict(data, length=8))
    assert all(2 <= len(ds.sample(i).classes) <= 3 for i in range(8))
    # The full scale keeps the paper's layout and head.
    full = pan_config("ctx", SCALES["full"], cache_dir=None)
    assert tuple(full.train_dataloader.dataset.num_digits) == (5, 9) and full.model.readout == "flatten"
    assert tuple(full.train_dataloader.dataset.scale_range) == (0.5, 3.0)


@pytest.mark.parametrize("kind", ["arnn", "ctx"])
def test_config_files_are_the_recipe(kind):
    """configs/pan_mbg_<kind>.py and pan_config(kind, CONFIG_SCALE) describe the same run."""
    from arnn_plugins.engine import load_config
    from arnn_plugins.experiments import CONFIG_SCALE, pan_config
    from arnn_plugins.experiments.recipes import CONFIG_VAL

    path = os.path.join(os.path.dirname(__file__), "..", "configs", f"pan_mbg_{kind}.py")
    cfg = load_config(path).to_dict()
    code = pan_config(kind, CONFIG_SCALE, n_val=CONFIG_VAL).to_dict()
    # Where they may differ: logging, checkpoints and the work dir (what a run writes, not what it computes).
    for key in ("model", "train_dataloader", "val_dataloader", "test_dataloader", "train_cfg",
                "optim_wrapper", "param_scheduler", "randomness", "test_evaluator", "val_evaluator"):
        assert cfg[key] == code[key], key


def test_multidigit_tensors_match_the_generator():
    from arnn_plugins.data import MultiDigitDataset
    from arnn_plugins.engine import MultiDigitTensors

    t = MultiDigitTensors("mbg", "val", 3, cache_dir=None, size=32, seed=5)
    d = MultiDigitDataset("mbg", "val", 3, size=32, seed=5)
    for i in range(3):
        a, b = t[i], d[i]
        assert (a["image"] - b["image"]).abs().max() <= 0.5 / 255 + 1e-6
        assert int(a["query"]) == b["query"] and int(a["answer"]) == b["answer"]
        assert torch.equal(a["mask"], b["mask"]) and float(a["scale"]) == pytest.approx(b["scale"])


@pytest.mark.slow  # spawning workers re-imports torch and mmengine: about a minute here
def test_reproduce_in_two_worker_processes_matches_one(tmp_path):
    from arnn_plugins.experiments import SCALES, Scale, reproduce

    SCALES["_two"] = Scale(size=32, n_train=16, n_test=8, iters=1, batch=8, seeds=(0,), hidden=4, channels=8,
                           num_stacks=3, variants=("mref",), kinds=("ctx", "arnn"), inverse_kinds=())
    try:
        one = reproduce("_two", out=str(tmp_path / "one"), progress=False, log=lambda s: None,
                        cache_dir=str(tmp_path / "cache"))
        two = reproduce("_two", out=str(tmp_path / "two"), progress=False, log=lambda s: None,
                        cache_dir=str(tmp_path / "cache"), jobs=2)
    finally:
        del SCALES["_two"]
    key = lambda r: (r["kind"], r["seed"])  # noqa: E731
    a, b = sorted(one["runs"], key=key), sorted(two["runs"], key=key)
    # Same seeds, same data: the workers train the very same models.
    def rows(runs):
        return [(key(r), r["accuracy"], r["correctness"]) for r in runs]

    assert rows(a) == rows(b)


def test_shipped_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from arnn_plugins.engine.config import config_path, list_configs

    monkeypatch.chdir(tmp_path)
    assert {"pan_tiny", "pan_mbg_arnn", "pan_mbg_ctx", "mmdet_retinanet_r50_arnn"} <= set(list_configs())
    for name in ("pan_tiny", "pan_tiny.py", "configs/pan_tiny.py"):
        path = config_path(name)
        assert os.path.samefile(path, TINY), name
    with pytest.raises(FileNotFoundError, match=r"config file not found: pan_tinny .*pan_tiny"):
        config_path("pan_tinny")
    # A file of that name in the current folder wins over the shipped one.
    (tmp_path / "configs").mkdir()
    mine = tmp_path / "configs" / "pan_tiny.py"
    mine.write_text(open(TINY).read())
    assert os.path.samefile(config_path("configs/pan_tiny.py"), mine)


def test_train_console_shows_mmengine_tables_only_with_verbose(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    opts = ["--cfg-options", "train_cfg.max_iters=2", "train_cfg.val_interval=2"]
    assert main(["train", "pan_tiny", "--work-dir", "quiet", "--device", "cpu", *opts]) == 0
    quiet = capsys.readouterr().out
    assert main(["train", "pan_tiny", "--work-dir", "loud", "--device", "cpu", "--verbose", *opts]) == 0
    loud = capsys.readouterr().out
    for table in ("System environment", "Config:", "Hooks will be executed"):
        assert table not in quiet and table in loud, table
    assert "trained to iteration 2" in quiet
    assert len(quiet.splitlines()) < 10 < len(loud.splitlines())
    # The work dir's log keeps everything either way.
    logs = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "quiet") for f in fs if f.endswith(".log")]
    assert logs and "Config:" in open(logs[0]).read()


def test_metrics_json_is_strict(tmp_path):
    from arnn_plugins.cli import write_metrics_json

    path = tmp_path / "m.json"
    write_metrics_json(str(path), {"pan/accuracy": 0.5, "pan/correctness": float("nan"), "x": float("inf")})
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert json.loads(path.read_text()) == {"pan/accuracy": 0.5, "pan/correctness": None, "x": None}


def test_pan_study_records_curves_with_the_settings_given(tmp_path):
    from arnn_plugins.experiments.pan_study import run_study

    res = run_study(("ctx", "arnn"), seeds=(0,), every=1, jobs=1, out=str(tmp_path), scale="quick",
                    model={"mask_bias": 2.0}, task="digit", log=lambda s: None, threads=1, cache_dir=None,
                    iters=2, n_train=16, n_test=8, batch=4)
    with open(tmp_path / "study.json") as f:
        saved = json.load(f)
    assert [r["kind"] for r in saved["runs"]] == ["arnn", "ctx"] == [r["kind"] for r in res["runs"]]
    assert saved["settings"]["threads"] == 1 and saved["settings"]["model"] == {"mask_bias": 2.0}
    assert saved["settings"]["iters"] == 2
    for run in saved["runs"]:
        assert 0 <= run["metrics"]["accuracy"] <= 1
        assert [p["step"] for p in run["curve"]][-2:] == [1, 2]
        # The bias reached the model: masks start near sigmoid(2) = 0.88, not 0.5.
        assert all(m > 0.7 for m in run["curve"][0]["layer_mean"])
