"""Claims that need data or compute this project does not have offline.

They are listed, with the paper's values exactly as FACTS.md states them, rather than
left out: a reader sees what was not checked and why. Their verdict is "out of reach"
with what they need (e.g. "ImageNet"), never "not reproduced": nothing was measured.
"""
from __future__ import annotations

from .base import Outcome, RunContext, Verdict, claim

_IMAGENET = ("needs ImageNet-1K (1.28M images) and days of GPU time; nothing is downloaded "
             "here and the machine has 2 CPU cores")


def _out_of_reach(needs: str, why: str, note: str = ""):
    def run(ctx: RunContext) -> Outcome:
        return Outcome({}, "not measured", Verdict.OUT_OF_REACH,
                       why + (f". {note}" if note else "."), needs=needs)
    return run


# (id, needs: short label of what is missing, claim, source, paper value, why, note)
_ROWS = [
    ("resnet50-imagenet", "ImageNet", "Mixed precision matches FP32 on ResNet-50 / ImageNet",
     "Micikevicius et al. 2018", "ResNet-50 top-1: 75.92 FP32, 76.04 mixed", _IMAGENET, ""),
    ("imagenet-cnns", "ImageNet",
     "Six ImageNet CNNs train in mixed precision without loss scaling",
     "Micikevicius et al. 2018", "six ImageNet CNNs within 0.3 points; none needed loss scaling",
     _IMAGENET, "bf16-training and loss-scaling show the mechanism on digits"),
    ("ssd-detection", "VOC/COCO", "Multibox SSD needs loss scaling in FP16",
     "Micikevicius et al. 2018",
     "activation gradients 67% zero (Fig. 3, FP32); diverges in FP16 without scaling, matches "
     "FP32 with S = 8 (mAP 77.1 vs 76.9)",
     "needs PASCAL VOC / COCO and an SSD detector trained for days on GPUs",
     "loss-scaling reproduces the mechanism on a digits MLP"),
    ("faster-rcnn", "PASCAL VOC", "Faster R-CNN benefits from loss scaling",
     "Micikevicius et al. 2018", "mAP 69.1 FP32, 68.6 mixed without scaling, 69.7 with",
     "needs PASCAL VOC and a Faster R-CNN trained on GPUs", ""),
    ("biglstm", "1B Word", "The bigLSTM language model needs loss scaling",
     "Micikevicius et al. 2018", "scale 128; without it diverges after ~300K iterations",
     "needs the 1-billion-word benchmark and ~300K iterations of a large LSTM on GPUs", ""),
    ("deepspeech2", "speech data", "DeepSpeech 2 trains as well in mixed precision",
     "Micikevicius et al. 2018", "English CER 2.20 FP32 vs 1.99 mixed",
     "needs thousands of hours of speech data and GPU training", ""),
    ("fp8-imagenet-wmt", "ImageNet/WMT16",
     "8-bit floating-point training matches FP32 on large models",
     "Mellempudi et al. 2019",
     "ResNet-18/34/50 on ImageNet-1K, GNMT and Transformer on WMT16: slightly higher "
     "validation accuracy than the FP32 baseline (abstract; results table unconfirmed)",
     _IMAGENET + " (and WMT16)",
     "e5m2-training and stochastic-rounding-training run the recipe on digits"),
]

for _id, _needs, _claim, _source, _paper, _why, _note in _ROWS:
    claim(_id, claim=_claim, source=_source, paper_value=_paper)(
        _out_of_reach(_needs, _why, _note))
