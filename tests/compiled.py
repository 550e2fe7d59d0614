"""The C extensions in tests: required where they could be built, else skipped.

``scripts/test`` sets ``REDISP_REQUIRE_C=1`` where a C compiler and the base
Python's headers are there (CI included): then a test module of an extension
that was not built fails at import instead of skipping, so a broken build
cannot pass as "no compiler".  ``REDISP_REQUIRE_LRU=1``, the switch's older
name from when ``redisp.core._lru`` was the only extension, means the same.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

#: every optional C extension setup.py builds, each with a Python fallback
EXTENSIONS = ("core._lru", "protocol._resp")


def required() -> bool:
    """True when the extensions must have been built."""
    return "1" in (os.environ.get("REDISP_REQUIRE_C"), os.environ.get("REDISP_REQUIRE_LRU"))


def compiled(name: str) -> ModuleType:
    """``redisp.<name>``; skips the calling test module when it was not built
    and nothing requires it."""
    if required():
        return importlib.import_module(f"redisp.{name}")
    return pytest.importorskip(f"redisp.{name}",
                               reason=f"redisp.{name} was not built (no C compiler)")
