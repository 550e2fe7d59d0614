# Thin wrappers: each target is a plain script that works without make too.
.PHONY: run test lint bench bench-invalidation chaos soak fuzz stale-reads redis-py-suite tls-bench bench-cluster bench-workers clean

run:            ## set up and run the proxy (starts a local redis-server when none answers)
	scripts/run

test:           ## set up and run the whole test suite (venv, packages, redis-server)
	scripts/test

lint:
	.venv/bin/ruff check .

bench:          ## peer benchmarks: redis-server, twemproxy, webdis vs redisp (bench/README.md)
	bench/run

bench-invalidation:  ## invalidation delay with --invalidation tracking (median, p99)
	bench/invalidation

chaos:          ## faults of the backing Redis under load: hung, wrong, recovery (QUICK=1: ~1 min)
	bench/chaos

soak:           ## 10 min of mixed load: RSS and descriptors (SOAK_SECONDS=60: a short run)
	bench/soak

fuzz:           ## atheris fuzzing of the RESP parser and the HTTP request head (bench/README.md)
	bench/fuzz

stale-reads:    ## reads through redisp vs writes made directly on Redis, with tracking: stale count
	bench/stale_reads

redis-py-suite: ## redis-py's own test suite directly on Redis and through redisp, passes compared
	bench/redis_py_suite

tls-bench:      ## RESP hits over TLS vs plain, same run
	bench/tls

bench-cluster:  ## hits and misses through redisp in front of a 3-master cluster vs RedisCluster vs one server
	bench/cluster

bench-workers:  ## redisp as 1 and as 2 processes sharing its ports (SO_REUSEPORT), unpinned (~5 min)
	bench/workers

clean:
	rm -rf .venv build dist *.egg-info twisted/plugins/dropin.cache bench/results
