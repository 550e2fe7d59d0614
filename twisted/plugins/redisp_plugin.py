"""twistd plugin for redisp; lazy, so ``twistd --help`` imports nothing heavy."""

from twisted.application.service import ServiceMaker

redisp = ServiceMaker(
    "redisp",
    "redisp.tap",
    "A caching proxy for Redis with HTTP and RESP front doors.",
    "redisp",
)
