# dockhand: the one list of commands. Every target works on a fresh Debian 12 machine as root.
CARGO ?= cargo
PREFIX ?= /usr/local
DEBIAN_PACKAGES := containerd runc busybox-static protobuf-compiler gcc libc6-dev util-linux iproute2 procps \
	containernetworking-plugins docker-registry python3-venv libseccomp-dev pkg-config curl

.PHONY: deps tools build test test-vm lint bench demo install containerd critest runc kubelet test-kubelet

# Install the Debian packages the build, tests and demo need (skipped when all are present).
deps:
	@if dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1; then echo "deps: all present"; else \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(DEBIAN_PACKAGES); fi

# Test peers built from pinned Go modules into target/tools/bin (crictl: a grpc-go CRI client;
# critest: cri-tools' conformance suite, a test binary, built from tools/critest/go.mod, and the
# ginkgo CLI of the same module, which critest -parallel runs), and the real-client drivers.
TOOLS_BIN := $(CURDIR)/target/tools/bin
CRI_TOOLS_VERSION := v1.37.0
GRPCIO_VENV := $(CURDIR)/target/tools/venv
GRPCIO_VERSION := 1.76.0
tools: $(TOOLS_BIN)/cri-driver $(GRPCIO_VENV)/.grpcio-$(GRPCIO_VERSION)
	@mkdir -p $(TOOLS_BIN)
	@if [ ! -e $(TOOLS_BIN)/.cri-tools-$(CRI_TOOLS_VERSION) ]; then \
		GOBIN=$(TOOLS_BIN) go install sigs.k8s.io/cri-tools/cmd/crictl@$(CRI_TOOLS_VERSION) && \
		touch $(TOOLS_BIN)/.cri-tools-$(CRI_TOOLS_VERSION); fi
	@if [ ! -e $(TOOLS_BIN)/.critest-$(CRI_TOOLS_VERSION) ]; then \
		grep -q 'sigs.k8s.io/cri-tools $(CRI_TOOLS_VERSION)$$' tools/critest/go.mod || \
			{ echo "tools: tools/critest/go.mod does not pin cri-tools $(CRI_TOOLS_VERSION)"; exit 1; }; \
		(cd tools/critest && go test -c -o $(TOOLS_BIN)/critest sigs.k8s.io/cri-tools/cmd/critest && \
			go build -o $(TOOLS_BIN)/ginkgo github.com/onsi/ginkgo/v2/ginkgo) && \
		touch $(TOOLS_BIN)/.critest-$(CRI_TOOLS_VERSION); fi

# The real-client drivers of integration/src/clients.rs: cri-driver (kubelet's k8s.io/cri-client
# and grpc-go, pinned in tools/cri-driver/go.mod; rebuilt when its sources change) and a venv with
# grpcio from PyPI (pinned in tools/grpcio-driver/requirements.txt).
$(TOOLS_BIN)/cri-driver: tools/cri-driver/main.go tools/cri-driver/go.mod tools/cri-driver/go.sum
	@mkdir -p $(TOOLS_BIN)
	cd tools/cri-driver && go build -o $@ .
$(GRPCIO_VENV)/.grpcio-$(GRPCIO_VERSION): tools/grpcio-driver/requirements.txt
	@grep -qx 'grpcio==$(GRPCIO_VERSION)' $< || { echo "tools: $< does not pin grpcio $(GRPCIO_VERSION)"; exit 1; }
	python3 -m venv $(GRPCIO_VENV)
	$(GRPCIO_VENV)/bin/pip install --quiet --disable-pip-version-check -r $<
	touch $@

# containerd versions the integration suite runs against, each in target/containerd/<v>/bin:
# 1.6 is Debian 12's own package; 1.7 (trixie) is extracted from Debian's archive with apt lists of
# its own (the system's sources and containerd stay as they are); 2.3 (LTS) and 2.4 are built from
# their Go modules (tools/go.mod, tools/containerd-2.4/go.mod: one module cannot require two
# versions of containerd). 1.6 and 1.7 run Debian 12's runc 1.1.5, as those nodes have it; 2.3 and
# 2.4 run runc $(RUNC_VERSION) (target/runc, `make runc`), given to containerd as the runc options'
# BinaryName. (2.1, EOL 2026-07, left the matrix to keep CI time.)
CONTAINERD_VERSIONS := 1.6 1.7 2.3 2.4
CONTAINERD_DIR := $(CURDIR)/target/containerd
CONTAINERD_GO_BUILD = go build -tags 'no_btrfs no_zfs' -o $(CONTAINERD_DIR)/$(1)/bin/ \
	github.com/containerd/containerd/v2/cmd/containerd github.com/containerd/containerd/v2/cmd/ctr \
	github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
containerd: $(addprefix containerd-,$(CONTAINERD_VERSIONS))
containerd-1.6: deps
containerd-1.7:
	@[ -x $(CONTAINERD_DIR)/1.7/bin/containerd ] || \
		tools/debian-containerd.sh trixie 1.7.24~ds1-6+deb13u1 $(CONTAINERD_DIR)/1.7
containerd-2.3: runc
	@[ -x $(CONTAINERD_DIR)/2.3/bin/containerd ] || (cd tools && $(call CONTAINERD_GO_BUILD,2.3))
containerd-2.4: runc
	@[ -x $(CONTAINERD_DIR)/2.4/bin/containerd ] || (cd tools/containerd-2.4 && $(call CONTAINERD_GO_BUILD,2.4))

# runc for the 2.x nodes, built from its Go module (tools/runc/go.mod) with seccomp (Debian's
# libseccomp-dev and pkg-config, in deps): without the tag every sandbox fails ("seccomp: config
# provided but seccomp not supported").
RUNC_VERSION := 1.5.3
RUNC_DIR := $(CURDIR)/target/runc/$(RUNC_VERSION)
runc: deps
	@if [ ! -x $(RUNC_DIR)/runc ]; then \
		grep -q 'github.com/opencontainers/runc v$(RUNC_VERSION) ' tools/runc/go.mod || \
			{ echo "runc: tools/runc/go.mod does not pin runc $(RUNC_VERSION)"; exit 1; }; \
		cd tools/runc && go build -trimpath -tags seccomp -o $(RUNC_DIR)/runc github.com/opencontainers/runc; fi

# kubelet for the kubelet lane, built once into target/kubelet/<version>/kubelet from its Go module
# (tools/kubelet/go.mod pins k8s.io/kubernetes and replaces each of its 31 staging modules).
KUBELET_VERSION := v1.37.2
KUBELET_BIN := $(CURDIR)/target/kubelet/$(KUBELET_VERSION)/kubelet
kubelet:
	@grep -qE '^[[:space:]]*k8s.io/kubernetes $(KUBELET_VERSION)( |$$)' tools/kubelet/go.mod || \
		{ echo "kubelet: tools/kubelet/go.mod does not pin k8s.io/kubernetes $(KUBELET_VERSION)"; exit 1; }
	@[ -x $(KUBELET_BIN) ] || (cd tools/kubelet && go build \
		-ldflags "-X k8s.io/component-base/version.gitVersion=$(KUBELET_VERSION)" \
		-o $(KUBELET_BIN) k8s.io/kubernetes/cmd/kubelet)

# Build every binary (dockhand, containerd-shim-dockhand-v2, the demo).
build: deps
	$(CARGO) build --workspace --bins

# Unit tests once, then the integration tests (against a real containerd started by the harness)
# once per containerd version, each run timed; every version runs even if one fails.
TEST_RUN = if $(CARGO) nextest --version >/dev/null 2>&1; then $(CARGO) nextest run --no-fail-fast $(1); \
	else $(CARGO) test --no-fail-fast $(1); fi
test: build tools containerd
	@$(call TEST_RUN,--workspace --exclude dockhand-integration)
	@failed=; for v in $(CONTAINERD_VERSIONS); do \
		start=$$(date +%s); \
		if DOCKHAND_CONTAINERD=$$v sh -c '$(call TEST_RUN,-p dockhand-integration)'; then result=passed; \
		else result=FAILED; failed="$$failed $$v"; fi; \
		echo "test: containerd $$v: integration tests $$result in $$(( $$(date +%s) - start )) s"; \
	done; [ -z "$$failed" ] || { echo "test: failed on containerd$$failed"; exit 1; }

# critest straight against containerd and through dockhand (proxy + shim), on the oldest and the
# newest containerd: the specs that pass through dockhand must be those that pass direct, and each
# side must pass at least the minimum measured for that version (integration/src/critest.rs,
# MIN_PASSED), so a harness that breaks both sides fails too (skips: integration/critest-skip.txt).
CRITEST_VERSIONS := 1.6 2.4
critest: build tools containerd
	@for v in $(CRITEST_VERSIONS); do \
		start=$$(date +%s); \
		DOCKHAND_CONTAINERD=$$v $(CURDIR)/target/debug/critest-compare || exit 1; \
		echo "critest: containerd $$v compared in $$(( $$(date +%s) - start )) s"; \
	done

# The kubelet lane (integration/tests/kubelet.rs): a real kubelet run standalone with static pods,
# straight against containerd and through dockhand, on each containerd of KUBELET_VERSIONS, timed.
KUBELET_VERSIONS := 2.3 2.4
test-kubelet: build kubelet $(addprefix containerd-,$(KUBELET_VERSIONS))
	@failed=; for v in $(KUBELET_VERSIONS); do \
		start=$$(date +%s); \
		if DOCKHAND_CONTAINERD=$$v DOCKHAND_KUBELET=$(KUBELET_BIN) $(CARGO) test -p dockhand-integration \
			--features kubelet-lane --test kubelet -- --test-threads 4; then result=passed; \
		else result=FAILED; failed="$$failed $$v"; fi; \
		echo "test-kubelet: containerd $$v: kubelet $(KUBELET_VERSION) lane $$result in $$(( $$(date +%s) - start )) s"; \
	done; [ -z "$$failed" ] || { echo "test-kubelet: failed on containerd$$failed"; exit 1; }

# The VM lane: a Debian 12 guest under qemu (systemd, cgroup v2), dockhand installed as an operator would (vm/README.md).
VM_PACKAGES := qemu-system-x86 debootstrap e2fsprogs
test-vm: build tools containerd-2.4
	@if dpkg -s $(VM_PACKAGES) >/dev/null 2>&1; then echo "test-vm: packages present"; else \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(VM_PACKAGES); fi
	bash vm/run.sh

# Formatting and clippy, warnings as errors.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

# Benchmarks: proxy vs direct (fake upstream and real containerd), ratios printed, nothing asserted.
bench: deps
	$(CARGO) build --release --workspace --bins
	$(CARGO) build --profile shim -p dockhand-shim
	DOCKHAND_BIN=$(CURDIR)/target/release/dockhand $(CARGO) bench -p dockhand-integration --bench proxy

# Start a sandboxed containerd and the proxy, run a pod through it, show what dockhand did, clean up.
demo: build
	$(CARGO) run -q -p dockhand-integration --bin demo

# Install the binaries and the systemd unit (DESTDIR=dir stages them under dir).
install:
	$(CARGO) build --release -p dockhand --bins
	$(CARGO) build --profile shim -p dockhand-shim
	install -D -m 0755 target/release/dockhand $(DESTDIR)$(PREFIX)/bin/dockhand
	install -D -m 0755 target/shim/containerd-shim-dockhand-v2 $(DESTDIR)$(PREFIX)/bin/containerd-shim-dockhand-v2
	install -D -m 0644 deploy/dockhand.service $(DESTDIR)/etc/systemd/system/dockhand.service
	install -D -m 0644 deploy/config.toml $(DESTDIR)/etc/dockhand/config.toml.example
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/dockhand/README.md
