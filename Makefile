# kproxy: `make demo` and `make test` do all the set-up a fresh Debian machine needs (as root).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := iptables libip4tc2 libip6tc2 libxtables12 conntrack iproute2 nftables gcc nginx curl
# What builds and runs the image in the tests: podman with the runc runtime, mmdebstrap for the
# Debian base where no image registry is reachable (integration/image.py).
IMAGE_DEB_PACKAGES := podman runc mmdebstrap

# Installs the Debian packages named in $(1) that are missing.
define apt-install-missing
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
endef

.PHONY: deps image-deps venv lint unit integration test demo bench bench-modes image image-test clean

# Debian packages: the legacy iptables libraries python-iptables drives, the iptables-legacy-save
# reader, conntrack, iproute2 and nft (the nftables mode's test oracle) for the network-namespace
# tests; nginx for the seed's my-nginx pods and ingress controller (integration/nginx.py), and curl
# to fetch through them.
deps:
	$(call apt-install-missing,$(DEB_PACKAGES))

image-deps:
	$(call apt-install-missing,$(IMAGE_DEB_PACKAGES))

# The venv holds kproxy as users get it: the wheel built the way the Dockerfile builds it, installed
# (not editable), so the tests and the demo run what ships and a module the wheel leaves out fails
# them. It is rebuilt whenever a file of the package changes.
PACKAGE_FILES := $(shell find kproxy -name '*.py')
$(VENV)/.installed: setup.cfg pyproject.toml README.md $(PACKAGE_FILES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	rm -rf build dist *.egg-info
	$(PY) -m pip wheel -q --no-deps --wheel-dir dist .
	$(PY) -m pip uninstall -q -y kproxy
	$(PY) -m pip install -q "$$(ls dist/kproxy-*.whl)[dev]"
	touch $@

venv: deps $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check kproxy tests integration bench conftest.py
	$(VENV)/bin/ruff format --check kproxy tests integration bench conftest.py
	$(VENV)/bin/mypy kproxy
	$(VENV)/bin/lint-imports  # the layer contracts in setup.cfg

unit: venv
	$(VENV)/bin/pytest -q tests

integration: venv
	$(VENV)/bin/pytest -q integration

# The services' packet-flow and traffic tests run a second time on legacy nodes (kubelet's
# chains in iptables-legacy), so the iptables mode's legacy backend meets them as the nft one
# does on the default iptables-nft node.
test: lint image-deps
	$(VENV)/bin/pytest -q -p no:cacheprovider tests integration
	KPROXY_TEST_KUBELET=legacy $(VENV)/bin/pytest -q -p no:cacheprovider integration/services

demo: venv
	$(PY) -m integration.demo

bench: venv
	$(PY) -m bench.once_bench --services 10000  # sync --once, whole process, and its peak RSS, per mode
	$(PY) -m bench.once_bench --services 5000 --endpoints 50 --mode nftables  # kubernetes#135639's shape
	$(PY) -m bench.sync_bench --services 10000
	$(PY) -m bench.nft_bench --services 10000
	$(PY) -m bench.first_packet --services 10000
	$(PY) -m bench.nft_commit_floor --services 2000 10000
	$(PY) -m bench.conntrack_bench --entries 250000
	for m in iptables nftables userspace; do $(PY) -m bench.change_latency --services 10000 --mode $$m || exit 1; done
	for m in iptables nftables; do $(PY) -m bench.file_change --agent --services 10000 --mode $$m || exit 1; done

# The userspace mode against the iptables mode through one ClusterIP (root; about 2.5 minutes).
bench-modes: venv
	$(PY) -m bench.mode_bench

# The container image, with docker. The tag is the one daemonset/kustomization.yaml and
# daemonset.yaml name, so a locally loaded image (kind load docker-image kproxy:latest) runs as it
# is; tests/packaging/test_daemonset.py checks this.
IMAGE ?= kproxy:latest
image:
	docker build -t $(IMAGE) .

# The same Dockerfile built with podman (on a Debian base made from Debian's packages where no
# image registry is reachable) and run in a network namespace in each mode: integration/image.py
# and integration/packaging/test_image.py, which `make test` runs too. The first run takes 3 to 7
# minutes; later ones reuse podman's cached base and layers (about 30 s).
image-test: image-deps venv
	$(VENV)/bin/pytest -q -p no:cacheprovider integration/packaging/test_image.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
