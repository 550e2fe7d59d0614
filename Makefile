# Thin wrappers: each target is a plain script that works without make too.
.PHONY: run test lint bench bench-invalidation clean

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

clean:
	rm -rf .venv build dist *.egg-info twisted/plugins/dropin.cache bench/results
