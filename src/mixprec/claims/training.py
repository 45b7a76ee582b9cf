"""Claims that need training: master weights, loss scaling, FP8 recipes, BF16, memory.

Every run is an MLP on the bundled digits data (see :mod:`.digits`); the papers' networks
(speech, detection, ImageNet) are out of reach offline, so these rows reproduce the
mechanisms, and the verdict says so.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from .base import Outcome, RunContext, Verdict, claim, explain, put_finite, verdict_of
from .digits import TrainConfig, multiplier_for, smooth, train_digits

__all__ = ["base_config", "run_recipes", "saved_tensor_bytes"]

_NEEDS = ("engine", "emulate", "quant")


def base_config(ctx: RunContext, **kw) -> TrainConfig:
    """A 64-64-64-10 MLP, 600 SGD steps at lr 0.2 (FP32: ~97% test accuracy); quick: 150
    steps at lr 0.3 (~95%)."""
    kw = {"steps": ctx.pick(150, 600), "lr": ctx.pick(0.3, 0.2), "hidden": (64, 64),
          "seed": ctx.seed, **kw}
    return TrainConfig(**kw)


def run_recipes(cfg: TrainConfig, recipes: dict, m: dict) -> dict:
    """Train every ``{label: recipe}`` from ``cfg`` and put its numbers into ``m``."""
    results = {}
    for label, recipe in recipes.items():
        r = train_digits(replace(cfg, recipe=recipe))
        results[label] = r
        put_finite(m, f"{label}_train_loss", r["train_loss"])
        m[f"{label}_test_accuracy"] = r["test_accuracy"]
        m[f"{label}_skipped_steps"] = r["skipped_steps"]
        m[f"{label}_zero_grad_fraction"] = r["zero_grad_fraction"]
        if r["stopped"]:
            m[f"{label}_stopped"] = True
    return results


def _loss_plot(title: str, results: dict) -> dict:
    curves = {k: smooth(r["losses"]) for k, r in results.items()}
    n = max(len(c) for c in curves.values())
    steps = max(len(r["losses"]) for r in results.values())
    return {"title": title, "xlabel": "step", "ylabel": "training loss (smoothed)", "logy": True,
            "x": [round(i * steps / max(n, 1)) for i in range(n)], "lines": curves}


def _acc(m: dict, label: str) -> str:
    return f"{100 * m[f'{label}_test_accuracy']:.1f}%"


def _loss(m: dict, label: str) -> float:
    return m.get(f"{label}_train_loss", float("inf"))


# --------------------------------------------------------------------------------------
@claim("master-weights",
       claim="Without an FP32 master copy, updates smaller than half an FP16 ulp of the "
             "weight are lost and training degrades",
       source="Micikevicius et al. 2018 (ICLR)",
       paper_value="updating FP16 weights directly cost the Mandarin speech model 80% "
                   "relative accuracy",
       needs=_NEEDS)
def master_weights(ctx: RunContext) -> Outcome:
    m: dict = {}
    res = {}
    small = 0.02                     # a small SGD learning rate: updates ~1e-4 of the weights
    for lr in ctx.pick((small,), (base_config(ctx).lr, small)):
        tag = f"lr{lr:g}"
        got = run_recipes(base_config(ctx, lr=lr),
                          {f"{tag}_fp32": "fp32", f"{tag}_fp16_mixed": "fp16-mixed",
                           f"{tag}_fp16_pure": "fp16-pure"}, m)
        for k, r in got.items():
            m[f"{k}_lost_update_fraction"] = r["lost_update_fraction"]
        res.update(got)
    t = f"lr{small:g}"
    lost = lambda k: m[f"{t}_{k}_lost_update_fraction"]
    m["pure_accuracy_drop_points"] = 100 * (m[f"{t}_fp32_test_accuracy"]
                                            - m[f"{t}_fp16_pure_test_accuracy"])
    mechanism = {"pure_loses_updates": lost("fp16_pure") > 10 * lost("fp16_mixed") + 0.01,
                 "mixed_matches": _loss(m, f"{t}_fp16_mixed") < 1.05 * _loss(m, f"{t}_fp32") + 0.01}
    degrades = (_loss(m, f"{t}_fp16_pure") > 1.1 * _loss(m, f"{t}_fp32")
                or m["pure_accuracy_drop_points"] > 2.0)
    summary = (f"SGD lr {small:g}: updates lost fp16-pure {100 * lost('fp16_pure'):.0f}% vs "
               f"mixed {100 * lost('fp16_mixed'):.1f}%; train loss fp32 "
               f"{_loss(m, f'{t}_fp32'):.3f}, mixed {_loss(m, f'{t}_fp16_mixed'):.3f}, pure "
               f"{_loss(m, f'{t}_fp16_pure'):.3f}; test acc {_acc(m, f'{t}_fp32')} / "
               f"{_acc(m, f'{t}_fp16_mixed')} / {_acc(m, f'{t}_fp16_pure')}")
    if all(mechanism.values()):
        reason = ("The mechanism reproduces: updating FP16 weights in place rounds away "
                  f"{100 * lost('fp16_pure'):.0f}% of the element updates per step, and FP32 "
                  "master weights track FP32. " +
                  ("The loss lags FP32 as a result. " if degrades else
                   "On this digits MLP that costs little accuracy "
                   f"({m['pure_accuracy_drop_points']:+.1f} points): the lost updates are the "
                   "smallest ones, and the others still move the weights. ") +
                  "The paper's 80% relative accuracy loss is for a Mandarin speech model we do "
                  "not have.")
    else:
        reason = (f"checks failed: {[c for c, v in mechanism.items() if not v]}; the paper's "
                  "80% figure is for a Mandarin speech model we do not have.")
    # the verdict rests on the mechanism; whether the loss of updates costs accuracy here
    # (the paper's outcome) is recorded as a check of its own
    return Outcome(m, summary, verdict_of(mechanism, partly=True), reason,
                   {"train": repr(base_config(ctx, lr=small)), "optimizer": "SGD"},
                   _loss_plot(f"Master weights (SGD lr {small:g})",
                              {k: v for k, v in res.items() if k.startswith(t)}),
                   checks={**mechanism, "pure_trains_worse": degrades})


# --------------------------------------------------------------------------------------
_SCALES = (1, 8, 128, 1024)


@claim("loss-scaling",
       claim="Loss scaling rescues training whose gradients sit below FP16's range",
       source="Micikevicius et al. 2018 (ICLR)",
       paper_value="SSD diverges in FP16 without scaling, matches FP32 with S = 8 (mAP 77.1 vs "
                   "76.9); values in [2^-27, 2^-24) mattered; constant scales 8 to 32K",
       needs=_NEEDS)
def loss_scaling(ctx: RunContext) -> Outcome:
    cfg = base_config(ctx)
    mult = multiplier_for(cfg, -28.0)
    cfg = replace(cfg, loss_multiplier=mult)
    recipes = {"fp32": "fp32", "dynamic": "fp16-mixed"}
    recipes.update({f"static_{s}": f"fp16-mixed:loss_scale.kind=static,loss_scale.init_scale={s}"
                    for s in _SCALES})
    m: dict = {"loss_multiplier_log2": float(torch.tensor(mult).log2())}
    res = run_recipes(cfg, recipes, m)
    ref = _loss(m, "fp32")
    close = lambda k: _loss(m, k) < 1.1 * ref + 0.02
    checks = {"unscaled_fails": _loss(m, "static_1") > 1.5 * ref + 0.05
              and m["static_1_zero_grad_fraction"] > m["fp32_zero_grad_fraction"] + 0.2,
              "large_scale_matches": close("static_1024") and close("dynamic")}
    # the paper's SSD was rescued by S = 8; recorded, but not required of this model
    paper_scale = {"scale_8_rescues": close("static_8")}
    rescued = [s for s in _SCALES if close(f"static_{s}")]
    m["smallest_rescuing_scale"] = float(min(rescued)) if rescued else 0.0
    summary = (f"grads ~2^-28: train loss fp32 {ref:.3f}; S=" +
               ", ".join(f"{s}: {_loss(m, f'static_{s}'):.3f}" for s in _SCALES) +
               f", dynamic {_loss(m, 'dynamic'):.3f}; zero grads S=1 "
               f"{100 * m['static_1_zero_grad_fraction']:.0f}% vs fp32 "
               f"{100 * m['fp32_zero_grad_fraction']:.0f}%")
    diverged = _loss(m, "static_1") > math.log(10)      # above the loss of a uniform guess
    rescue = m["smallest_rescuing_scale"]
    reason = (f"Gradients were pushed to ~2^-28 (loss x 2^{m['loss_multiplier_log2']:.0f}, "
              "learning rate divided by the same, so FP32 is unchanged). Unscaled FP16 flushes "
              f"{100 * m['static_1_zero_grad_fraction']:.0f}% of the weight gradients and the "
              "model " + ("diverges (final loss above the initial ln 10 = 2.30; the gradients "
                          "that survive are subnormal, coarse multiples of 2^-24)"
                          if diverged else "does not learn") +
              "; the smallest static scale within 10% of FP32 here is "
              + (f"{rescue:g}" if rescue else "none of those tried") +
              " (the paper's SSD needed 8; its gradients sat higher, in [2^-27, 2^-24)). A "
              "digits MLP, not SSD: mechanism only.")
    return Outcome(m, summary, verdict_of(checks, partly=True), explain(checks, reason),
                   {"train": repr(cfg), "scales": list(_SCALES), "target_grad_log2": -28},
                   _loss_plot("FP16 with gradients near 2^-28", res),
                   checks={**checks, **paper_scale})


# --------------------------------------------------------------------------------------
@claim("e5m2-training",
       claim="FP8 (E5M2) training needs (enhanced) loss scaling",
       source="Mellempudi et al. 2019",
       paper_value="enhanced loss scaling for FP8's small subnormal range (results table and "
                   "thresholds unconfirmed)",
       needs=_NEEDS)
def e5m2_training(ctx: RunContext) -> Outcome:
    cfg = base_config(ctx)
    mult = multiplier_for(cfg, -20.0)
    cfg = replace(cfg, loss_multiplier=mult)
    m: dict = {"loss_multiplier_log2": float(torch.tensor(mult).log2())}
    every = "keep_high_precision=none"          # every layer in E5M2, none kept in FP16
    res = run_recipes(cfg, {"fp32": "fp32", "preset_enhanced": "fp8-e5m2",
                            "preset_unscaled": "fp8-e5m2:loss_scale.kind=none",
                            "all_enhanced": f"fp8-e5m2:{every}",
                            "all_unscaled": f"fp8-e5m2:{every},loss_scale.kind=none"}, m)
    ref = _loss(m, "fp32")
    checks = {"unscaled_worse": _loss(m, "all_unscaled") > 1.3 * _loss(m, "all_enhanced") + 0.02,
              "scaled_trains": _loss(m, "all_enhanced") < 1.5 * ref + 0.05}
    zeros = lambda k: f"{100 * m[f'{k}_zero_grad_fraction']:.0f}%"
    summary = (f"grads ~2^-20, all layers E5M2: train loss fp32 {ref:.3f}, enhanced scaling "
               f"{_loss(m, 'all_enhanced'):.3f}, unscaled {_loss(m, 'all_unscaled'):.3f}; test acc "
               f"{_acc(m, 'fp32')} / {_acc(m, 'all_enhanced')} / {_acc(m, 'all_unscaled')}; "
               f"preset (first/last FP16): {_loss(m, 'preset_enhanced'):.3f} vs "
               f"{_loss(m, 'preset_unscaled'):.3f}")
    reason = (f"Gradients pushed to ~2^-20 (loss x 2^{m['loss_multiplier_log2']:.0f}, lr "
              "compensated), as in deeper networks. With every layer in E5M2 and no loss scale "
              f"{zeros('all_unscaled')} of the weight gradients are zero (enhanced scaling: "
              f"{zeros('all_enhanced')}, FP32: {zeros('fp32')}) and the loss ends "
              f"{_loss(m, 'all_unscaled') / max(_loss(m, 'all_enhanced'), 1e-12):.1f}x higher. The "
              "preset keeps the first and last layers in FP16, so only the middle layer sees "
              f"E5M2 and the effect is smaller ({zeros('preset_unscaled')} zero gradients). A "
              "digits MLP, not the paper's ImageNet/WMT models: mechanism only.")
    return Outcome(m, summary, verdict_of(checks, partly=True), explain(checks, reason),
                   {"train": repr(cfg), "target_grad_log2": -20},
                   _loss_plot("E5M2 with and without loss scaling", res), checks=checks)


# --------------------------------------------------------------------------------------
@claim("stochastic-rounding-training",
       claim="FP8 training needs stochastic rounding for gradients and the FP16 master weights",
       source="Mellempudi et al. 2019 (secondary sources)",
       paper_value="stochastic rounding for all gradients and FP16 master weights re-rounded "
                   "stochastically after each step (no ablation figure in FACTS.md)",
       needs=_NEEDS)
def stochastic_rounding_training(ctx: RunContext) -> Outcome:
    m: dict = {}
    recipes = {"fp32": "fp32", "e5m2": "fp8-e5m2",
               "grads_nearest": "fp8-e5m2:grads.rounding=nearest",
               "master_nearest": "fp8-e5m2:master.rounding=nearest"}
    base_lr = base_config(ctx).lr
    worse: dict = {}
    res = {}
    for lr in ctx.pick((base_lr,), (base_lr, base_lr / 10)):
        t = f"lr{lr:g}"
        got = run_recipes(base_config(ctx, lr=lr), {f"{t}_{k}": v for k, v in recipes.items()}, m)
        for k, r in got.items():
            m[f"{k}_lost_update_fraction"] = r["lost_update_fraction"]
        res.update(got)
        ref = _loss(m, f"{t}_e5m2")
        for k in ("grads_nearest", "master_nearest"):
            worse[f"{t}_{k}"] = _loss(m, f"{t}_{k}") > 1.1 * ref + 0.01
    line = lambda t: (f"lr {t[2:]}: fp32 {_loss(m, f'{t}_fp32'):.3f}, fp8-e5m2 "
                      f"{_loss(m, f'{t}_e5m2'):.3f}, grads nearest "
                      f"{_loss(m, f'{t}_grads_nearest'):.3f}, master nearest "
                      f"{_loss(m, f'{t}_master_nearest'):.3f}")
    tags = sorted({k.split("_")[0] for k in worse}, key=lambda t: -float(t[2:]))
    summary = "train loss " + "; ".join(line(t) for t in tags)
    hurt = [k for k, v in worse.items() if v]
    if hurt:
        verdict = Verdict.PARTLY
        reason = (f"Nearest rounding trains worse than the stochastic preset in {hurt} "
                  f"(loss > 1.1x); elsewhere it makes no material difference on this small "
                  "model and data, unlike the paper's ImageNet/WMT networks.")
    else:
        verdict = Verdict.NOT_REPRODUCED
        reason = ("Neither nearest-rounding ablation trains measurably worse than the preset "
                  "on digits (loss within 10%): on this small model the bias of nearest "
                  "rounding does not show (the isolated effect is in stochastic-rounding).")
    return Outcome(m, summary, verdict, reason + " The paper gives no ablation number.",
                   {"train": repr(base_config(ctx)), "recipes": recipes},
                   _loss_plot("Stochastic vs nearest rounding, E5M2",
                              {k: v for k, v in res.items() if k.startswith(tags[0])}),
                   checks={f"{k}_trains_worse": v for k, v in worse.items()})


# --------------------------------------------------------------------------------------
@claim("bf16-training",
       claim="BF16 mixed precision trains without loss scaling and skips no steps",
       source="bf16 practice; Micikevicius et al. 2018 for FP16's need of scaling",
       paper_value="(no paper number) bf16-mixed within ~1 point of FP32 without a scaler",
       needs=_NEEDS)
def bf16_training(ctx: RunContext) -> Outcome:
    cfg = base_config(ctx)
    m: dict = {}
    res = run_recipes(cfg, {"fp32": "fp32", "bf16": "bf16-mixed"}, m)
    small = replace(cfg, loss_multiplier=multiplier_for(cfg, -28.0))
    res.update(run_recipes(small, {"tiny_fp32": "fp32", "tiny_bf16": "bf16-mixed",
                                   "tiny_fp16_unscaled": "fp16-mixed:loss_scale.kind=none"}, m))
    m["bf16_backend_native"] = res["bf16"]["backend"] == "native"
    gap = 100 * (m["fp32_test_accuracy"] - m["bf16_test_accuracy"])
    m["accuracy_gap_points"] = gap
    checks = {"within_1pt": abs(gap) <= 1.0 + (100 / 360 if ctx.quick else 0),
              "no_skips": m["bf16_skipped_steps"] == 0 and m["tiny_bf16_skipped_steps"] == 0,
              "tiny_grads_ok": _loss(m, "tiny_bf16") < 1.1 * _loss(m, "tiny_fp32") + 0.02}
    summary = (f"test acc fp32 {_acc(m, 'fp32')}, bf16-mixed {_acc(m, 'bf16')} (gap {gap:+.1f} pt), "
               f"skipped {m['bf16_skipped_steps']}; grads ~2^-28 unscaled: bf16 loss "
               f"{_loss(m, 'tiny_bf16'):.3f} vs fp16 {_loss(m, 'tiny_fp16_unscaled'):.3f} "
               f"(fp32 {_loss(m, 'tiny_fp32'):.3f})")
    reason = (f"bf16-mixed ({res['bf16']['backend']} backend) has no loss scaler and skipped no "
              "step; with gradients pushed to ~2^-28 it still trains where unscaled FP16 "
              "does not. One digits MLP (360 test images: one image is 0.28 points).")
    return Outcome(m, summary, verdict_of(checks), explain(checks, reason), {"train": repr(cfg)},
                   checks=checks)


# --------------------------------------------------------------------------------------
def saved_tensor_bytes(model: torch.nn.Module, mp, x: torch.Tensor) -> dict:
    """Bytes autograd saves for backward in one forward pass + loss under ``mp.autocast()``,
    each storage counted once: {"total", "weights", "batch", "activations"}.

    A saved tensor counts as a weight when it shares storage with a parameter or master,
    or has a parameter's shape (the low-precision weight copies emulated layers save);
    the batch size must therefore differ from every parameter dimension. ``x``'s own
    storage, saved by layers that keep the caller's batch itself (torch's FP32 layers,
    and mixprec's when they round it again in backward), counts as "batch": it exists
    whether or not it is saved, so it is no activation memory.
    """
    import torch.nn.functional as F
    params = list(model.parameters()) + list(mp.master_params)
    shapes = {tuple(p.shape) for p in params}
    if len(x) in {d for sh in shapes for d in sh}:
        raise ValueError(f"batch size {len(x)} equals a parameter dimension; pick another")
    ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict = {}

    batch = x.untyped_storage().data_ptr()

    def pack(t):
        st = t.untyped_storage()
        kind = ("batch" if st.data_ptr() == batch else
                "weight" if st.data_ptr() in ptrs or tuple(t.shape) in shapes else "")
        seen[st.data_ptr()] = (st.nbytes(), kind, str(t.dtype).replace("torch.", ""))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mp.autocast():
        loss = F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long))
    del loss
    out = {"total": sum(n for n, _, _ in seen.values()),
           "weights": sum(n for n, k, _ in seen.values() if k == "weight"),
           "batch": sum(n for n, k, _ in seen.values() if k == "batch")}
    out["activations"] = out["total"] - out["weights"] - out["batch"]
    for n, k, dtype in seen.values():
        if not k:
            out[f"activations_{dtype}"] = out.get(f"activations_{dtype}", 0) + n
    return out


@claim("activation-memory",
       claim="Mixed precision halves the activation memory saved for backward (FP8: a quarter)",
       source="Micikevicius et al. 2018 (ICLR)",
       paper_value="weights +50% (master copy), activations halved, total \"nearly 2x\" lower",
       needs=_NEEDS)
def activation_memory(ctx: RunContext) -> Outcome:
    from ..engine import prepare
    from .digits import make_mlp
    hidden = (256, 256, 256, 256)
    x = torch.rand(ctx.pick(200, 2000), 64, generator=ctx.generator(20))
    recipes = {"fp32": "fp32", "fp16_mixed": "fp16-mixed", "bf16_mixed": "bf16-mixed",
               "fp8_e5m2": "fp8-e5m2", "fp8_e5m2_all_layers": "fp8-e5m2:keep_high_precision=none"}
    m: dict = {}
    for label, recipe in recipes.items():
        model = make_mlp(hidden, ctx.seed)
        mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe,
                     backend="emulated", seed=ctx.seed, example_inputs=x)
        for kind, n in saved_tensor_bytes(model, mp, x).items():
            m[f"{label}_saved_{kind}_bytes"] = n
    for label in recipes:
        if label != "fp32":
            m[f"{label}_activation_ratio"] = (m[f"{label}_saved_activations_bytes"]
                                              / m["fp32_saved_activations_bytes"])
    checks = {"fp16_half": abs(m["fp16_mixed_activation_ratio"] - 0.5) < 0.05}
    fp8_quarter = abs(m["fp8_e5m2_all_layers_activation_ratio"] - 0.25) < 0.05
    f8 = "fp8_e5m2_all_layers_saved_activations"
    fp8_parts = ", ".join(f"{k[len(f8) + 1:-6]} {v / m[f'{f8}_bytes']:.0%}"
                          for k, v in m.items() if k.startswith(f8 + "_") and k != f"{f8}_bytes")
    summary = (f"activation bytes saved for backward vs fp32: fp16-mixed "
               f"{m['fp16_mixed_activation_ratio']:.2f}, bf16-mixed {m['bf16_mixed_activation_ratio']:.2f}, "
               f"fp8-e5m2 {m['fp8_e5m2_activation_ratio']:.2f} "
               f"(all layers e5m2: {m['fp8_e5m2_all_layers_activation_ratio']:.2f})")
    reason = ("Measured with torch.autograd.graph.saved_tensors_hooks on a 64-256x4-10 MLP "
              "(emulated backend, each storage counted once, weights and their saved "
              "low-precision copies excluded, and so is the batch itself, which the caller "
              "holds anyway). FP16 halves the activations as the paper says. "
              + (f"FP8 with every layer in E5M2 saves a quarter "
                 f"({m['fp8_e5m2_all_layers_activation_ratio']:.2f}); the preset, which keeps "
                 f"the first and last layers in FP16, "
                 f"{m['fp8_e5m2_activation_ratio']:.2f}. " if fp8_quarter else
                 "FP8 does not reach a quarter: by bytes the saved activations of the all-E5M2 "
                 f"run are {fp8_parts}: the linear layers keep E5M2 copies of their inputs, "
                 "but the layer outputs (and so what ReLU saves) are FP16, and the preset also "
                 "keeps the first and last layers in FP16. ")
              + "The paper's 'nearly 2x' total also counts weights (+50% for the master copy) "
              "and workspace, which this row does not measure.")
    return Outcome(m, summary, verdict_of(checks, partly=True), explain(checks, reason),
                   {"hidden": list(hidden), "batch": len(x), "backend": "emulated"},
                   checks={**checks, "fp8_all_layers_quarter": fp8_quarter})
