"""mixprec: reduced-precision training for PyTorch, bit-exact on any CPU."""
from .formats import Convention, FloatFormat, get_format, list_formats, make_format

__version__ = "0.1.0"

__all__ = [
    "Convention", "FloatFormat", "get_format", "list_formats", "make_format",
]
