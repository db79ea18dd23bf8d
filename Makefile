# dockhand: the one list of commands. Every target works on a fresh Debian 12 machine as root.
CARGO ?= cargo
PREFIX ?= /usr/local
DEBIAN_PACKAGES := containerd runc busybox-static protobuf-compiler gcc libc6-dev util-linux iproute2 procps

.PHONY: deps tools build test test-vm lint bench demo install

# Install the Debian packages the build, tests and demo need (skipped when all are present).
deps:
	@if dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1; then echo "deps: all present"; else \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(DEBIAN_PACKAGES); fi

# Test peers built from pinned Go modules into target/tools/bin (crictl: a grpc-go CRI client).
TOOLS_BIN := $(CURDIR)/target/tools/bin
CRI_TOOLS_VERSION := v1.34.0
tools:
	@mkdir -p $(TOOLS_BIN)
	@if [ ! -e $(TOOLS_BIN)/.cri-tools-$(CRI_TOOLS_VERSION) ]; then \
		GOBIN=$(TOOLS_BIN) go install sigs.k8s.io/cri-tools/cmd/crictl@$(CRI_TOOLS_VERSION) && \
		touch $(TOOLS_BIN)/.cri-tools-$(CRI_TOOLS_VERSION); fi

# Build every binary (dockhand, containerd-shim-dockhand-v2, the demo).
build: deps
	$(CARGO) build --workspace --bins

# Unit tests and integration tests against a real containerd started by the harness.
test: build tools
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else $(CARGO) test --workspace --no-fail-fast; fi

# The VM lane: a Debian 12 guest under qemu (systemd, cgroup v2), dockhand installed as an operator would (vm/README.md).
VM_PACKAGES := qemu-system-x86 debootstrap e2fsprogs
test-vm: build tools
	@if dpkg -s $(VM_PACKAGES) >/dev/null 2>&1; then echo "test-vm: packages present"; else \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(VM_PACKAGES); fi
	bash vm/run.sh

# Formatting and clippy, warnings as errors.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

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
