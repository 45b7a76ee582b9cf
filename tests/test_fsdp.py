"""FSDP2 (fully_shard) on two CPU ranks (gloo) against one process on the same global batch,
and torch.distributed.checkpoint of an engine."""
import datetime
import math
import os

import pytest

from spawning import leave_process_group, spawn_ranks
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp_
import torch.nn.functional as F
from torch import nn

from mixprec.distributed import local_amax, reduce_amax_
from mixprec.distributed.checkpoint import EngineState
from mixprec.engine import prepare

pytestmark = pytest.mark.distributed

WORLD = 2
GLOBAL = 16              # global batch; rank r trains on rows [8r, 8r + 8)
STEPS = 4
INJECT_AT = 2            # rank 1 puts an inf into its gradient shard at this step
DELAYED = ("fp8-hybrid:weight.scaling=delayed,activation.scaling=delayed,"
           "grad_output.scaling=delayed,weight_grad.scaling=delayed")
# (recipe, backend) compared with one process; bf16-mixed is native on CPU by default
PRESETS = [("fp32", None), ("fp16-mixed", None), ("fp16-pure", None), ("bf16-mixed", "emulated"), ("bf16-mixed", "native"),
           ("fp8-hybrid", None), (DELAYED, None), ("mxfp8", None), ("mxfp6", None),
           ("mxfp4", None), ("nvfp4", None)]
# Max |master(2 ranks) - master(1 process)| after STEPS AdamW steps (lr 1e-2), measured on
# this model and data: the ranks round their own partial weight gradients (8 rows each)
# before the reduce-scatter sums them, one process rounds the sum of 16 rows. fp32
# (no rounding) differs by 3e-8, the summation order alone. Measured: fp32 3.0e-8,
# fp16-mixed 2.3e-5, bf16-mixed 1.2e-4 (emulated) / 1.6e-4 (native), fp8-hybrid 3.1e-2
# (current) / 1.8e-2 (delayed), mxfp8 2.4e-2, fp16-pure 2.4e-4.
TOLERANCE = {"fp32": 1e-6, "fp16-mixed": 1e-4, "bf16-mixed": 5e-4, "fp8-hybrid": 5e-2,
             DELAYED: 5e-2, "mxfp8": 5e-2, "fp16-pure": 5e-4,
             "mxfp6": 5e-2, "mxfp4": 1e-1, "nvfp4": 1e-1}
OVERFLOW_GAIN = 8.0
CKPT_RECIPES = ("fp8-e5m2", DELAYED)     # stochastic rounding + rising floor; delayed amax


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def _batch(step: int, gain: float = 1.0):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(GLOBAL, 8, generator=g), torch.randint(0, 4, (GLOBAL,), generator=g)
    x[GLOBAL // 2:] *= 4.0     # rank 1's rows are larger: its local amax differs from rank 0's
    return x * gain, y


def _rows(t, rank: int, world: int):
    n = GLOBAL // world
    return t[rank * n:(rank + 1) * n]


def _sharded(seed: int = 0) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    model = _model(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _snapshot(engine) -> dict:
    """Full (unsharded) masters, model weights, optimizer state, scale and layer states."""
    params = [p for g in engine.optimizer.param_groups for p in g["params"]]
    opt = {i: {k: _full(v).clone() for k, v in engine.optimizer.state[p].items()
               if torch.is_tensor(v)} for i, p in enumerate(params) if p in engine.optimizer.state}
    return {"masters": [_full(m).detach().clone() for m in engine.master_params],
            "weights": {k: _full(v).clone() for k, v in engine.model.state_dict().items()},
            "optim": opt, "scale": engine.scale, "history": list(engine.history),
            "layers": engine._layer_states()}


def _train(model, engine, steps, rank: int, world: int, inject_at=None, logits=None,
           gain: float = 1.0, clip=None):
    applied = []
    for step in steps:
        x, y = (_rows(t, rank, world) for t in _batch(step, gain))
        with engine.autocast():
            out = model(x)
            loss = F.cross_entropy(out, y)
        if logits is not None and step == 0:
            logits.append(out.detach().float().clone())
        engine.backward(loss)
        if step == inject_at and rank == 1:
            grad = model[2].weight.grad            # this rank's shard (a DTensor)
            grad.to_local()[0, 0] = float("inf")
        if clip is not None:
            clip.append(float(engine.clip_grad_norm_(1.0)))
        applied.append(engine.step())
        engine.zero_grad()
    return applied


def _init(rank: int, init_file: str) -> None:
    # Spawned, not forked; rendezvous through a file; a timeout rather than a hang.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One spawn for every test of this file (starting two processes is the slow part)."""
    _init(rank, init_file)
    try:
        _train_part(rank, out_dir)
        _ckpt_part(rank, out_dir)
    finally:
        leave_process_group()


def _train_part(rank: int, out_dir: str) -> None:
    res = {}
    for recipe, backend in PRESETS:
        model = _sharded()
        engine = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), recipe,
                         seed=7, backend=backend)
        logits = []
        _train(model, engine, range(STEPS), rank, WORLD, logits=logits)
        res[recipe, backend] = {**_snapshot(engine), "logits": logits[0],
                                "master_type": type(engine.master_params[0]).__name__,
                                "placements": str(engine.master_params[0].placements),
                                "local_shape": tuple(engine.master_params[0].to_local().shape),
                                "state_type": type(next(iter(
                                    engine.optimizer.state.values()))["exp_avg"]).__name__}
    # gradients near FP16's overflow: a rank's gradient of its own mean loss is twice
    # its share of the global one, and overflows where one process does not
    model = _sharded()
    engine = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), "fp16-mixed",
                     seed=7)
    norms = []
    _train(model, engine, range(STEPS), rank, WORLD, gain=OVERFLOW_GAIN, clip=norms)
    res["overflow"] = {**_snapshot(engine), "norms": norms}
    # an inf on rank 1 only, at INJECT_AT: both ranks skip that step and nothing moves
    model = _sharded()
    engine = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), "fp16-mixed",
                     seed=7)
    applied = _train(model, engine, range(INJECT_AT), rank, WORLD)
    before = _snapshot(engine)
    applied += _train(model, engine, [INJECT_AT], rank, WORLD, inject_at=INJECT_AT)
    after = _snapshot(engine)
    applied += _train(model, engine, range(INJECT_AT + 1, STEPS), rank, WORLD)
    res["inject"] = {"applied": applied, "before": before, "after": after,
                     "end": _snapshot(engine)}
    # amax reduction: global by default, rank-local inside local_amax()
    with local_amax():
        res["local_amax"] = float(reduce_amax_(torch.tensor(float(rank + 1))))
    res["global_amax"] = float(reduce_amax_(torch.tensor(float(rank + 1))))
    torch.save(res, os.path.join(out_dir, f"train{rank}.pt"))


def _single(recipe: str, backend=None, gain: float = 1.0, clip=None) -> dict:
    # one thread, as the ranks: a GEMM's blocking (and so its bits) depends on the threads
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        engine = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), recipe, seed=7,
                         backend=backend)
        logits = []
        _train(model, engine, range(STEPS), 0, 1, logits=logits, gain=gain, clip=clip)
    finally:
        torch.set_num_threads(threads)
    return {**_snapshot(engine), "logits": logits[0]}


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    return t.detach().contiguous().view(-1).view(_INT[t.dtype.itemsize])


def _assert_same(a, b, where=""):
    """Bit-identical nested state (NaN equal to NaN, -0 different from +0)."""
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(_bits(a), _bits(b)), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def diff_of(run, one) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(run["masters"], one["masters"]))


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    # a checkpoint of one process, for a load on two ranks
    model = _model()
    engine = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), "fp16-mixed")
    _train(model, engine, range(1), 0, 1)
    dcp.save({"train": EngineState(engine)}, checkpoint_id=str(d / "one"))
    spawn_ranks(_worker, (str(d / "init"), str(d)), WORLD, init_file=str(d / "init"))
    return d


@pytest.fixture(scope="module")
def trained(spawned):
    return [torch.load(spawned / f"train{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("recipe,backend", PRESETS)
def test_fsdp_matches_one_process(trained, recipe, backend):
    r0, r1 = trained[0][recipe, backend], trained[1][recipe, backend]
    one = _single(recipe, backend)
    # sharded like the parameters: DTensor shards (half of the rows each) of masters and state
    assert r0["master_type"] == "DTensor" and r0["placements"] == "(Shard(dim=0),)"
    assert r0["local_shape"] == (16, 8) and r0["state_type"] == "DTensor"
    print(f"{recipe} ({backend}): max |master - one process| = {diff_of(r0, one):.3g}")
    # the ranks hold the same model, masters, optimizer state, scale and history
    for key in ("masters", "weights", "optim", "scale", "history", "layers"):
        _assert_same(r0[key], r1[key], key)
    # step 0 is bit-identical to one process on each rank's rows: every layer rounds the
    # full gathered weight, and scaled formats use the global amax (rank 1's rows are 4x
    # larger, so a rank-local activation amax would give rank 0 another scale)
    for rank, r in enumerate((r0, r1)):
        _assert_same(r["logits"], _rows(one["logits"], rank, WORLD), f"logits rank {rank}")
    # the loss-scale decisions are the same; the weights agree to the documented tolerance
    assert [h["skipped"] for h in r0["history"]] == [h["skipped"] for h in one["history"]]
    assert [h["scale"] for h in r0["history"]] == [h["scale"] for h in one["history"]]
    diff = diff_of(r0, one)
    assert diff <= TOLERANCE[recipe], diff
    # model weights are the master rounded once (fp16/bf16 casts as the oracle)
    cast = {"fp16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(recipe)
    if cast is not None and backend != "native":
        for name, m in zip(("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"),
                           r0["masters"]):
            _assert_same(r0["weights"][name], m.to(cast).float(), name)


def test_fsdp_gradients_overflow_as_in_one_process(trained):
    # the engine divides the loss by the data-parallel size and FSDP sums: each rank's
    # FP16 gradient is what one process computes for its rows, so FP16 overflows alike
    norms = []
    one = _single("fp16-mixed", gain=OVERFLOW_GAIN, clip=norms)
    skipped = [h["skipped"] for h in one["history"]]
    assert any(skipped) and not all(skipped), skipped     # near the edge, not over it
    for r in trained:
        assert [h["skipped"] for h in r["overflow"]["history"]] == \
            [h["skipped"] for h in one["history"]]
        assert [h["scale"] for h in r["overflow"]["history"]] == \
            [h["scale"] for h in one["history"]]
    # clip_grad_norm_ takes the norm of the whole gradient, not of a rank's shard: the
    # ranks agree exactly, and with one process up to the summation order
    mine = trained[0]["overflow"]["norms"]
    assert mine == trained[1]["overflow"]["norms"]
    finite = [(a, b) for a, b in zip(mine, norms) if math.isfinite(b)]
    assert finite and all(abs(a - b) <= 1e-5 * b for a, b in finite), (mine, norms)
    diff = diff_of(trained[0]["overflow"], one)
    print(f"fp16-mixed x{OVERFLOW_GAIN:g}: max |master - one process| = {diff:.3g}")
    assert diff <= TOLERANCE["fp16-mixed"], diff


def test_fp8_delayed_scaling_identical_on_ranks_and_to_one_process(trained):
    r0, r1 = trained[0][DELAYED, None], trained[1][DELAYED, None]
    one = _single(DELAYED)
    _assert_same(r0["layers"], r1["layers"], "layer states")
    assert set(r0["layers"]) == set(one["layers"]) and r0["layers"]
    for layer, scalers in r0["layers"].items():
        for key, s in scalers.items():
            ref = one["layers"][layer][key]
            assert s["count"] == ref["count"] == STEPS
            if key.startswith("weight_grad"):
                # a rank's weight gradient is a partial sum: the max over ranks of partial
                # amaxes is not the amax of the sum (the ranks still agree, checked above)
                continue
            # weights, activations and their gradients: the step-0 amax is a max over the
            # global batch, order-free, so bit-identical to one process
            _assert_same(s["amax_history"][0], ref["amax_history"][0], f"{layer}/{key}")


def test_inf_on_one_rank_skips_on_both(trained):
    a, b = trained[0]["inject"], trained[1]["inject"]
    expected = [step != INJECT_AT for step in range(STEPS)]
    assert a["applied"] == expected and b["applied"] == expected
    for key in ("before", "after", "end"):
        _assert_same(a[key], b[key], key)
    # the skipped step touched no weight, master or optimizer state; the scale halved
    for key in ("masters", "weights", "optim", "layers"):
        _assert_same(a["before"][key], a["after"][key], key)
    assert a["after"]["scale"] == a["before"]["scale"] / 2
    assert a["after"]["history"][-1]["skipped"] and not a["after"]["history"][-1]["grads_finite"]


def test_amax_reduced_unless_local(trained):
    assert [r["global_amax"] for r in trained] == [2.0, 2.0]
    assert [r["local_amax"] for r in trained] == [1.0, 2.0]


# --------------------------------------------------------------------------------------
# torch.distributed.checkpoint
# --------------------------------------------------------------------------------------
SAVE_AT = 2


def _ckpt_part(rank: int, out_dir: str) -> None:
    res = {}
    for i, recipe in enumerate(CKPT_RECIPES):
        # uninterrupted
        model = _sharded()
        engine = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), recipe,
                         seed=7)
        _train(model, engine, range(STEPS), rank, WORLD)
        res[recipe, "straight"] = {**_snapshot(engine), "rng": engine.generator.get_state()}
        # interrupted at SAVE_AT, saved, resumed by a fresh engine on another init
        model = _sharded()
        engine = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), recipe,
                         seed=7)
        _train(model, engine, range(SAVE_AT), rank, WORLD)
        path = os.path.join(out_dir, f"ckpt{i}")
        dcp.save({"train": EngineState(engine)}, checkpoint_id=path)
        res[recipe, "saved"] = {**_snapshot(engine), "rng": engine.generator.get_state()}
        # a fresh engine: the kept modules come from a traced example (DCP needs the
        # masters and the optimizer state to load into before the first step)
        model = _sharded(seed=1)
        engine = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), recipe,
                         seed=99, example_inputs=_rows(_batch(0)[0], rank, WORLD))
        dcp.load({"train": EngineState(engine)}, checkpoint_id=path)
        res[recipe, "loaded"] = {**_snapshot(engine), "rng": engine.generator.get_state()}
        _train(model, engine, range(SAVE_AT, STEPS), rank, WORLD)
        res[recipe, "resumed"] = {**_snapshot(engine), "rng": engine.generator.get_state()}
    # saved by one process: no generator state for rank 1, and both ranks say so
    model = _sharded()
    engine = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), "fp16-mixed")
    try:
        dcp.load({"train": EngineState(engine)}, checkpoint_id=os.path.join(out_dir, "one"))
        res["more_ranks"] = None
    except Exception as e:     # DCP gathers every rank's error into a CheckpointException
        res["more_ranks"] = f"{type(e).__name__}: {e}"
    torch.save(res, os.path.join(out_dir, f"ckpt{rank}.pt"))


@pytest.fixture(scope="module")
def checkpointed(spawned):
    return spawned, [torch.load(spawned / f"ckpt{r}.pt", weights_only=False)
                     for r in range(WORLD)]


@pytest.mark.parametrize("recipe", CKPT_RECIPES)
def test_dcp_resume_on_two_ranks_is_bit_identical(checkpointed, recipe):
    _, ranks = checkpointed
    for rank, res in enumerate(ranks):
        _assert_same(res[recipe, "loaded"], res[recipe, "saved"], f"loaded rank {rank}")
        _assert_same(res[recipe, "resumed"], res[recipe, "straight"], f"resumed rank {rank}")
    assert ranks[0][recipe, "straight"]["history"][-1]["step"] == STEPS - 1


def test_dcp_saved_on_one_process_does_not_load_on_two(checkpointed):
    _, ranks = checkpointed
    for res in ranks:
        assert res["more_ranks"] is not None
        assert "generator states of 1 rank(s), this run has 2: ranks [1]" in res["more_ranks"]


@pytest.mark.parametrize("recipe", CKPT_RECIPES)
def test_dcp_saved_on_two_ranks_loads_on_one(checkpointed, recipe):
    d, ranks = checkpointed
    saved = ranks[0][recipe, "saved"]
    model = _model(seed=1)
    engine = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), recipe, seed=99,
                     example_inputs=_batch(0)[0])
    dcp.load({"train": EngineState(engine)}, checkpoint_id=str(d / f"ckpt{CKPT_RECIPES.index(recipe)}"))
    loaded = {**_snapshot(engine), "rng": engine.generator.get_state()}
    # resharded: the full masters, weights and optimizer state of the 2-rank run, rank 0's
    # random stream, the same scaler, counters, history and amax histories
    _assert_same(loaded, saved, "loaded on one process")
    assert engine.steps == SAVE_AT
    applied = _train(model, engine, range(SAVE_AT, STEPS), 0, 1)
    assert len(applied) == STEPS - SAVE_AT and engine.steps == STEPS


def test_engine_state_needs_a_set_up_engine():
    model = _model()
    engine = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), "fp8-hybrid")
    with pytest.raises(RuntimeError, match="example_inputs"):
        EngineState(engine).state_dict()        # keep rules wait for the first forward
    with pytest.raises(TypeError, match="mixprec Engine, got Sequential"):
        EngineState(model)
