"""Keep rules on real models: norms recognised by structure and name, "first" and "last"
by execution order, on Hugging Face GPT-2, Llama and ResNet built from tiny configs
(random weights, nothing downloaded)."""
import warnings

import pytest
import torch
from torch import nn

from mixprec.engine import prepare, resolve_keep_high_precision
from mixprec.layers import is_embedding, is_gemm_layer, is_norm

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128))


def resnet():
    torch.manual_seed(0)
    return transformers.ResNetForImageClassification(transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10))


def tokens(n=2, t=16):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(0))


def keep(model, rule, inputs):
    return set(resolve_keep_high_precision(model, (rule,), example_inputs=inputs))


def names_of(model, cls_name):
    return {n for n, m in model.named_modules() if type(m).__name__ == cls_name}


def test_gpt2_first_is_the_first_conv1d_last_is_lm_head_norm_is_every_layernorm():
    model = gpt2()
    ids = {"input_ids": tokens()}
    assert model.lm_head.weight is model.transformer.wte.weight      # tied
    assert keep(model, "first", ids) == {"transformer.h.0.attn.c_attn"}
    assert keep(model, "last", ids) == {"lm_head"}
    norms = {f"transformer.h.{i}.{ln}" for i in range(2) for ln in ("ln_1", "ln_2")}
    assert keep(model, "norm", ids) == norms | {"transformer.ln_f"}


def test_llama_first_is_q_k_v_of_layer_0_last_is_lm_head_norm_is_every_rmsnorm():
    model = llama()
    ids = {"input_ids": tokens()}
    assert keep(model, "first", ids) == {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    assert keep(model, "last", ids) == {"lm_head"}
    rms = names_of(model, "LlamaRMSNorm")
    assert len(rms) == 5 and keep(model, "norm", ids) == rms


def test_resnet_first_is_the_stem_conv_last_is_the_classifier_norm_is_every_batchnorm():
    model = resnet()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert keep(model, "first", x) == {"resnet.embedder.embedder.convolution"}
    assert keep(model, "last", x) == {"classifier.1"}
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(bns) == 8 and keep(model, "norm", x) == bns


def test_recognition_by_structure_and_name():
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    from transformers.pytorch_utils import Conv1D

    class FusedRMSNorm(nn.Module):       # apex's structure: one 1-D weight, its own kernel
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

    class FusedLayerNorm(FusedRMSNorm):
        def __init__(self, n):
            super().__init__(n)
            self.bias = nn.Parameter(torch.zeros(n))

    class NormedLinear(nn.Module):       # named like a norm, owns a matrix: a GEMM layer
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 4))

    class PatchEmbed(nn.Module):         # a convolution kernel, not a lookup table
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8, 3, 4, 4))

    for m in (T5LayerNorm(8), FusedRMSNorm(8), FusedLayerNorm(8), nn.BatchNorm1d(4),
              nn.LayerNorm(4, elementwise_affine=False), nn.GroupNorm(2, 4)):
        assert is_norm(m) and not is_gemm_layer(m), m
    for m in (Conv1D(6, 4), nn.Linear(4, 4), nn.Conv2d(3, 4, 3), NormedLinear(), PatchEmbed(),
              nn.Bilinear(3, 3, 2), nn.MultiheadAttention(8, 2)):
        assert is_gemm_layer(m) and not is_norm(m), m
    assert is_embedding(nn.Embedding(4, 2)) and not is_gemm_layer(nn.Embedding(4, 2))
    assert not is_embedding(PatchEmbed())


def test_norm_lookalike_is_reported_and_not_kept():
    class WeirdNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))
            self.mix = nn.Parameter(torch.ones(4, 4))

    model = nn.Sequential(nn.Linear(4, 4), WeirdNorm(), nn.LayerNorm(4))
    with pytest.warns(UserWarning, match=r"'norm' does not keep '1' \(WeirdNorm"):
        assert resolve_keep_high_precision(model, ("norm",)) == {"2"}


def test_lazy_trace_takes_keyword_inputs_of_the_first_forward():
    model = llama()
    ids = tokens()
    mp = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3), "fp8-hybrid")
    assert mp.keep is None
    with mp.autocast():
        loss = model(input_ids=ids, labels=ids).loss
    expected = ({f"model.layers.0.self_attn.{p}_proj" for p in "qkv"} | {"lm_head"}
                | names_of(model, "LlamaRMSNorm"))
    assert mp.keep == expected
    mp.backward(loss)
    assert mp.step()


def test_llama_rmsnorm_weights_move_under_fp8_e5m2():
    """Kept in FP16 (the preset's high precision), the RMSNorm weights follow their
    updates; stored in E5M2 (ulp 0.25 at 1.0) they stay exactly 1.0."""
    def norm_weights(keep_rules, steps=3):
        model = llama()
        ids = tokens()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # ops a concurrent coverage change may name
            mp = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3), "fp8-e5m2",
                         backend="emulated", keep_high_precision=keep_rules, seed=0)
            for _ in range(steps):
                with mp.autocast():
                    loss = model(input_ids=ids, labels=ids).loss
                mp.backward(loss)
                mp.step()
                mp.zero_grad()
        assert mp.skipped_steps < steps
        return torch.cat([m.weight.detach() for n, m in model.named_modules()
                          if type(m).__name__ == "LlamaRMSNorm"])

    kept = norm_weights(("first", "last", "norm"))
    assert torch.equal(kept, kept.half().float())                 # stored in FP16
    assert float((kept != 1.0).float().mean()) > 0.5
    stuck = norm_weights(("first", "last"))
    assert torch.equal(stuck, torch.ones_like(stuck))


def test_gpt2_tied_lm_head_is_stored_in_fp16_under_fp8_e5m2():
    """lm_head (kept, "last") shares its weight with transformer.wte (not kept): the one
    tensor is stored in the preset's high precision (FP16), not in E5M2."""
    model = gpt2()
    mp = prepare(model, torch.optim.AdamW(model.parameters()), "fp8-e5m2", backend="emulated",
                 example_inputs={"input_ids": tokens()})
    assert "lm_head" in mp.keep and "transformer.wte" not in mp.keep
    w = model.lm_head.weight.detach()
    assert w is not None and model.transformer.wte.weight is model.lm_head.weight
    assert torch.equal(w, w.half().float())
    assert not torch.equal(w, w.to(torch.float8_e5m2).float())
    c_fc = model.transformer.h[1].mlp.c_fc.weight.detach()          # an ordinary layer
    assert torch.equal(c_fc, c_fc.to(torch.float8_e5m2).float())
