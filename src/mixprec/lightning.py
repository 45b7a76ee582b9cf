"""``mixprec.lightning.Precision``: the PyTorch Lightning precision plugin under a short
name (:class:`mixprec.integrations.lightning.MixprecPrecision`).

>>> import lightning.pytorch as pl, mixprec.lightning
>>> trainer = pl.Trainer(plugins=[mixprec.lightning.Precision("fp8-hybrid")])
"""
from .integrations.lightning import MixprecPrecision
from .integrations.lightning import MixprecPrecision as Precision

__all__ = ["Precision", "MixprecPrecision"]
