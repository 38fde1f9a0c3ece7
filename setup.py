"""The package's metadata is in pyproject.toml (PEP 621); this file only lets older tools
that look for a setup.py build it."""

from setuptools import setup

setup()
