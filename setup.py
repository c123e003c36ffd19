"""Builds the C++ I/O engine, native_loader._engine; everything else is in setup.cfg."""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

setup(
    ext_modules=[
        Pybind11Extension(
            "native_loader._engine",
            ["native_loader/binding.cpp", "native_loader/engine.cpp", "native_loader/uring.cpp"],
            depends=["native_loader/engine.h", "native_loader/uring.h"],
            cxx_std=17,
            extra_compile_args=["-O3", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ],
)
