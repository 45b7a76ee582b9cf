"""Framework integrations: mixprec recipes inside the training loops users already run.

* :mod:`mixprec.integrations.lightning` -- ``MixprecPrecision``, a PyTorch Lightning
  precision plugin: ``Trainer(plugins=[MixprecPrecision("fp8-hybrid")])``.
* :mod:`mixprec.integrations.hf` -- ``MixprecTrainer``, a Hugging Face ``Trainer`` that
  trains under a recipe: ``MixprecTrainer(model, args, recipe="fp16-mixed", ...)``.

Each module imports its framework on import; this package imports neither, so
``import mixprec`` never needs Lightning or transformers.
"""
from typing import Any

__all__: list = []


def _engine_ready(engine: Any) -> bool:
    """False while the engine's keep rules wait for the traced first forward
    (``engine.keep is None``): it has no master weights yet."""
    return getattr(engine, "keep", ()) is not None


def _load_when_ready(engine: Any, model: Any, state: dict) -> None:
    """``engine.load_state_dict(state)`` now, or, while the engine waits for its traced
    first forward, in a one-shot forward pre-hook of ``model`` that runs right after the
    engine's own (which is prepended): the restored weights, masters and loss scale are
    in place before that forward computes anything."""
    if _engine_ready(engine):
        engine.load_state_dict(state)
        return
    handle = None

    def load(module: Any, args: Any) -> None:
        if _engine_ready(engine):
            handle.remove()
            engine.load_state_dict(state)

    handle = model.register_forward_pre_hook(load)
