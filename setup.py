"""Build hook for the optional C parts, each with a pure-Python fallback that
gives the same answers: redisp.cache uses redisp._lru when it was built (else
OrderedDict, more memory per entry), redisp.resp uses redisp._resp (else its
reference parsers, more time per request).  Everything else is declared in
setup.cfg."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("redisp._lru", ["redisp/_lru.c"], optional=True),
    Extension("redisp._resp", ["redisp/_resp.c"], optional=True),
])
