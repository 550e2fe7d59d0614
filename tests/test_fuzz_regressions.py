"""The fuzz targets of bench/fuzz, run in the suite without the fuzzer.

Each target's ``TestOneInput`` holds its invariants (see bench/fuzz_targets):
here it gets its seed inputs, every input a fuzzing run ever found crashing
(``REGRESSIONS``, none so far), and a short hypothesis search, so the targets
keep working and their invariants keep holding between fuzzing runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

TARGETS = Path(__file__).resolve().parent.parent / "bench" / "fuzz_targets"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"fuzz_target_{name}", TARGETS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


resp_parser = load("resp_parser")
http_head = load("http_head")

#: (target, input) pairs that once crashed a target: fixed, and kept fixed
REGRESSIONS: list[tuple[str, bytes]] = []


@pytest.mark.parametrize("target", [resp_parser, http_head], ids=["resp_parser", "http_head"])
def test_seeds(target):
    for seed in target.SEEDS:
        target.TestOneInput(seed)


def test_inputs_that_once_crashed():
    for name, data in REGRESSIONS:
        {"resp_parser": resp_parser, "http_head": http_head}[name].TestOneInput(data)


pieces = st.sampled_from([
    b"*", b"$", b"\r\n", b"\r", b"\n", b"\0", b" ", b"'", b'"', b"\\x4", b"1", b"3", b"-1",
    b"GET", b"get", b"PING", b"key", b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.lists(pieces, max_size=20).map(b"".join))
def test_resp_parser_target(first, stream):
    resp_parser.TestOneInput(bytes([first]) + stream)


heads = st.sampled_from([
    b"GET ", b"HEAD ", b"POST ", b"/get?key=k", b"/get?key=m", b"/get?key=", b"&key=a",
    b"%", b"%6b", b"+", b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", b"Host: x\r\n",
    b"Connection: close\r\n", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n",
    b"\r\n", b"abc", b"/healthz", b" ", b"\t", b"\x80",
])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.lists(heads, max_size=16).map(b"".join))
def test_http_head_target(first, stream):
    http_head.TestOneInput(bytes([first]) + stream)
