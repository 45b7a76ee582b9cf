"""Declares the optional C kernel of mixprec.quant; everything else lives in pyproject.toml.

The extension needs only a C compiler and the Python headers (no torch at build time).
It is optional: without a compiler the install succeeds and mixprec.quant falls back
to its pure-torch path, which gives identical results.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mixprec._cquant",
            sources=["src/mixprec/_cquant.c"],
            extra_compile_args=["-O3", "-std=gnu11", "-fno-strict-aliasing", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ],
)
