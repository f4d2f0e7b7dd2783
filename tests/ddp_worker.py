"""DistributedDataParallel checks of the ARNN modules; tests/test_distributed.py runs it under torchrun.

    torchrun --nproc_per_node 2 tests/ddp_worker.py RESULTS.json

Every rank builds each model from the same seed and trains it under DDP
(gloo, CPU) on its share of each batch; it also trains a plain copy on the
whole batch, as one process would. Rank 0 writes, as JSON:

- ``grads``: per model, for the first step, the largest difference between
  the DDP gradients and the whole-batch gradients (float64), the largest
  gradient, the largest difference of the initial weights between ranks,
  and after three SGD steps the largest difference of the parameters
  between ranks, between DDP and the whole-batch run, and from the start;
- ``unused``: per module and mode, ``"ok"`` when two DDP steps with
  ``find_unused_parameters=False`` ran, else the error (the case
  ``control_unused_parameter`` has a parameter outside the loss, to show
  that the check catches one);
- ``buffers``: BatchNorm statistics differences between ranks before and
  after :func:`arnn_plugins.engine.distributed.average_buffers`.
"""

import copy
import datetime
import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import arnn_plugins as ap

B = 2  # items per rank; the whole batch is world_size * B


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def cross_rank_max_diff(t):
    """Largest difference of ``t`` between any rank and rank 0 (0 means bit-identical)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return max(float((p - parts[0]).abs().max()) for p in parts) if t.numel() else 0.0


def all_max(x):
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


# ---------------------------------------------------------------- models


def arnn_model(query=0, **kw):
    def build():
        return ap.AttentionRNN(6, hidden_channels=4, query_channels=query, **kw)
    return build, "map", query


def brnn_model(query=0, **kw):
    def build():
        return ap.BlockAttentionRNN(6, block_size=2, hidden_channels=4, query_channels=query, **kw)
    return build, "map", query


def gate_model(**kw):
    def build():
        return ap.ARNNGate(6, hidden_channels=4, **kw)
    return build, "features", 0


class WithUnusedParameter(nn.Module):
    """The negative control: an AttentionRNN next to a layer the loss never sees."""

    def __init__(self):
        super().__init__()
        self.arnn = ap.AttentionRNN(6, hidden_channels=4)
        self.unused = nn.Linear(3, 3)

    def forward(self, x, query=None):
        return self.arnn(x)


def control_model():
    return WithUnusedParameter, "map", 0


def timm_resnet18(mode, bn_eval):
    def build():
        import timm

        # zero_init_last=False: with timm's default the residual branches
        # (CBAM, so ARNN, inside them) start at zero and get no gradient.
        m = timm.create_model("resnet18", num_classes=5, zero_init_last=False,
                              block_args=dict(attn_layer="cbam"))
        names = ap.swap_attention(m, mode=mode, hidden_channels=4)
        assert len(names) == 8, names
        if bn_eval:
            # Per-rank BatchNorm statistics would differ from whole-batch ones.
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.eval()
        return m
    return build, "classify", 0


def torchvision_resnet18():
    def build():
        import torchvision

        m = torchvision.models.resnet18(num_classes=5)
        assert ap.insert_attention(m, hidden_channels=4)
        return m
    return build, "classify", 0


def pan_model(kind, batch_norm=False):
    def build():
        from arnn_plugins.models.pan import PAN

        return PAN(kind, image_size=16, channels=6, hidden_channels=4, num_stacks=2, batch_norm=batch_norm)
    return build, "pan", 0


def batch(kind, n, query, step, dtype):
    """Step ``step``'s whole batch of ``n`` items, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    if kind in ("map", "features"):
        x = torch.randn(n, 6, 5, 7, generator=g, dtype=dtype)
        q = torch.randn(n, query, generator=g, dtype=dtype) if query else None
        shape = (n, 1, 5, 7) if kind == "map" else (n, 6, 5, 7)
        return dict(x=x, q=q, target=torch.randn(*shape, generator=g, dtype=dtype))
    if kind == "classify":
        return dict(x=torch.randn(n, 3, 32, 32, generator=g, dtype=dtype), y=torch.randint(0, 5, (n,), generator=g))
    return dict(x=torch.rand(n, 3, 16, 16, generator=g, dtype=dtype), q=torch.randint(0, 10, (n,), generator=g),
                y=torch.randint(0, 5, (n,), generator=g))


def take(data, lo, hi):
    return {k: None if v is None else v[lo:hi] for k, v in data.items()}


def loss_of(model, kind, data):
    """A mean over the items, so the mean of the ranks' losses is the whole batch's loss."""
    if kind == "map":
        return F.mse_loss(model(data["x"], data["q"]), data["target"])
    if kind == "features":
        return F.mse_loss(model(data["x"]), data["target"])
    if kind == "classify":
        return F.cross_entropy(model(data["x"]), data["y"])
    logits, _ = model(data["x"], data["q"])
    return F.cross_entropy(logits, data["y"])


# ---------------------------------------------------------------- checks


def grad_case(spec, rank, world):
    build, kind, query = spec
    torch.manual_seed(0)
    model = build().double()
    init = flat_params(model).clone()
    init_diff = cross_rank_max_diff(init)  # before DDP broadcasts rank 0's weights
    single = copy.deepcopy(model)
    ddp = DDP(model, broadcast_buffers=False, find_unused_parameters=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    opt1 = torch.optim.SGD(single.parameters(), lr=0.05, momentum=0.9)
    out = {}
    for step in range(3):
        data = batch(kind, world * B, query, step, torch.float64)
        opt.zero_grad()
        loss_of(ddp, kind, take(data, rank * B, (rank + 1) * B)).backward()
        opt1.zero_grad()
        loss_of(single, kind, data).backward()
        if step == 0:
            diff = max(float((p.grad - q.grad).abs().max()) for p, q in zip(model.parameters(), single.parameters()))
            out["grad_max_diff"] = all_max(diff)
            out["grad_max"] = all_max(max(float(p.grad.abs().max()) for p in model.parameters()))
            out["n_params"] = sum(p.numel() for p in model.parameters())
        opt.step()
        opt1.step()
    out["init_cross_rank"] = init_diff
    out["step3_cross_rank"] = cross_rank_max_diff(flat_params(model))
    out["step3_vs_single"] = all_max(float((flat_params(model) - flat_params(single)).abs().max()))
    out["step3_moved"] = all_max(float((flat_params(model) - init).abs().max()))
    return out


def unused_case(spec, rank):
    """Two DDP steps with find_unused_parameters=False: DDP raises on the second forward otherwise."""
    build, kind, query = spec
    torch.manual_seed(0)
    ddp = DDP(build(), broadcast_buffers=False, find_unused_parameters=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    try:
        for step in range(2):
            data = batch(kind, 2 * B, query, step, torch.float32)
            opt.zero_grad()
            loss_of(ddp, kind, take(data, rank * B, (rank + 1) * B)).backward()
            opt.step()
    except RuntimeError as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return "ok"


def buffers_case(rank):
    from arnn_plugins.engine.distributed import average_buffers

    build, kind, query = pan_model("arnn", batch_norm=True)
    torch.manual_seed(0)
    model = build()
    ddp = DDP(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    for step in range(2):
        data = batch(kind, 2 * B, query, step, torch.float32)
        opt.zero_grad()
        loss_of(ddp, kind, take(data, rank * B, (rank + 1) * B)).backward()
        opt.step()

    def bufs():
        return torch.cat([b.reshape(-1).double() for b in model.buffers() if b.is_floating_point()])

    before = cross_rank_max_diff(bufs())
    n = average_buffers(model)
    return dict(before=before, after=cross_rank_max_diff(bufs()), n_buffers=n)


GRAD_CASES = {
    "arnn_learned": arnn_model(combine="learned"),
    "arnn_independent": arnn_model(combine="independent"),
    "arnn_query": arnn_model(query=3),
    "arnn_independent_query": arnn_model(query=3, combine="independent"),
    "brnn_query": brnn_model(query=3),
    "timm_resnet18_residual_bn_eval": timm_resnet18("residual", bn_eval=True),
    "timm_resnet18_replace_bn_eval": timm_resnet18("replace", bn_eval=True),
}


def unused_cases():
    cases = {}
    for combine in ("learned", "independent"):
        for sample in (False, True):
            for query in (0, 3):
                tag = f"{combine}_sample{int(sample)}_query{query}"
                cases[f"arnn_{tag}"] = arnn_model(query=query, combine=combine, sample=sample)
                cases[f"brnn_{tag}"] = brnn_model(query=query, combine=combine, sample=sample)
    cases["control_unused_parameter"] = control_model()
    cases["gate"] = gate_model()
    cases["gate_block2"] = gate_model(block_size=2)
    for mode in ("residual", "replace"):
        cases[f"timm_resnet18_{mode}"] = timm_resnet18(mode, bn_eval=False)
    cases["torchvision_resnet18_insert"] = torchvision_resnet18()
    for kind in ("arnn", "arnn_ind", "arnn_sample", "brnn", "ctx", "noctx", "san"):
        cases[f"pan_{kind}"] = pan_model(kind)
    return cases


def main(out_path):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    res = dict(world_size=world, grads={}, unused={})
    for name, spec in GRAD_CASES.items():
        res["grads"][name] = grad_case(spec, rank, world)
    for name, spec in unused_cases().items():
        res["unused"][name] = unused_case(spec, rank)
    res["buffers"] = buffers_case(rank)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
