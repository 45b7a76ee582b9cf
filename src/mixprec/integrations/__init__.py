"""Framework integrations: mixprec recipes inside the training loops users already run.

* :mod:`mixprec.integrations.lightning` -- ``MixprecPrecision``, a PyTorch Lightning
  precision plugin: ``Trainer(plugins=[MixprecPrecision("fp8-hybrid")])``.
* :mod:`mixprec.integrations.hf` -- ``MixprecTrainer``, a Hugging Face ``Trainer`` that
  trains under a recipe: ``MixprecTrainer(model, args, recipe="fp16-mixed", ...)``.

Each module imports its framework on import; this package imports neither, so
``import mixprec`` never needs Lightning or transformers.
"""
__all__: list = []
