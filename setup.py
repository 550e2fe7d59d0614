"""Build hook for the optional C part: redisp.core.cache uses redisp.core._lru when it
was built, and falls back to OrderedDict (more memory per entry) when not.
Everything else is declared in setup.cfg."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("redisp.core._lru", ["redisp/core/_lru.c"], optional=True)])
