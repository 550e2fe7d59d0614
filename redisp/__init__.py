"""redisp: a caching proxy for Redis, with an HTTP and a RESP front door."""

__version__ = "0.1.0"
