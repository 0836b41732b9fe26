# pylium: `make demo` and `make test` work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
B ?=

APT_PACKAGES := python3-venv clang llvm libbpf-dev bpftool iproute2 iputils-ping iperf3 iptables \
	tcpdump netcat-openbsd socat ethtool etcd-server curl wrk prometheus chromium
PLUGINS := $(sort $(wildcard plugins/*))
CONSTRAINTS := constraints.txt
PROJECT_FILES := $(CONSTRAINTS) pyproject.toml $(wildcard plugins/*/pyproject.toml) $(wildcard examples/*/pyproject.toml)

.PHONY: setup apt bpffs demo test bench soak lint wheels constraints clean

setup: apt bpffs $(VENV)/.installed

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

$(VENV)/.installed: $(PROJECT_FILES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test]' $(addprefix -e ./,$(PLUGINS))
	touch $@

demo: setup
	$(PY) -m pylium.demo

# pytest exits 5 when it collected no tests: a failure here, with a message (make itself
# turns every failing exit code into 2, so the message is the only trace of the cause)
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

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
