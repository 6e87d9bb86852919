# Shortcuts for developers; the README's two commands are ./run.sh and ./test.sh.
.PHONY: run test bench clean
run:
	./run.sh
test:
	./test.sh
bench:
	scripts/setup-venv --test
	.venv/bin/python tests/bench/bench_authorize.py
	.venv/bin/python tests/bench/bench_revocation.py
clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache .hypothesis
