.PHONY: setup demo test protos clean

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/mbc demo

test: setup
	.venv/bin/python -m pytest -q

protos: setup
	.venv/bin/python scripts/gen_protos.py

clean:
	rm -rf .venv .pytest_cache build *.egg-info
