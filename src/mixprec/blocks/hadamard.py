"""Random Hadamard transforms (RHT) applied blockwise along the reduction dimension.

For a size n in {16, 32, 64, 128} and a sign vector s in {+1, -1}^n::

    H_1 = [1],  H_2m = [[H_m, H_m], [H_m, -H_m]]          Sylvester: H_n H_n^T = n I
    M   = diag(s) H_n / sqrt(n)                             M M^T = I
    forward   y = x M      on every group of n consecutive elements along the axis
    inverse   x = y M^T

Each row vector is multiplied by M from the right, so the signs act on the input
elements first and the Walsh-Hadamard mixing comes second: y_j = sum_i x_i s_i H_ij / sqrt(n).
This is TransformerEngine's NVFP4 reference exactly (``H = sign_mat @ H16`` applied as
``x_rows @ (H * 1/sqrt(16))``), with its fixed vector::

    TE_NVFP4_SIGNS = [1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1]

``hadamard_transform`` needs whole groups; ``quantize_blocked`` zero-pads the axis to a
multiple of n first (zeros add nothing to a GEMM's sums) and drops the padding again when
it maps values back.

A GEMM whose two operands are transformed with the same M along the reduction dimension
is unchanged in exact arithmetic: (x M)(w M)^T = x M M^T w^T = x w^T. Quantizing the
transformed operands spreads a block's outliers over all n elements first.

Numbers: M is built in float64 from exact +-1 entries; for n = 16 and 64, 1/sqrt(n) is a
power of two and M M^T = I holds exactly in float64; for 32 and 128 it holds to within a
few float64 ulps (1/sqrt(n) is irrational). The transform itself runs as a float32
matmul, as TE's reference does, so forward-then-inverse reproduces x within float32
rounding (about n * 2^-24 relative to each group's norm).

Signs are fixed (TE's vector, or one draw from a seed) or re-drawn on every call from a
seeded ``torch.Generator``; :class:`HadamardSigns` holds that choice and its generator,
with a ``state_dict`` so a resumed run draws the same signs. :class:`SignStream` re-draws
the signs of every transform size once per optimizer step (a recipe's
``hadamard.signs=redraw``; the engine holds it and advances it in ``step()``).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

__all__ = ["TE_NVFP4_SIGNS", "hadamard_matrix", "random_signs", "fixed_signs",
           "hadamard_transform", "HadamardSigns", "SignStream"]

TE_NVFP4_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
_SIZES = (16, 32, 64, 128)


def _check_size(size: int) -> int:
    if isinstance(size, bool) or size not in _SIZES:
        raise ValueError(f"Hadamard size {size!r} not supported; valid choices: "
                         f"{', '.join(map(str, _SIZES))}")
    return size


@functools.lru_cache(maxsize=8)
def _sylvester(size: int) -> torch.Tensor:
    """The +-1 Sylvester-Hadamard matrix H_size in float64 (exact)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _as_signs(signs, size: int) -> Optional[torch.Tensor]:
    if signs is None:
        return None
    s = torch.as_tensor(signs, dtype=torch.float64).reshape(-1).cpu()
    if s.numel() != size or not bool(((s == 1) | (s == -1)).all()):
        raise ValueError(f"signs must be {size} values of +1 or -1, got {signs!r}")
    return s


def hadamard_matrix(size: int, *, signs=None, normalized: bool = True,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return M = diag(signs) H_size (/ sqrt(size) when ``normalized``) as ``dtype``.

    >>> hadamard_matrix(16, signs=TE_NVFP4_SIGNS)[3, :2]
    tensor([-0.2500, 0.2500], dtype=torch.float64)
    """
    size = _check_size(size)
    h = _sylvester(size)
    s = _as_signs(signs, size)
    if s is not None:
        h = s[:, None] * h
    if normalized:
        h = h * (1.0 / math.sqrt(size))
    return h.to(dtype)


def random_signs(size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``size`` independent fair +-1 signs (float32) drawn from ``generator``."""
    size = _check_size(size)
    device = generator.device if generator is not None else "cpu"
    bits = torch.randint(0, 2, (size,), generator=generator, device=device)
    return (bits * 2 - 1).to(torch.float32)


@functools.lru_cache(maxsize=32)
def _fixed_signs(size: int, seed: int) -> torch.Tensor:
    return random_signs(size, torch.Generator().manual_seed(seed))


def fixed_signs(size: int, seed: int = 0) -> torch.Tensor:
    """The signs of a "fixed" source: the first draw of a generator seeded with ``seed``
    (the same vector as ``HadamardSigns(size, "fixed", seed=seed).current()``)."""
    return _fixed_signs(_check_size(size), int(seed)).clone()


def hadamard_transform(x: torch.Tensor, size: int, *, signs=None, axis: int = -1,
                       inverse: bool = False) -> torch.Tensor:
    """Apply M (or M^T with ``inverse``) to every group of ``size`` elements along ``axis``.

    The length of ``axis`` must be a multiple of ``size``. Computed in float32 (the
    result is float32) as ``x_groups @ M`` with M = diag(signs) H / sqrt(size) rounded to
    float32 entries; ``signs=None`` means all +1.

    >>> x = torch.randn(4, 32)
    >>> y = hadamard_transform(x, 16, signs=TE_NVFP4_SIGNS)
    >>> torch.allclose(hadamard_transform(y, 16, signs=TE_NVFP4_SIGNS, inverse=True), x, atol=1e-6)
    True
    """
    size = _check_size(size)
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError("hadamard_transform needs a tensor with at least one dimension")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a tensor of {x.dim()} dimensions")
    n = x.shape[axis]
    if n % size:
        raise ValueError(f"the Hadamard transform of size {size} needs the length of axis "
                         f"{axis} to be a multiple of {size}, got {n}")
    m = hadamard_matrix(size, signs=signs, dtype=torch.float32).to(x.device)
    if inverse:
        m = m.t()
    hp = x.detach().to(torch.float32).movedim(axis, -1)
    shape = hp.shape
    out = hp.reshape(-1, size) @ m
    return out.reshape(shape).movedim(-1, axis)


class HadamardSigns:
    """Where a layer's Hadamard signs come from: fixed, or re-drawn from a seeded stream.

    mode "te"     TransformerEngine's fixed NVFP4 vector (size 16)
         "none"   all +1 (a plain Walsh-Hadamard transform)
         "fixed"  one draw from ``seed``, kept for the whole run
         "redraw" a fresh draw on every ``next()`` from a generator seeded with ``seed``

    ``current()`` returns the signs in use; ``next()`` advances them (only "redraw"
    changes anything) and returns them. ``state_dict()`` holds the generator's state, so
    a run resumed from a checkpoint draws the same sequence.
    """

    MODES = ("te", "none", "fixed", "redraw")

    def __init__(self, size: int, mode: str = "redraw", *, seed: int = 0):
        self.size = _check_size(size)
        if mode not in self.MODES:
            raise ValueError(f"unknown sign mode {mode!r}; valid choices: {', '.join(self.MODES)}")
        if mode == "te" and size != 16:
            raise ValueError(f"sign mode 'te' is TransformerEngine's 16-entry vector; size "
                             f"must be 16, got {size}")
        self.mode, self.seed = mode, int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)
        if mode == "te":
            self._signs = torch.tensor(TE_NVFP4_SIGNS, dtype=torch.float32)
        elif mode == "none":
            self._signs = torch.ones(size, dtype=torch.float32)
        else:
            self._signs = random_signs(size, self._gen)

    def current(self) -> torch.Tensor:
        return self._signs.clone()

    def next(self) -> torch.Tensor:
        if self.mode == "redraw":
            self._signs = random_signs(self.size, self._gen)
        return self.current()

    def state_dict(self) -> dict:
        return {"size": self.size, "mode": self.mode, "seed": self.seed,
                "generator": self._gen.get_state(), "signs": self._signs.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size or state["mode"] != self.mode:
            raise ValueError(f"state is for size {state['size']}, mode {state['mode']!r}; "
                             f"this HadamardSigns has size {self.size}, mode {self.mode!r}")
        self.seed = int(state["seed"])
        self._gen.set_state(state["generator"])
        self._signs = state["signs"].detach().to(torch.float32).clone()

    def __repr__(self) -> str:
        return f"HadamardSigns(size={self.size}, mode={self.mode!r}, seed={self.seed})"


class SignStream:
    """Hadamard signs re-drawn once per optimizer step from one seeded stream.

    One generator seeded with ``seed`` is drawn in a fixed order, step after step::

        g = torch.Generator().manual_seed(seed)
        step k = 0, 1, ...:  for n in sorted(sizes):  s_k[n] = 2 * randint(0, 2, (n,), g) - 1

    so with a single size, step 0's signs are ``fixed_signs(n, seed)``. ``current()`` is
    the mapping {n: signs} of the current step; ``advance()`` moves to the next step and
    builds a new mapping (a holder of the old one keeps the old signs: the forward and
    backward of one step see the same M, so the transform pair stays exact).
    ``state_dict()`` holds the step count, the generator state and the current signs, so
    a run resumed from a checkpoint draws exactly the signs an uninterrupted one would.
    Data-parallel ranks need no communication: each builds the stream from the same seed
    and advances it once per optimizer step, so all draw the same signs.
    """

    def __init__(self, sizes, *, seed: int = 0):
        sizes = tuple(sorted({_check_size(n) for n in sizes}))
        if not sizes:
            raise ValueError("SignStream needs at least one transform size; valid sizes: "
                             f"{', '.join(map(str, _SIZES))}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.sizes, self.seed, self.step = sizes, int(seed), 0
        self._gen = torch.Generator().manual_seed(self.seed)
        self._signs = self._draw()

    def _draw(self) -> dict:
        return {n: random_signs(n, self._gen) for n in self.sizes}

    def current(self) -> dict:
        """{size: float32 signs} of the current step (do not modify the tensors)."""
        return self._signs

    def advance(self) -> dict:
        """Draw the next step's signs; return them."""
        self._signs = self._draw()
        self.step += 1
        return self._signs

    def state_dict(self) -> dict:
        return {"sizes": list(self.sizes), "seed": self.seed, "step": self.step,
                "generator": self._gen.get_state(),
                "signs": {n: s.clone() for n, s in self._signs.items()}}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["sizes"]) != self.sizes or int(state["seed"]) != self.seed:
            raise ValueError(f"sign stream state is for sizes {tuple(state['sizes'])}, seed "
                             f"{state['seed']}; this stream has sizes {self.sizes}, seed "
                             f"{self.seed}")
        self._gen.set_state(state["generator"])
        self.step = int(state["step"])
        self._signs = {int(n): s.detach().to(torch.float32).clone()
                       for n, s in state["signs"].items()}

    def __repr__(self) -> str:
        return f"SignStream(sizes={self.sizes}, seed={self.seed}, step={self.step})"
