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
	.venv/bin/python -m tests.bench.bench_media first-frame
	.venv/bin/python -m tests.bench.bench_media cpu --window 20
	.venv/bin/python -m tests.bench.bench_media relay --window 20
	.venv/bin/python -m tests.bench.bench_hls cpu --window 20
	.venv/bin/python -m tests.bench.bench_hls mux
	.venv/bin/python -m tests.bench.bench_stop
	.venv/bin/python -m tests.bench.bench_discovery
	.venv/bin/python -m tests.bench.bench_relay_sync
	.venv/bin/python -m tests.bench.bench_cli
	.venv/bin/python -m tests.bench.bench_denials
clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache .hypothesis
