"""Distributed training: real torchrun runs (gloo on 127.0.0.1), DDP checks of the ARNN modules, launcher plumbing.

Three torchrun runs: ``train`` of the tiny PAN config in 2 processes (then
``eval`` on its checkpoint), ``--resume`` of it by two torchrun agents
joining one rendezvous (the multi-node command, both "nodes" on this
machine), and tests/ddp_worker.py (gradients, unused parameters and
BatchNorm buffers under DistributedDataParallel); and two processes given
the environment of srun, then of mpirun. About two minutes on two cores.
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from arnn_plugins.cli import main
from arnn_plugins.engine import load_config
from arnn_plugins.engine.distributed import (
    LAUNCHERS,
    check_launcher,
    dist_info,
    pick_backend,
    threads_per_process,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_worker import GRAD_CASES, unused_cases  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
TINY = os.path.join(CONFIGS, "pan_tiny.py")
BIN = os.path.dirname(sys.executable)
TORCHRUN = os.path.join(BIN, "torchrun")
ARNN = os.path.join(BIN, "arnn-plugins")
# Variables a launcher sets: none may leak in from the shell that runs the tests.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["CUDA_VISIBLE_DEVICES"] = ""
    if os.path.isdir("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own connections on the loopback too, not the host's address
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, nproc=2, cwd=None):
    # Port 0: the rendezvous store takes a free port, so parallel test runs never collide.
    cmd = [TORCHRUN, f"--nproc_per_node={nproc}", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "terminate called without an active exception" in r.stderr:
        # Now and then a gloo rank on this 2-core machine aborts in C++
        # (a std::thread torn down unjoined) before the run's own code fails;
        # one fresh try, from an empty work dir, so the checks see one run.
        if "--work-dir" in args:
            shutil.rmtree(args[args.index("--work-dir") + 1], ignore_errors=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    return r, time.perf_counter() - t0


def _val_records(work_dir):
    recs = []
    for path in glob.glob(os.path.join(str(work_dir), "*", "vis_data", "scalars.json")):
        with open(path) as f:
            recs += [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if "pan/accuracy" in r]


# ------------------------------------------------------------ torchrun: train, eval, resume


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    """pan_tiny in 2 processes: 6 iterations of batch 8 per rank, checkpoints at 3 and 6."""
    wd = tmp_path_factory.mktemp("dist") / "wd"
    r, secs = _torchrun([ARNN, "train", TINY, "--launcher", "pytorch", "--work-dir", str(wd), "--device", "cpu"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return wd, r.stdout + r.stderr


def test_torchrun_train_is_one_distributed_run_writing_one_set_of_files(dist_run):
    wd, out = dist_run
    runs = [d for d in os.listdir(wd) if os.path.isdir(wd / d)]
    assert len(runs) == 1, runs  # one timestamped log folder: rank 0's (the ranks share rank 0's timestamp)
    assert sorted(f for f in os.listdir(wd) if f not in runs) == ["iter_3.pth", "iter_6.pth", "last_checkpoint",
                                                                  "pan_tiny.py"]
    logs = glob.glob(str(wd / runs[0] / "*.log"))
    assert len(logs) == 1
    log = open(logs[0]).read()
    assert "Distributed training: True" in log and "Distributed launcher: pytorch" in log
    threads = threads_per_process(2)
    assert (f"distributed: launcher pytorch, backend gloo, 2 processes (2 on this machine), "
            f"{threads} CPU threads each") in log
    assert log.count("Saving checkpoint at 3 iterations") == 1 and log.count("Saving checkpoint at 6 iterations") == 1
    assert len(_val_records(wd)) == 1  # one validation, logged once
    # Only rank 0 reports, and after its last checkpoint is on disk (no stale or empty path).
    assert out.count("trained to iteration 6") == 1
    assert f"checkpoint: {wd / 'iter_6.pth'}" in out
    assert (wd / "last_checkpoint").read_text().strip() == str(wd / "iter_6.pth")
    ck = torch.load(wd / "iter_6.pth", map_location="cpu", weights_only=False)
    assert ck["meta"]["iter"] == 6
    assert not any(k.startswith("module.") for k in ck["state_dict"])  # the model, not the DDP wrapper
    assert "find_unused_parameters=False" in open(wd / "pan_tiny.py").read()


def test_eval_on_the_distributed_checkpoint_gives_the_logged_metric(dist_run, tmp_path):
    wd, _ = dist_run
    out = tmp_path / "m.json"
    argv = ["eval", TINY, str(wd / "iter_6.pth"), "--work-dir", str(tmp_path / "e"), "--device", "cpu",
            "--out", str(out)]
    assert main(argv) == 0
    got = json.loads(out.read_text())
    logged = _val_records(wd)[-1]
    # Both ranks validated with the same BatchNorm statistics (BufferSyncHook), the ones rank 0 saved:
    # one process on the whole validation set scores the same.
    assert got["pan/accuracy"] == logged["pan/accuracy"]
    assert got["pan/correctness"] == pytest.approx(logged["pan/correctness"], rel=1e-9, abs=1e-12)
    for k in range(1, 4):
        assert got[f"pan/correctness_l{k}"] == pytest.approx(logged[f"pan/correctness_l{k}"], rel=1e-9, abs=1e-12)


def test_resume_by_two_torchrun_agents_continues_the_run(dist_run, tmp_path):
    """``--nnodes 2 --rdzv-endpoint``: the multi-node command, both nodes on this machine, one process each."""
    wd = tmp_path / "wd"

    def run():
        shutil.rmtree(wd, ignore_errors=True)
        shutil.copytree(dist_run[0], wd)
        port = _free_port()
        cmd = [TORCHRUN, "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=arnn-resume", ARNN, "train", TINY,
               "--launcher", "pytorch", "--work-dir", str(wd), "--device", "cpu", "--resume", "--threads", "1",
               "--cfg-options", "train_cfg.max_iters=8", "randomness.diff_rank_seed=True"]
        procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
        return procs, [p.communicate(timeout=600)[0] for p in procs]

    procs, outs = run()
    if any(p.returncode for p in procs) and any("terminate called without an active exception" in o for o in outs):
        # The gloo abort _torchrun retries too: one fresh try from the checkpointed work dir.
        procs, outs = run()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    out = "".join(outs)
    assert out.count("trained to iteration 8") == 1
    ck = torch.load(wd / "iter_8.pth", map_location="cpu", weights_only=False)
    assert ck["meta"]["iter"] == 8
    # Only iterations 7 and 8 ran: Adam's step count continues from the checkpoint's 6.
    assert int(next(iter(ck["optimizer"]["state"].values()))["step"]) == 8
    new = [d for d in os.listdir(wd) if os.path.isdir(wd / d) and d not in os.listdir(dist_run[0])]
    assert len(new) == 1
    log = open(glob.glob(str(wd / new[0] / "*.log"))[0]).read()
    assert "resumed epoch: 0, iter: 6" in log
    # --threads wins over the default share of the cores; each agent is its own "machine" here.
    assert "2 processes (1 on this machine), 1 CPU threads each" in log
    assert "diff_rank_seed: True" in log


_GROUP_CHECK = """
import json, os, sys, torch, torch.distributed as dist
from arnn_plugins.engine.distributed import init_distributed
out = {}
for launcher, port in zip(("slurm", "mpi"), sys.argv[1:]):
    os.environ["MASTER_PORT"] = port
    info = init_distributed(launcher, "gloo", timeout=120)
    t = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(t)
    out[launcher] = dict(info=list(info), backend=dist.get_backend(), world=dist.get_world_size(), sum=float(t))
    dist.destroy_process_group()
print(json.dumps(out))
"""


def test_srun_and_mpirun_environments_form_one_process_group():
    """Two processes with the variables srun, then Open MPI's mpirun, give each task (neither is installed here)."""
    ports = [str(_free_port()), str(_free_port())]
    procs = []
    for rank in range(2):
        # No scontrol here: MASTER_ADDR set, as a batch script may do.
        extra = dict(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                     SLURM_STEP_TASKS_PER_NODE="2", SLURM_NODELIST="localhost", MASTER_ADDR="127.0.0.1",
                     OMPI_COMM_WORLD_RANK=str(rank), OMPI_COMM_WORLD_SIZE="2",
                     OMPI_COMM_WORLD_LOCAL_RANK=str(rank), OMPI_COMM_WORLD_LOCAL_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, "-c", _GROUP_CHECK, *ports], env=dict(_env(), **extra),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    got = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    for launcher in ("slurm", "mpi"):
        assert [g[launcher]["info"] for g in got] == [[0, 2, 0, 2], [1, 2, 1, 2]]
        assert all(g[launcher]["backend"] == "gloo" and g[launcher]["world"] == 2 and g[launcher]["sum"] == 3.0
                   for g in got)


# ------------------------------------------------------------ DDP checks of the modules (tests/ddp_worker.py)


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "results.json"
    r, _ = _torchrun([os.path.join(ROOT, "tests", "ddp_worker.py"), str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2
    return res


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_two_ranks_give_the_gradients_of_one_process_on_the_whole_batch(ddp_results, case):
    r = ddp_results["grads"][case]
    assert r["init_cross_rank"] == 0.0  # the same seed builds the same weights in every process
    assert r["grad_max"] > 1e-3  # the gradients compared are not trivially zero
    assert r["grad_max_diff"] <= 1e-8  # float64
    assert r["step3_moved"] > 1e-3
    assert r["step3_cross_rank"] == 0.0  # bit-identical on both ranks after 3 SGD steps
    assert r["step3_vs_single"] <= 1e-8


@pytest.mark.parametrize("case", [c for c in unused_cases() if c != "control_unused_parameter"])
def test_every_parameter_takes_part_in_the_loss(ddp_results, case):
    assert ddp_results["unused"][case] == "ok"


def test_the_unused_parameter_check_catches_one(ddp_results):
    assert "not used in producing loss" in ddp_results["unused"]["control_unused_parameter"]


def test_buffer_sync_makes_batchnorm_statistics_equal_on_every_rank(ddp_results):
    r = ddp_results["buffers"]
    assert r["n_buffers"] == 4  # running mean and var of PAN's two BatchNorms
    assert r["before"] > 1e-6 and r["after"] == 0.0


# ------------------------------------------------------------ launchers, threads, config keys (one process)


def test_dist_info_reads_each_launchers_environment():
    assert dist_info("none", {}) == (0, 1, 0, 1)
    env = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="1")
    assert dist_info("pytorch", env) == (3, 4, 1, 2)
    slurm = dict(SLURM_PROCID="6", SLURM_NTASKS="7", SLURM_LOCALID="0", SLURM_NODEID="3",
                 SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_NODELIST="n[1-4]")
    assert dist_info("slurm", slurm) == (6, 7, 0, 1)
    assert dist_info("slurm", dict(slurm, SLURM_NODEID="1", SLURM_PROCID="3", SLURM_LOCALID="1")) == (3, 7, 1, 2)
    mpi = dict(OMPI_COMM_WORLD_RANK="2", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="0",
               OMPI_COMM_WORLD_LOCAL_SIZE="2")
    assert dist_info("mpi", mpi) == (2, 4, 0, 2)
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE.*torchrun"):
        dist_info("pytorch", {})
    with pytest.raises(ValueError, match="srun"):
        dist_info("slurm", {})
    with pytest.raises(ValueError, match="one of none, pytorch, slurm, mpi"):
        dist_info("torchrun", {})
    assert LAUNCHERS == ("none", "pytorch", "slurm", "mpi")


def test_launcher_none_under_a_multi_process_launcher_is_refused():
    with pytest.raises(ValueError, match="2 processes.*--launcher pytorch"):
        check_launcher("none", {"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="--launcher slurm"):
        check_launcher("none", {"SLURM_STEP_NUM_TASKS": "4"})
    check_launcher("none", {"WORLD_SIZE": "1"})
    check_launcher("pytorch", {"WORLD_SIZE": "2"})


@pytest.mark.parametrize("argv, env, message", [
    ([], {"WORLD_SIZE": "2"}, "each would train alone and write the same work dir; pass --launcher pytorch"),
    (["--launcher", "pytorch"], {}, "--launcher pytorch: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT "
                                    "not set; start the command with torchrun"),
    (["--launcher", "pytorch", "--cfg-options", "sync_bn=torch"], {}, "sync_bn='torch' needs CUDA"),
    (["--cfg-options", "sync_bn=apex"], {}, "sync_bn must be 'torch', 'mmcv' or None, got 'apex'"),
    (["--cfg-options", "randomness.diff_rank_sed=True"], {}, "randomness: unknown key(s) 'diff_rank_sed'"),
    (["--launcher", "pytorch", "--cfg-options", "env_cfg.dist_cfg.backend=nccl"], {},
     "backend='nccl' needs CUDA devices, and this run is on CPU"),
    (["--launcher", "pytorch", "--device", "cuda:1"], {}, "each process uses the GPU of its local rank"),
])
def test_train_refuses_bad_distributed_settings_before_training(argv, env, message, tmp_path, capsys, monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if "--device" not in argv:
        argv = [*argv, "--device", "cpu"]
    elif not torch.cuda.is_available():
        pytest.skip("the cuda:1 check runs after the device check, which needs CUDA")
    assert main(["train", TINY, "--work-dir", str(tmp_path / "wd"), *argv]) == 2
    assert message in capsys.readouterr().err
    wd = tmp_path / "wd"
    assert not wd.exists() or not os.listdir(wd)  # refused before the Runner wrote anything


def test_bad_launcher_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", TINY, "--launcher", "torchrun"])
    assert e.value.code == 2
    assert "invalid choice: 'torchrun'" in capsys.readouterr().err


def test_distributed_keys_are_settable_from_cfg_options():
    cfg = load_config(TINY, {"launcher": "pytorch", "sync_bn": "torch", "find_unused_parameters": False,
                             "randomness.diff_rank_seed": True, "randomness.seed": 3,
                             "env_cfg.dist_cfg.backend": "gloo"})
    assert cfg.launcher == "pytorch" and cfg.sync_bn == "torch" and cfg.find_unused_parameters is False
    assert cfg.randomness == dict(seed=3, diff_rank_seed=True)
    assert cfg.env_cfg.dist_cfg.backend == "gloo"
    with pytest.raises(ValueError, match="no top-level key 'sync_bnn'"):
        load_config(TINY, {"sync_bnn": "torch"})


def test_threads_per_process_share_the_cores():
    assert threads_per_process(1, cores=16) == 16
    assert threads_per_process(2, cores=16) == 8
    assert threads_per_process(3, cores=16) == 5
    assert threads_per_process(4, cores=2) == 1
    assert threads_per_process(2) >= 1
    with pytest.raises(ValueError, match="local_world_size must be >= 1"):
        threads_per_process(0)


def test_pick_backend_nccl_on_cuda_gloo_on_cpu():
    assert pick_backend("auto", cuda=False) == "gloo" and pick_backend(None, cuda=False) == "gloo"
    assert pick_backend("auto", cuda=True) == "nccl"
    assert pick_backend("gloo", cuda=True) == "gloo" and pick_backend("mpi", cuda=False) == "mpi"
    with pytest.raises(ValueError, match="needs CUDA devices"):
        pick_backend("nccl", cuda=False)


def test_every_config_uses_mmengines_distributed_samplers_and_task_configs_pick_the_backend():
    from mmengine.config import Config

    for path in sorted(p for p in glob.glob(os.path.join(CONFIGS, "*.py")) if not p.endswith("__init__.py")):
        cfg = Config.fromfile(path, import_custom_modules=False)
        loaders = [k for k in ("train_dataloader", "val_dataloader", "test_dataloader") if cfg.get(k)]
        assert loaders, path
        for k in loaders:
            # Both shard the data set by rank (DefaultSampler pads the last round; metrics drop the padding).
            assert cfg[k]["sampler"]["type"] in ("DefaultSampler", "InfiniteSampler"), (path, k)
        if "arnn_plugins.engine" in cfg.get("custom_imports", {}).get("imports", []):
            assert cfg.env_cfg.dist_cfg.backend == "auto", path


# ------------------------------------------------------------ module init and SyncBatchNorm (one process)


def _modules():
    import timm

    import arnn_plugins as ap

    def timm_swapped():
        m = timm.create_model("resnet18", num_classes=5, block_args=dict(attn_layer="cbam"))
        ap.swap_attention(m, hidden_channels=4)
        return m

    return {
        "arnn": lambda: ap.AttentionRNN(6, hidden_channels=4),
        "arnn_independent_query": lambda: ap.AttentionRNN(6, hidden_channels=4, combine="independent",
                                                          query_channels=3),
        "brnn": lambda: ap.BlockAttentionRNN(6, block_size=2, hidden_channels=4),
        "gate": lambda: ap.ARNNGate(6, hidden_channels=4),
        "timm_resnet18_swapped": timm_swapped,
    }


@pytest.mark.parametrize("name", ["arnn", "arnn_independent_query", "brnn", "gate", "timm_resnet18_swapped"])
def test_module_init_is_deterministic_given_the_seed(name):
    build = _modules()[name]
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        states.append(build().state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0] if states[0][k].is_floating_point())


def test_sync_batchnorm_conversion_keeps_a_swapped_model_working():
    import timm
    from mmengine.model import revert_sync_batchnorm

    import arnn_plugins as ap
    from arnn_plugins.adapters.timm_cbam import ARNNSpatialAttn

    torch.manual_seed(0)
    m = timm.create_model("resnet18", num_classes=5, zero_init_last=False, block_args=dict(attn_layer="cbam"))
    ap.swap_attention(m, mode="residual", hidden_channels=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = m.eval()(x)
    arnn_before = {n: p.clone() for n, p in m.named_parameters() if ".arnn." in n}
    s = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
    spatial = [mod for mod in s.modules() if isinstance(mod, ARNNSpatialAttn)]
    assert len(spatial) == 8
    # The CBAM prior's norm (inside the ARNN branch) is converted like every other BatchNorm.
    assert all(isinstance(sp.conv.bn, torch.nn.SyncBatchNorm) for sp in spatial)
    assert not any(type(mod) is torch.nn.BatchNorm2d for mod in s.modules())
    assert all(isinstance(sp.arnn, ap.AttentionRNN) for sp in spatial)
    after = dict(s.named_parameters())
    assert all(torch.equal(p, after[n]) for n, p in arnn_before.items())
    assert torch.equal(s.eval()(x), ref)
    # Outside a process group SyncBatchNorm trains as BatchNorm; ARNN's gradients arrive.
    s.train()(x).logsumexp(1).mean().backward()
    assert all(p.grad is not None for n, p in s.named_parameters() if ".arnn." in n)
    # mmengine reverts SyncBatchNorm for a single-process run: the same model again.
    trained_stats = s.eval()(x)
    assert torch.equal(revert_sync_batchnorm(s).eval()(x), trained_stats)
