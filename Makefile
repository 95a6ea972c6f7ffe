.PHONY: setup demo lint test test-fast protos protoset ghz polyglot clean

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/mbc demo

# Lint (ruff), format (ruff format --check), types (mypy) and the layers of the packages
# (import-linter), docs/performance.md current with docs/bench/*.json, and deploy/kubernetes/ with the
# Dockerfile (offline: scripts/check_kubernetes.sh); the Python tools are configured in pyproject.toml.
# CI runs it before `make test`.
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports --no-cache --no-logo
	.venv/bin/python scripts/render_bench_docs.py --check
	scripts/check_kubernetes.sh

test: setup
	.venv/bin/python -m pytest -q

# The tests marked unit (no etcd, no model, no process or gRPC server): well under a minute.
test-fast: setup
	.venv/bin/python -m pytest -q -m unit

protos: setup
	.venv/bin/python scripts/gen_protos.py

# One self-contained descriptor set of every mbc.v1 service, for tools that cannot use the
# servers' reflection (Python serves v1alpha only; ghz wants v1): see docs/operators.md.
protoset: setup
	@mkdir -p build
	.venv/bin/python -m grpc_tools.protoc -I protos --include_imports --descriptor_set_out=build/mbc.protoset protos/mbc/v1/*.proto
	@echo "wrote build/mbc.protoset"

# A short real ghz load against a live local mesh (etcd, router, one bot); fails on any error.
ghz: protoset
	scripts/ghz_smoke.sh

# The contracts and the clients in other languages against a live local mesh: buf lint and
# breaking, the Go and Node tests, grpcurl through reflection (installs buf, the Go plugins,
# grpcurl and the Node packages when missing). CI runs it after `make test`.
polyglot: setup
	scripts/polyglot_ci.sh

clean:
	rm -rf .venv .pytest_cache build *.egg-info
