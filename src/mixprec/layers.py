"""What kind of layer a module is, and the order in which a forward pass runs them.

The keep rules of a recipe ("first", "last", "norm") name layers by role, and real models
spell their layers in many ways: Hugging Face's ``LlamaRMSNorm`` and ``T5LayerNorm`` are
not torch classes, apex's ``FusedLayerNorm`` neither, and transformers' ``Conv1D`` is a
linear layer that is no ``nn.Linear``. Recognition therefore goes by structure and name:

    norm       an instance of a torch normalisation class (BatchNorm*, LayerNorm,
               GroupNorm, InstanceNorm*, RMSNorm, LocalResponseNorm), or a module whose
               class name contains "norm" (any case) and all of whose parameters
               (recursively) are 1-D with one common size, the normalised size. A class
               named like a norm that owns a >= 2-D parameter is not a norm.
    embedding  an ``nn.Embedding`` / ``nn.EmbeddingBag``, or a module whose class name
               contains "embed" (any case) and that owns exactly one parameter, 2-D (a
               table of vectors; a patch embedding owning a 4-D convolution kernel is a
               GEMM layer).
    GEMM layer a module that owns (directly) a floating parameter whose name ends in
               "weight" with two or more dimensions, and is neither a norm nor an
               embedding: nn.Linear, nn.Conv*d, nn.Bilinear, transformers' Conv1D,
               nn.MultiheadAttention (``in_proj_weight``), fused linears.

"first" and "last" are positions in *execution* order, which registration order does not
give (GPT-2 registers ``lm_head`` after its blocks but a model may register its head
first): :func:`trace_gemm_calls` runs one forward pass with a forward pre-hook on every
GEMM layer and records which layer ran and the tensor it read. Then

    first = every GEMM layer that reads the same input tensor as the first GEMM call
            (a Llama's layer-0 q_proj, k_proj and v_proj together)
    last  = every GEMM layer that reads the same input tensor as the last GEMM call
            (a shared feature vector feeding several heads)
"""
from __future__ import annotations

import contextlib
import fnmatch
import warnings
from typing import (Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence,
                    Tuple, Union)

import torch
from torch import nn

__all__ = ["is_norm", "is_embedding", "is_gemm_layer", "GemmCall", "trace_gemm_calls",
           "first_gemm_layers", "last_gemm_layers", "parameter_owners", "split_example_inputs",
           "KEEP_KEYWORDS", "KeepFilter", "as_keep_filters", "needs_trace",
           "resolve_keep_high_precision", "trace_gemm_layers"]

KEEP_KEYWORDS = ("first", "last", "norm")
KeepFilter = Union[str, Callable[[str, nn.Module], bool]]

_TORCH_NORMS = tuple(m for m in (
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm,
    getattr(nn, "RMSNorm", None)) if m is not None)
_TORCH_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def is_norm(module: nn.Module) -> bool:
    """True for a normalisation layer (see the module docstring for the rule).

    >>> is_norm(nn.LayerNorm(8)), is_norm(nn.Linear(8, 8))
    (True, False)
    """
    if isinstance(module, _TORCH_NORMS):
        return True
    if "norm" not in type(module).__name__.lower():
        return False
    sizes = {tuple(p.shape) for p in module.parameters()}
    return all(len(s) == 1 for s in sizes) and len(sizes) <= 1


def is_embedding(module: nn.Module) -> bool:
    """True for a lookup table of vectors (see the module docstring for the rule)."""
    if isinstance(module, _TORCH_EMBEDDINGS):
        return True
    if "embed" not in type(module).__name__.lower():
        return False
    params = list(module.parameters(recurse=False))
    return len(params) == 1 and params[0].dim() == 2


def is_gemm_layer(module: nn.Module) -> bool:
    """True for a module that owns a >= 2-D ``*weight`` parameter and is neither a norm
    nor an embedding (nn.Linear, nn.Conv*d, transformers' Conv1D, ...)."""
    owns = any(name.endswith("weight") and p.dim() >= 2 and p.is_floating_point()
               for name, p in module.named_parameters(recurse=False))
    return owns and not is_norm(module) and not is_embedding(module)


class GemmCall(NamedTuple):
    """One call of a GEMM layer in a traced forward: its name and the tensor it read
    (its first tensor argument, positional or keyword; None when it had none)."""
    name: str
    input: Optional[torch.Tensor]


def split_example_inputs(example_inputs: Any) -> Tuple[tuple, dict]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)`` from an example input: a tensor
    (one positional argument), a tuple or list (the positional arguments) or a dict
    (keyword arguments, as Hugging Face models take ``input_ids=...``)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    raise TypeError(f"example_inputs must be a tensor, a tuple/list of positional arguments "
                    f"or a dict of keyword arguments, got {type(example_inputs).__name__}")


def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


@contextlib.contextmanager
def _plain_torch(device_types: Sequence[str]) -> Iterator[None]:
    """Run without torch-function modes (a PrecisionMode would round, keep amax histories
    and count coverage for a pass that is not a training step) and without autocast."""
    with contextlib.ExitStack() as stack:
        for _ in range(torch._C._len_torch_function_stack()):
            stack.enter_context(torch.overrides._pop_mode_temporarily())
        for device_type in device_types:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def trace_gemm_calls(model: nn.Module, args: tuple = (), kwargs: Optional[dict] = None
                     ) -> List[GemmCall]:
    """The GEMM-layer calls of one forward ``model(*args, **kwargs)``, in execution order.

    The pass runs with the model in eval mode (no dropout, no drop-path, batch-norm
    running statistics untouched), without gradients, with the random generators
    restored afterwards and outside any torch-function mode or autocast: it changes
    nothing in the model and draws nothing from any generator. Every module's training
    flag is restored as it was.
    """
    calls: List[GemmCall] = []
    hooks = []

    def record(name, module, a, kw):
        calls.append(GemmCall(name, _first_tensor(a, kw)))

    for name, module in model.named_modules():
        if is_gemm_layer(module):
            hooks.append(module.register_forward_pre_hook(
                lambda m, a, kw, _n=name: record(_n, m, a, kw), with_kwargs=True))
    flags = [(m, m.training) for m in model.modules()]
    devices = {p.device for p in model.parameters()}
    cuda = [d for d in devices if d.type == "cuda"]
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=cuda), \
                _plain_torch(sorted({d.type for d in devices} | {"cpu"})):
            model(*args, **(kwargs or {}))
    finally:
        for h in hooks:
            h.remove()
        for m, training in flags:
            m.training = training
    return calls


def _same_input(calls: Sequence[GemmCall], anchor: GemmCall) -> set:
    if anchor.input is None:
        return {anchor.name}
    return {c.name for c in calls if c.input is anchor.input}


def first_gemm_layers(calls: Sequence[GemmCall]) -> set:
    """Names of the first GEMM layer run and every GEMM layer reading its input tensor."""
    return _same_input(calls, calls[0]) if calls else set()


def last_gemm_layers(calls: Sequence[GemmCall]) -> set:
    """Names of the last GEMM layer run and every GEMM layer reading its input tensor."""
    return _same_input(calls, calls[-1]) if calls else set()


def parameter_owners(model: nn.Module) -> Dict[int, List[str]]:
    """id(parameter) -> names of every module that owns it directly, in model order.

    A tied parameter (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) has
    several owners; ``named_parameters()`` would name only the first.
    """
    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            names = owners.setdefault(id(p), [])
            if name not in names:
                names.append(name)
    return owners


# --------------------------------------------------------------------------------------
# Keep rules: which modules stay in high precision
# --------------------------------------------------------------------------------------
def needs_trace(filters: Union[KeepFilter, Sequence[KeepFilter], None]) -> bool:
    """True when ``filters`` name "first" or "last": positions in execution order, which
    only a traced forward pass gives (:func:`mixprec.layers.trace_gemm_calls`)."""
    return any(isinstance(f, str) and f in ("first", "last") for f in as_keep_filters(filters))


def as_keep_filters(filters: Union[KeepFilter, Sequence[KeepFilter], None]) -> tuple:
    """A tuple of keep filters from None, one filter or a sequence of them."""
    if filters is None:
        return ()
    if isinstance(filters, str) or callable(filters):
        return (filters,)
    return tuple(filters)


def resolve_keep_high_precision(model: nn.Module,
                                filters: Union[KeepFilter, Sequence[KeepFilter], None], *,
                                example_inputs: Any = None,
                                calls: Optional[Sequence[GemmCall]] = None) -> frozenset:
    """Qualified names of the modules kept in high precision.

    ``filters``: any of

    * "first": the first GEMM layer in execution order and every GEMM layer reading the
      same input tensor (a Llama's layer-0 q_proj, k_proj and v_proj);
    * "last": the last GEMM layer in execution order (and any reading its input);
    * "norm": every normalisation, torch classes and modules recognised by name and
      structure (Hugging Face ``*RMSNorm``, ``T5LayerNorm``, apex ``FusedLayerNorm``);
    * fnmatch patterns on qualified names, or callables ``(name, module) -> bool``.

    GEMM layers, norms and the trace are defined at the top of this module. "first" and
    "last" need one forward pass: ``example_inputs`` (a tensor, a tuple of positional
    arguments or a dict of keyword arguments for ``model``) or the ``calls`` of an
    earlier trace. Submodules of a kept module are kept too.

    >>> resolve_keep_high_precision(model, ("first", "norm"), example_inputs=x)
    """
    filters = as_keep_filters(filters)
    if needs_trace(filters) and calls is None:
        if example_inputs is None:
            raise ValueError("keep_high_precision 'first' and 'last' are positions in execution "
                             "order: pass example_inputs (a tensor, a tuple of positional "
                             "arguments or a dict of keyword arguments) to trace one forward")
        calls = trace_gemm_calls(model, *split_example_inputs(example_inputs))
    modules = list(model.named_modules())
    chosen: set = set()
    for f in filters:
        if callable(f):
            chosen |= {n for n, m in modules if f(n, m)}
        elif f in ("first", "last"):
            found = first_gemm_layers(calls) if f == "first" else last_gemm_layers(calls)
            if not found:
                warnings.warn(f"keep_high_precision {f!r} keeps nothing: the traced forward ran "
                              f"no GEMM layer (a module owning a >= 2-D weight parameter)",
                              stacklevel=3)
            chosen |= found
        elif f == "norm":
            chosen |= {n for n, m in modules if is_norm(m)}
            _warn_norm_lookalikes(modules)
        elif isinstance(f, str):
            matched = {n for n, _ in modules if fnmatch.fnmatchcase(n, f)}
            if not matched:
                names = ", ".join(repr(n) for n, _ in modules[1:12])
                raise ValueError(f"keep_high_precision pattern {f!r} matches no module; valid: "
                                 f"{', '.join(KEEP_KEYWORDS)}, a callable, or a pattern on "
                                 f"module names such as {names}")
            chosen |= matched
        else:
            raise ValueError(f"keep_high_precision entry {f!r} is not a string or a callable; "
                             f"valid: {', '.join(KEEP_KEYWORDS)}, fnmatch patterns, callables")
    if "" in chosen:
        return frozenset(n for n, _ in modules)
    return frozenset(n for n, _ in modules
                     if any(n == c or n.startswith(c + ".") for c in chosen))


def _warn_norm_lookalikes(modules: list) -> None:
    """A class named like a normalisation, owning parameters, that the structural rule
    rejects is reported: "norm" does not keep it, and the user should know. (Wrappers
    owning no parameter of their own, such as a PreNorm block, are not reported.)"""
    odd = [f"{n!r} ({type(m).__name__}: parameters "
           f"{sorted({tuple(p.shape) for p in m.parameters()})})"
           for n, m in modules
           if "norm" in type(m).__name__.lower() and not is_norm(m)
           and any(True for _ in m.parameters(recurse=False))]
    if odd:
        warnings.warn(f"keep_high_precision 'norm' does not keep {', '.join(odd[:5])}"
                      f"{' ...' if len(odd) > 5 else ''}: named like a normalisation but its "
                      f"parameters are not 1-D of one size; name it with a pattern to keep it",
                      stacklevel=3)


def trace_gemm_layers(model: nn.Module, *args, **kwargs) -> Tuple[str, ...]:
    """Qualified names of the modules that owned the weight operand of a matmul-like
    call during one forward ``model(*args, **kwargs)`` under the dispatcher (no
    gradients, FP32, identity policies), in the order of their first call; embeddings
    included. The same attribution the coverage report uses.

    >>> trace_gemm_layers(gpt2, input_ids)[-1]
    'lm_head'
    """
    from .coverage import CoverageRecorder
    from .emulate import PrecisionMode     # emulate builds on this module's lower layers
    from .policy import LayerPolicy, attach
    recorder = CoverageRecorder()
    identity = LayerPolicy()
    with attach(model, lambda n, m: identity), PrecisionMode(recorder=recorder), \
            torch.no_grad():
        model(*args, **kwargs)
    return recorder.coverage().gemm_layers()
