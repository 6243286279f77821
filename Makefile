# fedimdb: one batch workflow (copier -> rounds of trainers -> aggregator) and a server.
# `make run` trains on this machine; `make test` runs the test suite.

CARGO   ?= cargo
ROOT    ?= runs/local
WORKERS ?= 5
BIN     := $(or $(CARGO_TARGET_DIR),target)/release

.PHONY: all build run serve test bench bench-copier bench-train clippy fmt clean

all: build

build:
	$(CARGO) build --release --workspace

## The main job: shard the archive, train WORKERS workers by federated averaging, evaluate.
run: build
	$(BIN)/pipeline local --root $(ROOT) --workers $(WORKERS) --report $(ROOT)/report.json
	@echo "Serving the model just trained at http://localhost:8080 (Ctrl-C stops the server)"
	$(BIN)/server --root $(ROOT)

## Serves the model of an existing run folder at http://localhost:8080.
serve: build
	@echo "Serving $(ROOT) at http://localhost:8080 (Ctrl-C stops the server)"
	$(BIN)/server --root $(ROOT)

## The test suite (what CI runs). The build comes first: the system tests run the binaries,
## and `cargo test` alone builds only those of packages with integration tests.
test:
	$(CARGO) build --release --workspace
	$(CARGO) test --release --workspace

## Benchmarks: speed and accuracy figures recorded in docs/BENCHMARKS.md.
bench: bench-copier bench-train

bench-copier: build
	bash copier/bench.sh

bench-train: build
	bash tests/bench/train.sh

clippy:
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Removes build outputs and local runs (not the shared data).
clean:
	$(CARGO) clean
	rm -rf runs
