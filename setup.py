"""Packages are found, not listed: asyncserve's folders, and the top-level kernels/ folder as asyncserve.kernels
(pyproject.toml's package-dir maps it; setuptools' find cannot see a folder outside the package)."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["asyncserve", "asyncserve.*"]) + ["asyncserve.kernels"])
