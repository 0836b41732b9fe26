# pylium: `make demo` and `make test` work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
B ?=

APT_PACKAGES := python3-venv clang llvm libbpf-dev bpftool iproute2 iputils-ping iperf3 iptables \
	tcpdump netcat-openbsd socat ethtool etcd-server curl wrk prometheus chromium \
	nginx containernetworking-plugins wireguard-go wireguard-tools kcat gcc libc6-dev
# the native `pylium-cni` transport (no interpreter start per CNI exec), built with this
# machine's C compiler; without one the Python transport is installed instead
CNI_NATIVE := core/pylium/cni/native/pylium-cni
PLUGINS := $(sort $(wildcard plugins/*))
CONSTRAINTS := constraints.txt
PROJECT_FILES := $(CONSTRAINTS) pyproject.toml $(wildcard plugins/*/pyproject.toml) $(wildcard examples/*/pyproject.toml)

# Kubernetes 1.20 binaries and images for tests/privileged/k8s and `make k8s-up`: built once
# (k8s/build.sh, 12-25 min cold, ~1 min with the Go build cache) into a cache outside the
# repository. K8S_CACHE=0 skips building it (those tests are then reported skipped).
K8S_CACHE ?= /var/cache/pylium-k8s
K8S_NAME ?= dev

.PHONY: setup apt bpffs demo test bench soak lint wheels constraints clean k8s-cache k8s-up k8s-down

setup: apt bpffs $(VENV)/.installed $(CNI_NATIVE)

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get -o DPkg::Lock::Timeout=600 update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
			--no-install-recommends $$missing; \
	fi

bpffs:
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

$(CNI_NATIVE): core/pylium/cni/native/pylium-cni.c core/pylium/cni/native.py \
		core/pylium/cni/spec.py core/pylium/cni/handler.py $(VENV)/.installed
	@$(PY) -m pylium.cni.native $@ >/dev/null || echo "setup: the native pylium-cni was \
	not built (no C compiler?); the Python pylium-cni is used instead" >&2

$(VENV)/.installed: $(PROJECT_FILES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test]' $(addprefix -e ./,$(PLUGINS))
	touch $@

demo: setup
	$(PY) -m pylium.demo

# pytest exits 5 when it collected no tests: a failure here, with a message (make itself
# turns every failing exit code into 2, so the message is the only trace of the cause)
test: setup k8s-cache
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

k8s-cache:
	@if [ "$(K8S_CACHE)" = 0 ]; then echo "k8s-cache: skipped (K8S_CACHE=0)"; \
	elif [ -f "$(K8S_CACHE)/VERSION" ]; then :; \
	else PYLIUM_K8S_CACHE=$(K8S_CACHE) k8s/build.sh || echo "k8s-cache: the Kubernetes \
	build failed (log: $(K8S_CACHE)/build.log); tests/privileged/k8s will report skipped" >&2; fi

# a single-node cluster in the netns pk8s-$(K8S_NAME); kubectl: k8s/cluster.py kubectl -- get pods
k8s-up: setup k8s-cache
	PYLIUM_K8S_CACHE=$(K8S_CACHE) $(PY) k8s/cluster.py up --name $(K8S_NAME)

k8s-down:
	PYLIUM_K8S_CACHE=$(K8S_CACHE) $(PY) k8s/cluster.py down --name $(K8S_NAME)

bench: setup
	$(PY) bench/run.py $(B)

# reliability parts of issue 15 together for SOAK_SECONDS, one table (bench/soak.py)
SOAK_SECONDS ?= 600
soak: setup
	$(PY) bench/soak.py $(SOAK_SECONDS)

lint: setup
	$(VENV)/bin/ruff check core plugins tests bench examples

# stale build/ trees would leak deleted modules into the wheels: start and end clean
wheels: setup
	rm -rf dist build $(addsuffix /build,$(PLUGINS))
	$(PIP) wheel -q --no-deps -w dist . $(PLUGINS)
	rm -rf build $(addsuffix /build,$(PLUGINS))

# pyproject.toml files declare ranges; constraints.txt pins the one set that is tested. To move
# it: upgrade packages in the venv (e.g. `.venv/bin/pip install -U aiohttp`), `make test`, then
# `make constraints` writes what the venv holds now (pylium's own distributions left out).
constraints:
	@{ echo "# The tested set: every third-party distribution .venv holds after 'make setup'."; \
	   echo "# Written by 'make constraints'; pyproject.toml files declare the compatible ranges."; \
	   $(PIP) freeze --exclude-editable | grep -vi '^pylium'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) dist build .pytest_cache .ruff_cache
