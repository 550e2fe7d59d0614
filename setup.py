"""Build hook for the optional C parts, each with a pure-Python fallback that
gives the same answers: redisp.core.cache uses redisp.core._lru when it was built (else
OrderedDict, more memory per entry), redisp.protocol.codec uses redisp.protocol._resp (else its
reference parsers, more time per request).  Everything else is declared in
setup.cfg."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("redisp.core._lru", ["redisp/core/_lru.c"], optional=True),
    Extension("redisp.protocol._resp", ["redisp/protocol/_resp.c"], optional=True),
])
