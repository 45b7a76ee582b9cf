"""Hugging Face models built from configs with random weights: nothing is downloaded.

* ``mixprec compare --model hf:SPEC``: SPEC is a ``config.json`` file, a directory that
  holds one, or a model name already in the local Hugging Face cache (looked up with
  ``local_files_only=True``). The model is ``AutoModelForCausalLM.from_config(config)``
  (random init under the run's seed), wrapped by :class:`CausalLMLogits` so that it maps
  (B, T) token ids to (B, T, vocab) logits, the ``lm`` task's contract.
* Tiny configs of GPT-2, Llama and a ResNet with BatchNorm (:func:`tiny_model`) for
  tests and benchmarks.

>>> model = causal_lm_from_config("configs/tiny-llama.json")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["HF_PREFIX", "load_hf_config", "CausalLMLogits", "causal_lm_from_config",
           "TINY_MODELS", "tiny_config", "tiny_model", "tiny_batch"]

HF_PREFIX = "hf:"
_SPEC_FORMS = ("a config.json file, a directory holding config.json, or a model name in "
               "the local Hugging Face cache (nothing is downloaded)")


def _config_from_dict(d: dict, where: str) -> Any:
    from transformers import CONFIG_MAPPING, AutoConfig
    d = dict(d)
    model_type = d.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        some = ", ".join(sorted(CONFIG_MAPPING.keys())[:12])
        raise ValueError(f"{where}: model_type {model_type!r} is not a transformers model type; "
                         f"valid choices include {some}, ...")
    return AutoConfig.for_model(model_type, **d)


def load_hf_config(spec: str) -> Any:
    """The ``transformers`` config named by ``spec`` (see the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Hugging Face model spec must be {_SPEC_FORMS}; got {spec!r}")
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"directory {spec!r} holds no config.json; expected {_SPEC_FORMS}")
    if path.is_file():
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the config {str(path)!r} as JSON: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"config {str(path)!r} is not a JSON object")
        return _config_from_dict(d, str(path))
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"Hugging Face model spec {spec!r} is not {_SPEC_FORMS}") from e


class CausalLMLogits(nn.Module):
    """A Hugging Face causal LM as a (B, T) ids -> (B, T, vocab) logits module."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx, use_cache=False).logits


def causal_lm_from_config(spec: str) -> nn.Module:
    """``AutoModelForCausalLM.from_config(load_hf_config(spec))`` with random weights, as
    a :class:`CausalLMLogits`."""
    from transformers import AutoModelForCausalLM
    config = load_hf_config(spec)
    try:
        model = AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise ValueError(f"Hugging Face config {spec!r} (model_type "
                         f"{getattr(config, 'model_type', None)!r}) has no causal-LM model: "
                         f"{e}") from e
    return CausalLMLogits(model)


# --------------------------------------------------------------------------------------
# Tiny models for tests and benchmarks
# --------------------------------------------------------------------------------------
def _gpt2_config() -> dict:
    return {"model_type": "gpt2", "vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
            "n_positions": 32, "bos_token_id": 0, "eos_token_id": 0}


def _llama_config() -> dict:
    return {"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 32, "bos_token_id": 0,
            "eos_token_id": 0}


def _resnet_config() -> dict:
    return {"model_type": "resnet", "num_channels": 3, "embedding_size": 8,
            "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic",
            "num_labels": 5}


TINY_MODELS: dict = {"gpt2": _gpt2_config, "llama": _llama_config, "resnet": _resnet_config}


def tiny_config(name: str) -> dict:
    """The config dict (with ``model_type``) of a tiny model: gpt2, llama or resnet."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; valid choices: {', '.join(TINY_MODELS)}")
    return TINY_MODELS[name]()


def tiny_model(name: str) -> nn.Module:
    """A tiny random-init ``GPT2LMHeadModel``, ``LlamaForCausalLM`` or
    ``ResNetForImageClassification`` (BatchNorm), built under torch's current seed."""
    from transformers import AutoModelForCausalLM, ResNetForImageClassification
    config = _config_from_dict(tiny_config(name), f"tiny {name}")
    if name == "resnet":
        return ResNetForImageClassification(config)
    return AutoModelForCausalLM.from_config(config)


def tiny_batch(name: str, generator: torch.Generator) -> dict:
    """Keyword inputs (with labels) of one batch for :func:`tiny_model` ``name``."""
    if name == "resnet":
        cfg = tiny_config(name)
        return {"pixel_values": torch.randn(4, 3, 16, 16, generator=generator),
                "labels": torch.randint(0, cfg["num_labels"], (4,), generator=generator)}
    ids = torch.randint(0, tiny_config(name)["vocab_size"], (2, 16), generator=generator)
    return {"input_ids": ids, "labels": ids}
