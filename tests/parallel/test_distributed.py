"""Multi-process statistics: every rank estimates what one process would on the global batch.

Two gloo processes on CPU (torch.multiprocessing), spawned once for the whole module:
the workers run every scenario and save what they saw; each test compares one scenario
with a single-process run on the concatenated batch (float32 tolerance) and the ranks
with each other (bit for bit).
"""

from __future__ import annotations

import copy
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import statqat_ao as sq
from statqat_ao.models import DigitsCNN, load_digits_split
from statqat_ao.parallel import distributed

WORLD = 2
METHODS = ("minmax", "analytic", "iterative", "octav", "mse")
# (format, method, symmetric) estimated offline on a per-tensor activation split over ranks.
OFFLINE_CASES = [(f, m, True) for f in ("int8", "int4", "fp4_e2m1") for m in METHODS] + [
    ("int8", m, False) for m in ("minmax", "analytic", "iterative")
]
# A shorter dense sweep (the test is about sums); the exact sweep needs whole blocks.
OPTIONS = {"mse": {"coarse": 60, "fine": 20, "exact": False}}
RTOL = 1e-5
STEPS = 4
BATCH = 64


# ----------------------------------------------------------------------------- data, models


def activations(seed: int = 0) -> torch.Tensor:
    """Heavy-tailed, shifted activation-like data; ranks take halves along dim 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * BATCH, 96, generator=g) * torch.rand(2 * BATCH, 1, generator=g).mul(3).exp()
    return x + 0.3


def half(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x.chunk(WORLD)[rank]


def cnn() -> nn.Module:
    """DigitsCNN without its BatchNorms: under DDP their batch statistics are each rank's
    own, which no StatQAT reduction changes; this test is about StatQAT's statistics."""
    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    model.stem_bn, model.dw_bn = nn.Identity(), nn.Identity()
    return model


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def mlp_qconfig():
    return sq.get_statqat_qconfig("int4", "int8", weight_method="iterative")


def batches(rank: int | None):
    """STEPS batches of digits; ``rank`` takes its half, ``None`` the whole batch."""
    x, y, _, _ = load_digits_split()
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        idx = torch.randint(0, len(y), (BATCH,), generator=g)
        xb, yb = x[idx], y[idx]
        yield (xb, yb) if rank is None else (half(xb, rank), half(yb, rank))


def train(model: nn.Module, params, rank: int | None) -> None:
    """SGD on the mean loss: DDP / FSDP average the ranks' gradients, as one process would."""
    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    for xb, yb in batches(rank):
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()


def prepared(model: nn.Module, qconfig) -> nn.Module:
    x, _, _, _ = load_digits_split()
    return sq.prepare_qat_fx(model, qconfig, (x[:16],))  # the same example on every rank


def scales(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(".scale")}


# ----------------------------------------------------------------------------- the workers


def offline_estimates(rank: int) -> dict:
    x = half(activations(), rank)
    out = {}
    with distributed.reduce_statistics():
        for fmt, method, sym in OFFLINE_CASES:
            out[(fmt, method, sym)] = sq.estimate_qparams(x, fmt, method, symmetric=sym, **OPTIONS.get(method, {}))
        out["channel_axis1"] = sq.estimate_qparams(x, "int4", "analytic", "channel", axis=1)
        out["nvfp4"] = sq.estimate_qparams(x, "nvfp4", "analytic")
    return out


def quantizer_estimates(rank: int) -> dict:
    """Online FakeQuantizers on activations: cold start, then warm steps."""
    out = {}
    for method in ("minmax", "analytic", "iterative", "octav"):
        for fmt in ("int8", "nvfp4"):
            fq = sq.FakeQuantizer(fmt, method)
            for seed in range(3):
                fq(half(activations(seed), rank))
            out[(fmt, method)] = fq.scale.clone()
    shared = sq.FakeQuantizer("int8", "iterative")
    for seed in range(3):
        shared(half(activations(seed), rank), half(activations(seed + 10), rank))
    out["shared"] = shared.scale.clone()
    uneven = sq.FakeQuantizer("int8", "analytic")  # a short last batch: global counts
    uneven(activations()[:40] if rank == 0 else activations()[40:])
    out["uneven"] = uneven.scale.clone()
    return out


def ddp_run(rank: int) -> dict[str, torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = prepared(cnn(), sq.statqat_qconfig)
    # broadcast_buffers=False: rank 0's scale buffers are not copied over the others, so
    # ranks agree only if their estimates do.
    ddp = DDP(model, broadcast_buffers=False)
    train(ddp, ddp.parameters(), rank)
    return scales(model)


def ddp_off_run(rank: int) -> dict[str, torch.Tensor]:
    with distributed.process_group("off"):
        return ddp_run(rank)


def weight_quantizer_inputs(model: nn.Module) -> dict:
    """``{quantizer: (input type, input shape)}``, filled in by the forwards that follow."""
    seen = {}

    def record(name):
        def hook(mod, args):
            seen[name] = (type(args[0]).__name__, tuple(args[0].shape))

        return hook

    for name in ("fc1.weight_fake_quant", "fc2.weight_fake_quant"):
        model.get_submodule(name).register_forward_pre_hook(record(name))
    return seen


def fsdp_run(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = prepared(MLP(), mlp_qconfig())
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    fully_shard(model)  # the root: the graph reads weights by get_attr, not by calling fc1
    local = {n: p.to_local().shape for n, p in model.named_parameters() if isinstance(p, DTensor)}
    seen = weight_quantizer_inputs(model)
    train(model, model.parameters(), rank)
    return {"scales": scales(model), "local_shapes": local, "full_shapes": {n: p.shape for n, p in full.items()}, "seen": seen}


def fsdp_per_layer_run(rank: int) -> dict:
    from torch.distributed.tensor import DTensor

    from statqat_ao.parallel.fsdp import shard_per_module

    torch.manual_seed(0)
    model = prepared(MLP(), mlp_qconfig())
    keys = list(model.state_dict())
    shard_per_module(model, ["fc1", "fc2"])
    assert list(model.state_dict()) == keys
    units = {n: type(m).__name__ for n, m in model.named_modules() if n in ("", "fc1", "fc2")}
    local = {n: p.to_local().shape for n, p in model.named_parameters() if isinstance(p, DTensor)}
    seen = weight_quantizer_inputs(model)
    train(model, model.parameters(), rank)
    params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return {"scales": scales(model), "local_shapes": local, "seen": seen, "units": units, "params": params}


def lsq_init_run(rank: int) -> dict:
    x = half(activations(), rank)
    activation = sq.LSQFakeQuantize("int8", is_activation=True)
    activation(x)
    weight = sq.LSQFakeQuantize("int4", "channel")
    weight(nn.Parameter(x[:, :32].T.contiguous()))  # a Parameter: a weight, never reduced
    return {"activation": activation.scale.detach().clone(), "weight": weight.scale.detach().clone()}


def off_run(rank: int) -> dict:
    x = half(activations(), rank)
    explicit = sq.FakeQuantizer("int8", "analytic", process_group=dist.new_group([0, 1]))
    with distributed.process_group("off"):
        fq = sq.FakeQuantizer("int8", "analytic")
        fq(x)
        copy.deepcopy(explicit)(x)  # an explicit group reduces whatever the module-wide setting
        per_quantizer = sq.FakeQuantizer("int8", "analytic", process_group=None)
    on = sq.FakeQuantizer("int8", "analytic")
    on(x)
    per_quantizer(x)
    explicit(x)
    return {
        "off": fq.scale.clone(),
        "on": on.scale.clone(),
        "argument_off": per_quantizer.scale.clone(),
        "explicit": explicit.scale.clone(),
    }


def hf_qconfig():
    return sq.get_statqat_qconfig("int4", "int8", weight_method="iterative", weight_granularity=32, skip=["lm_head"])


def hf_train(model: nn.Module, params, rank: int | None) -> None:
    """SGD on a Llama called as HF loops call it; ranks take halves of each global batch."""
    from hf_models import VOCAB

    opt = torch.optim.SGD(params, lr=0.1)
    model.train()
    g = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (4, 16), generator=g)
        ids = ids if rank is None else half(ids, rank)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def swapped_llama() -> nn.Module:
    import warnings

    from hf_models import tiny_decoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return sq.quantize_(tiny_decoder("llama"), hf_qconfig())


def hf_ddp_run(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = swapped_llama()
    ddp = DDP(model, broadcast_buffers=False)
    hf_train(ddp, ddp.parameters(), rank)
    return scales(model)


def hf_fsdp_per_layer_run(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = swapped_llama()
    for layer in model.model.layers:  # the usual LLM recipe: each decoder layer, then the root
        fully_shard(layer)
    fully_shard(model)
    local = {n: p.to_local().shape for n, p in model.named_parameters() if isinstance(p, DTensor)}
    hf_train(model, model.parameters(), rank)
    params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return {"scales": scales(model), "local_shapes": local, "params": params}


def output_aware_model() -> nn.Module:
    torch.manual_seed(0)
    qc = sq.get_statqat_qconfig("fp4_e2m1", None, weight_granularity=32, weight_method="search", weight_error="output")
    return sq.quantize_(nn.Sequential(nn.Linear(96, 16)), qc).train()


def input_moments_run(rank: int | None) -> dict:
    """Output-aware weight quantizer: the layer input's second moments over 3 training forwards."""
    model = output_aware_model()
    for seed in range(3):
        x = activations(seed)
        model(x if rank is None else half(x, rank))
    fq = model[0].weight_fake_quant
    return {"moments": fq.input_moments.clone(), "count": fq.input_count.clone(), "scale": fq.scale.clone()}


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A timeout: a collective one rank skips fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        result = {
            "offline": offline_estimates(rank),
            "quantizer": quantizer_estimates(rank),
            "ddp": ddp_run(rank),
            "ddp_off": ddp_off_run(rank),
            "fsdp": fsdp_run(rank),
            "fsdp_per_layer": fsdp_per_layer_run(rank),
            "lsq_init": lsq_init_run(rank),
            "off": off_run(rank),
            "hf_ddp": hf_ddp_run(rank),
            "hf_fsdp_per_layer": hf_fsdp_per_layer_run(rank),
            "input_moments": input_moments_run(rank),
            "group_after": distributed.get_process_group() is not None,
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------- helpers


def assert_ranks_identical(values: list) -> None:
    first = values[0]
    for other in values[1:]:
        if isinstance(first, dict):
            assert first.keys() == other.keys()
            for k in first:
                assert torch.equal(first[k], other[k]), k
        else:
            assert torch.equal(first, other)


def assert_scales_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=0, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", OFFLINE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_offline_estimates_equal_the_concatenated_batch(ranks, case):
    fmt, method, sym = case
    want_s, want_zp = sq.estimate_qparams(activations(), fmt, method, symmetric=sym, **OPTIONS.get(method, {}))
    got = [r["offline"][case] for r in ranks]
    assert_ranks_identical([s for s, _ in got])
    assert_ranks_identical([zp for _, zp in got])
    torch.testing.assert_close(got[0][0], want_s, rtol=RTOL, atol=0)
    assert torch.equal(got[0][1], want_zp)


def test_offline_per_channel_and_nvfp4(ranks):
    x = activations()
    want = sq.estimate_qparams(x, "int4", "analytic", "channel", axis=1)[0]
    assert_ranks_identical([r["offline"]["channel_axis1"][0] for r in ranks])
    torch.testing.assert_close(ranks[0]["offline"]["channel_axis1"][0], want, rtol=RTOL, atol=0)
    # NVFP4 blocks are per row (within one rank); the tensor scale is the global amax's.
    want = sq.estimate_qparams(x, "nvfp4", "analytic")[0]
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["offline"]["nvfp4"][0], half(want, rank), rtol=RTOL, atol=0)


def test_online_quantizers_equal_the_concatenated_batch(ranks):
    keys = [k for k in ranks[0]["quantizer"] if k not in ("shared", "uneven")]
    for fmt, method in keys:
        fq = sq.FakeQuantizer(fmt, method)
        for seed in range(3):
            fq(activations(seed))
        if fmt == "nvfp4":  # per-row blocks: each rank holds its rows of the global scales
            for rank, r in enumerate(ranks):
                torch.testing.assert_close(r["quantizer"][(fmt, method)], half(fq.scale, rank), rtol=RTOL, atol=0)
        else:
            assert_ranks_identical([r["quantizer"][(fmt, method)] for r in ranks])
            torch.testing.assert_close(ranks[0]["quantizer"][(fmt, method)], fq.scale, rtol=RTOL, atol=0)
    shared = sq.FakeQuantizer("int8", "iterative")
    for seed in range(3):
        shared(activations(seed), activations(seed + 10))
    assert_ranks_identical([r["quantizer"]["shared"] for r in ranks])
    torch.testing.assert_close(ranks[0]["quantizer"]["shared"], shared.scale, rtol=RTOL, atol=0)
    whole = sq.FakeQuantizer("int8", "analytic")
    whole(activations())
    assert_ranks_identical([r["quantizer"]["uneven"] for r in ranks])
    torch.testing.assert_close(ranks[0]["quantizer"]["uneven"], whole.scale, rtol=RTOL, atol=0)


def test_ddp_qat_scales_equal_one_process_on_the_global_batch(ranks):
    model = prepared(cnn(), sq.statqat_qconfig)
    train(model, model.parameters(), None)
    assert_ranks_identical([r["ddp"] for r in ranks])
    assert_scales_close(ranks[0]["ddp"], scales(model))


def single_process_mlp() -> nn.Module:
    """The FSDP workers' model and steps, in one process on the whole batches."""
    torch.manual_seed(0)
    model = prepared(MLP(), mlp_qconfig())
    train(model, model.parameters(), None)
    return model


def test_fsdp2_sharded_weights_give_the_unsharded_scales(ranks):
    got = [r["fsdp"] for r in ranks]
    # The parameters really are sharded along dim 0 (output channels) ...
    assert got[0]["local_shapes"]["fc1.weight"] == torch.Size([16, 64])
    # ... and the weight quantizers see the whole, all-gathered weight in forward.
    assert got[0]["seen"]["fc1.weight_fake_quant"] == ("Parameter", (32, 64))
    model = single_process_mlp()
    assert_ranks_identical([g["scales"] for g in got])
    assert_scales_close(got[0]["scales"], scales(model))
    assert got[0]["scales"]["fc1.weight_fake_quant.scale"].shape == (32, 1)


def test_fsdp2_per_layer_units_give_the_unsharded_scales_and_updates(ranks):
    got = [r["fsdp_per_layer"] for r in ranks]
    assert len(got[0]["units"]) == 3 and all(v.startswith("FSDP") for v in got[0]["units"].values())  # fc1, fc2, root
    assert got[0]["local_shapes"]["fc1.weight"] == torch.Size([16, 64])  # sharded at rest
    assert got[0]["seen"]["fc1.weight_fake_quant"] == ("Parameter", (32, 64))  # whole in forward
    assert got[0]["seen"]["fc2.weight_fake_quant"] == ("Parameter", (10, 32))
    model = single_process_mlp()
    assert_ranks_identical([g["scales"] for g in got])
    assert_scales_close(got[0]["scales"], scales(model))
    # The gradients were reduce-scattered per unit: SGD's updates equal one process's.
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[0]["params"][name], p.detach(), rtol=1e-5, atol=1e-6)


def single_process_llama() -> nn.Module:
    model = swapped_llama()
    hf_train(model, model.parameters(), None)
    return model


def test_swapped_llama_under_ddp_gets_the_global_batch_scales(ranks):
    got = [r["hf_ddp"] for r in ranks]
    assert_ranks_identical(got)
    want = scales(single_process_llama())
    assert any("input_fake_quant" in k for k in want)  # activation scales: reduced over the ranks
    assert_scales_close(got[0], want)


def test_swapped_llama_with_fsdp2_per_decoder_layer_gets_the_unsharded_scales_and_updates(ranks):
    got = [r["hf_fsdp_per_layer"] for r in ranks]
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert got[0]["local_shapes"][q_proj] == torch.Size([32, 64])  # sharded at rest
    model = single_process_llama()
    assert_ranks_identical([g["scales"] for g in got])
    assert_scales_close(got[0]["scales"], scales(model))
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[0]["params"][name], p.detach(), rtol=1e-5, atol=1e-6)


def test_lsq_activation_scales_start_from_the_global_batch(ranks):
    assert_ranks_identical([r["lsq_init"]["activation"] for r in ranks])
    whole = sq.LSQFakeQuantize("int8", is_activation=True)
    whole(activations())
    torch.testing.assert_close(ranks[0]["lsq_init"]["activation"], whole.scale.detach(), rtol=RTOL, atol=0)
    for rank, r in enumerate(ranks):  # weights: each rank's own tensor, not reduced
        local = sq.LSQFakeQuantize("int4", "channel")
        local(nn.Parameter(half(activations(), rank)[:, :32].T.contiguous()))
        assert torch.equal(r["lsq_init"]["weight"], local.scale.detach())


def test_off_switch_leaves_ddp_activation_scales_apart(ranks):
    off = [r["ddp_off"] for r in ranks]
    activation = [k for k in off[0] if "weight_fake_quant" not in k]
    assert activation and all(not torch.equal(off[0][k], off[1][k]) for k in activation)


def test_off_switch_leaves_ranks_apart(ranks):
    assert all(r["group_after"] for r in ranks)  # the context restored the default
    off = [r["off"]["off"] for r in ranks]
    assert not torch.equal(off[0], off[1])
    assert not torch.equal(*[r["off"]["argument_off"] for r in ranks])
    assert_ranks_identical([r["off"]["on"] for r in ranks])
    assert_ranks_identical([r["off"]["explicit"] for r in ranks])
    assert torch.equal(ranks[0]["off"]["explicit"], ranks[0]["off"]["on"])
    for rank, r in enumerate(ranks):  # off: each rank's own slice
        local = sq.FakeQuantizer("int8", "analytic")
        local(half(activations(), rank))
        assert torch.equal(r["off"]["off"], local.scale)


def test_output_aware_input_moments_equal_one_process_on_the_global_batch(ranks):
    want = input_moments_run(None)
    got = [r["input_moments"] for r in ranks]
    assert_ranks_identical(got)
    torch.testing.assert_close(got[0]["moments"], want["moments"], rtol=RTOL, atol=0)
    assert torch.equal(got[0]["count"], want["count"])  # global rows, not each rank's half
    torch.testing.assert_close(got[0]["scale"], want["scale"], rtol=1e-4, atol=0)


def test_single_process_is_untouched():
    assert distributed.get_process_group() is None
    fq = sq.FakeQuantizer("int8", "iterative")
    assert distributed.statistics_group(fq, torch.ones(3)) is None
