FROM python:3.11-slim

WORKDIR /app
COPY setup.py setup.cfg pyproject.toml README.md conf.yaml ./
COPY redisp ./redisp
COPY twisted ./twisted
# gcc while installing only: it builds redisp.core._lru, the cache's compact table (without
# it the cache falls back to an OrderedDict, ~60 more bytes per entry), and redisp.protocol._resp,
# the RESP parser's fast paths (without it, their slower Python reference)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir . \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/* \
    && (cd / && python -c "import redisp.core._lru, redisp.protocol._resp") && useradd --system redisp

USER redisp
# Inside the container the doors listen on every interface; publish the ports you need.
# MALLOC_MMAP_THRESHOLD_: glibc hands large freed tables back to the system (the cache's
# table grows by doubling; see bench/NOTES-perf.md for bytes per entry).
# REDISP_PROTECTED_MODE=no: clients reach redisp through the container's network,
# never from its loopback, so protected mode would refuse them all (the official
# Redis image does the same). Publish the ports on 127.0.0.1 only, or set
# REDISP_PASSWORD (docker run -e REDISP_PASSWORD, or an env file): then every
# client must authenticate (README "Security").
ENV MALLOC_MMAP_THRESHOLD_=131072 \
    REDISP_HTTP=tcp:9997:interface=0.0.0.0 \
    REDISP_RESP=tcp:6380:interface=0.0.0.0 \
    REDISP_REDIS=redis://redis:6379/0 \
    REDISP_PROTECTED_MODE=no
EXPOSE 9997 6380
# --pidfile= : twistd writes twistd.pid even with -n, and a restarted container would refuse to start
CMD ["twistd", "-n", "--pidfile=", "redisp"]
