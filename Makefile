# fedimdb: one batch workflow (copier -> rounds of trainers -> aggregator) and a server.
# `make run` trains on this machine; `make test` runs the test suite.

CARGO   ?= cargo
ROOT    ?= runs/local
WORKERS ?= 5
BIN     := $(or $(CARGO_TARGET_DIR),target)/release

.PHONY: all build run serve check test bench bench-copier bench-train bench-hetero bench-sklearn bench-server clippy fmt fmt-check clean check-cuda

all: build

build:
	$(CARGO) build --release --workspace

## The main job: shard the archive (or DATA, your own labeled text: README "Your own data"),
## train WORKERS workers by federated averaging, evaluate. FLAGS: more `pipeline local` flags
## (e.g. FLAGS="--test-fraction 0.2" for data without a test split).
DATA  ?=
FLAGS ?=
run: build
	$(BIN)/pipeline local $(if $(DATA),--source $(DATA)) --root $(ROOT) --workers $(WORKERS) --report $(ROOT)/report.json $(FLAGS)
	@echo "Serving the model just trained at http://localhost:8080 (Ctrl-C stops the server)"
	$(BIN)/server --root $(ROOT)

## Serves the model of an existing run folder at http://localhost:8080.
serve: build
	@echo "Serving $(ROOT) at http://localhost:8080 (Ctrl-C stops the server)"
	$(BIN)/server --root $(ROOT)

## The quick loop while changing code: formatting, lints and the unit tests (the crates' own
## tests, no system tests, soak or fuzzing): a few minutes on a warm build.
check: fmt-check clippy
	$(CARGO) test --release --workspace --lib --bins

## The test suite (what CI runs). The build comes first: the system tests run the binaries,
## and `cargo test` alone builds only those of packages with integration tests. It builds all
## targets so that dev-dependencies shape the features once: the tests then reuse every crate
## instead of compiling polars and candle a second time with other features.
test:
	$(CARGO) build --release --workspace --all-targets
	$(CARGO) test --release --workspace
	$(MAKE) fuzz

## Bounded fuzzing (fuzz/README.md): builds the cargo-fuzz targets (installing cargo-fuzz when
## missing) and runs each for FUZZ_SECONDS; a crash fails it and names the reproducer.
FUZZ_SECONDS ?= 60
.PHONY: fuzz
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) bash fuzz/run.sh

## Benchmarks: speed and accuracy figures recorded in docs/BENCHMARKS.md.
bench: bench-copier bench-train bench-server

bench-copier: build
	bash copier/bench.sh

bench-train: build
	bash tests/bench/train.sh

## Federated vs centralized over workers {5,20,64} x {iid, dirichlet 0.5, 0.1} (docs/BENCHMARKS.md).
bench-hetero: build
	bash tests/bench/hetero.sh

## scikit-learn's logistic regression over the model's own features, TASK rating (8 classes)
## or sentiment: the peer of issue 13 (docs/BENCHMARKS.md). Installs scikit-learn into a venv
## under ~/.cache/fedimdb on first use.
TASK ?= rating
bench-sklearn:
	$(CARGO) build --release --workspace --examples
	BIN=$(BIN) bash tests/bench/sklearn_peer.sh ../shared/data/aclImdb-labeled.tar.gz $(TASK)

## Serves the model under $(ROOT) (trained by the pipeline if missing) under load from wrk.
bench-server: build
	test -f $(ROOT)/model/latest.safetensors || $(BIN)/pipeline local --root $(ROOT) --workers $(WORKERS)
	bash server/bench.sh $(ROOT)

## Lints: clippy with warnings as errors over the workspace and the fuzz crate (its own
## workspace, see fuzz/Cargo.toml).
clippy:
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	$(CARGO) clippy --release --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings

## Formats everything (rustfmt.toml); `fmt-check` only says what differs (CI runs it).
fmt:
	$(CARGO) fmt --all
	$(CARGO) fmt --all --manifest-path fuzz/Cargo.toml

fmt-check:
	$(CARGO) fmt --all --check
	$(CARGO) fmt --all --check --manifest-path fuzz/Cargo.toml

## Checks that the trainer compiles with candle's CUDA backend (docs/CHECK_CUDA.md); kept out of
## CI because it is long: installs Debian's nvidia-cuda-toolkit (contrib non-free) when nvcc is missing.
## CUDA_COMPUTE_CAP: the GPU the kernels are built for (candle-kernels asks nvidia-smi otherwise);
## 80, as 90 becomes sm_90a, which Debian's CUDA 11.8 rejects.
CUDA_SOURCES     ?= /etc/apt/sources.list.d/debian-contrib-non-free.sources
CUDA_COMPUTE_CAP ?= 80
check-cuda:
	command -v nvcc >/dev/null || { \
	  test -f $(CUDA_SOURCES) || printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' \
	    'Suites: bookworm bookworm-updates' 'Components: contrib non-free' \
	    'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' > $(CUDA_SOURCES); \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nvidia-cuda-toolkit; }
	nvcc --version
	CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) $(CARGO) check -p trainer --features cuda

## Removes build outputs and local runs (not the shared data).
clean:
	$(CARGO) clean
	rm -rf runs

## ---- Kubernetes (README "Kubernetes", docs/KUBERNETES.md) ----
## Images are REGISTRY/BINARY:TAG; OVERLAY is local (kind/minikube), gke, gpu or gke-filestore.
REGISTRY  ?= fedimdb
TAG       ?= 0.1.0
NAMESPACE ?= fedimdb
OVERLAY   ?= local
ROUNDS    ?= 6
STEPS     ?= 20000
BATCH     ?= $(if $(filter gpu,$(OVERLAY)),32,1)
DOCKER    ?= docker
KUBECTL   ?= kubectl
K8S_BINARIES := copier trainer aggregator server pipeline
# The overlay with the namespace set (and, for the local overlay, the images pointed at
# REGISTRY/TAG by kustomize's images transformer).
K8S_DIR   := runs/k8s-$(OVERLAY)
# The cloud overlays run images pinned by digest, filled in by `make pin-images`.
IMAGES_COMPONENT := manifests/components/images/kustomization.yaml
PLACEHOLDER_DIGEST := sha256:0000000000000000000000000000000000000000000000000000000000000000
# The Jobs `pipeline k8s --overlay` builds: gke-filestore's are gke's.
PIPELINE_OVERLAY = $(if $(filter local gpu,$(OVERLAY)),$(OVERLAY),gke)

.PHONY: images push pin-images deploy run-k8s status logs port-forward clean-k8s k8s-sim

## The default workflow (WORKERS workers, the default rounds and training) through
## `pipeline k8s` on the simulated cluster of tests/sim/ (no cluster, no Docker: a simulated
## API server, Job controller and kubelet, each pod a process of the release binary its
## image names), on the shared archive; then the same run with `pipeline local`, whose
## model must be byte-identical. Ends with the `done: test accuracy ...` line.
k8s-sim:
	$(CARGO) build --release -p copier -p trainer -p aggregator -p pipeline
	$(CARGO) run --release -q -p system-tests --example k8s-sim -- --workers $(WORKERS)

## Builds one image per binary (and the CUDA trainer with OVERLAY=gpu). Needs Docker (BuildKit).
images:
	for b in $(K8S_BINARIES); do \
	  $(DOCKER) build -f docker/Dockerfile --target $$b -t $(REGISTRY)/$$b:$(TAG) . || exit 1; \
	done
	if [ "$(OVERLAY)" = gpu ]; then \
	  $(DOCKER) build -f docker/Dockerfile.cuda -t $(REGISTRY)/trainer-cuda:$(TAG) . ; \
	fi

push:
	for b in $(K8S_BINARIES) $(if $(filter gpu,$(OVERLAY)),trainer-cuda); do \
	  $(DOCKER) push $(REGISTRY)/$$b:$(TAG) || exit 1; \
	done

## After `make push`: pins the cloud overlays' images by digest, rewriting
## $(IMAGES_COMPONENT) with REGISTRY/BINARY and the digest the registry gave each pushed
## image (and the digests of busybox and volume-nfs). OVERLAY=gpu adds trainer-cuda.
pin-images:
	@set -e; out=$(IMAGES_COMPONENT).new; \
	sed -n '1,/^images:/p' $(IMAGES_COMPONENT) > $$out; \
	digest() { $(DOCKER) inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$$1" \
	  | grep -m1 "^$$2@sha256:" | cut -d@ -f2; }; \
	for b in copier trainer trainer-cuda aggregator server pipeline; do \
	  d=$$(digest $(REGISTRY)/$$b:$(TAG) $(REGISTRY)/$$b || true); \
	  if [ -z "$$d" ]; then \
	    if [ $$b = trainer-cuda ] && [ "$(OVERLAY)" != gpu ]; then d=$(PLACEHOLDER_DIGEST); \
	    else echo "no registry digest for $(REGISTRY)/$$b:$(TAG): run 'make images push REGISTRY=$(REGISTRY) TAG=$(TAG)' first" >&2; rm -f $$out; exit 1; fi; \
	  fi; \
	  printf -- '- name: fedimdb/%s\n  newName: %s\n  digest: %s\n' $$b $(REGISTRY)/$$b $$d >> $$out; \
	done; \
	for i in busybox:1.37.0 registry.k8s.io/volume-nfs:0.8; do \
	  $(DOCKER) pull -q $$i >/dev/null; \
	  d=$$(digest $$i $${i%:*}); [ -n "$$d" ] || { echo "no registry digest for $$i" >&2; rm -f $$out; exit 1; }; \
	  printf -- '- name: %s\n  digest: %s\n' $${i%:*} $$d >> $$out; \
	done; \
	mv $$out $(IMAGES_COMPONENT); echo "pinned: $(IMAGES_COMPONENT)"; grep -c 'digest: sha256:' $(IMAGES_COMPONENT)

## Applies the overlay (volume, NFS server, server, inspector), then runs the workflow as Jobs
## with `pipeline k8s` from this machine, using the images of the applied step templates.
deploy: build
	@if $(KUBECTL) kustomize manifests/overlays/$(OVERLAY) | grep -q '$(PLACEHOLDER_DIGEST)'; then \
	  echo "overlay $(OVERLAY) runs images with placeholder digests ($(IMAGES_COMPONENT)): run 'make images push pin-images OVERLAY=$(OVERLAY) REGISTRY=... TAG=...' first" >&2; exit 1; fi
	mkdir -p $(K8S_DIR)
	printf '%s\n' 'apiVersion: kustomize.config.k8s.io/v1beta1' 'kind: Kustomization' \
	  'namespace: $(NAMESPACE)' 'resources:' '- ../../manifests/overlays/$(OVERLAY)' \
	  $(if $(filter local,$(OVERLAY)),'images:' $(foreach b,copier trainer aggregator server pipeline,'- name: fedimdb/$(b)' '  newName: $(REGISTRY)/$(b)' '  newTag: "$(TAG)"')) \
	  > $(K8S_DIR)/kustomization.yaml
	$(KUBECTL) apply -k $(K8S_DIR)
	if $(KUBECTL) -n $(NAMESPACE) get deployment/fedimdb-nfs >/dev/null 2>&1; then \
	  $(KUBECTL) -n $(NAMESPACE) rollout status deployment/fedimdb-nfs --timeout=5m; fi
	image() { $(KUBECTL) -n $(NAMESPACE) get job fedimdb-$$1 -o jsonpath='{.spec.template.spec.containers[0].image}'; }; \
	$(BIN)/pipeline k8s --namespace $(NAMESPACE) --overlay $(PIPELINE_OVERLAY) --workers $(WORKERS) \
	  --rounds $(ROUNDS) --steps $(STEPS) --batch $(BATCH) \
	  --copier-image "$$(image copier)" --trainer-image "$$(image trainer)" --aggregator-image "$$(image aggregator)"

## Starts a whole run inside the cluster: applies overlays/OVERLAY/run (the overlay and the
## driver Job, parameters from manifests/base/params.yaml), replacing a finished driver Job
## (the new driver resumes where the last one stopped), then follows its log.
run-k8s:
	@if $(KUBECTL) kustomize manifests/overlays/$(OVERLAY) | grep -q '$(PLACEHOLDER_DIGEST)'; then \
	  echo "overlay $(OVERLAY) runs images with placeholder digests ($(IMAGES_COMPONENT)): run 'make images push pin-images OVERLAY=$(OVERLAY) REGISTRY=... TAG=...' first" >&2; exit 1; fi
	mkdir -p $(K8S_DIR)-run
	printf '%s\n' 'apiVersion: kustomize.config.k8s.io/v1beta1' 'kind: Kustomization' \
	  'namespace: $(NAMESPACE)' 'resources:' '- ../../manifests/overlays/$(OVERLAY)/run' \
	  > $(K8S_DIR)-run/kustomization.yaml
	$(KUBECTL) -n $(NAMESPACE) delete job fedimdb-driver --ignore-not-found
	$(KUBECTL) apply -k $(K8S_DIR)-run
	for i in $$(seq 60); do $(KUBECTL) -n $(NAMESPACE) get pods -o name \
	  -l batch.kubernetes.io/job-name=fedimdb-driver | grep -q . && break; sleep 2; done
	$(KUBECTL) -n $(NAMESPACE) wait pod -l batch.kubernetes.io/job-name=fedimdb-driver \
	  --for=jsonpath='{.status.phase}'=Running --timeout=5m
	$(KUBECTL) -n $(NAMESPACE) logs -f job/fedimdb-driver

status:
	$(KUBECTL) -n $(NAMESPACE) get jobs -L fedimdb.io/phase,fedimdb.io/round,fedimdb.io/accuracy
	$(KUBECTL) -n $(NAMESPACE) get jobs,pods,deployments,services,pvc -o wide
	$(KUBECTL) get pv fedimdb-data

logs:
	-$(KUBECTL) -n $(NAMESPACE) logs --tail=50 job/fedimdb-driver
	$(KUBECTL) -n $(NAMESPACE) logs --tail=50 --prefix --all-containers \
	  -l app.kubernetes.io/managed-by=fedimdb-pipeline --max-log-requests 20
	$(KUBECTL) -n $(NAMESPACE) logs --tail=50 deployment/fedimdb-server

## The server at http://localhost:8080 (Ctrl-C stops forwarding).
port-forward:
	$(KUBECTL) -n $(NAMESPACE) port-forward service/fedimdb-server 8080:80

## Deletes the namespace (Jobs, server, NFS server and its disk) and the volume's PV.
clean-k8s:
	$(KUBECTL) delete namespace $(NAMESPACE) --ignore-not-found
	$(KUBECTL) delete pv fedimdb-data --ignore-not-found
	rm -rf runs/k8s-*
