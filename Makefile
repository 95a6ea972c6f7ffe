.PHONY: setup demo test protos protoset ghz polyglot clean

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/mbc demo

test: setup
	.venv/bin/python -m pytest -q

protos: setup
	.venv/bin/python scripts/gen_protos.py

# One self-contained descriptor set of every mbc.v1 service, for tools that cannot use the
# servers' reflection (Python serves v1alpha only; ghz wants v1): see README, "load testing".
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
