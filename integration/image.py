"""kproxy's container image, built with podman from the repository's Dockerfile, unchanged.

    python -m integration.image    # build it (as root) as integration/packaging/test_image.py does

No image registry is reachable where CI runs, so the Dockerfile's base (`debian:bookworm-slim`)
is built here from Debian's packages: `mmdebstrap` makes a bookworm root file system from the
host's own apt sources, and `podman import` tags it `docker.io/library/debian:bookworm-slim`, the
name the Dockerfile's `FROM` resolves to, so `podman build --pull=never` uses it. On a machine
that already holds that image (pulled, or imported by an earlier run) it is used as it is.

`pip wheel` in the builder stage needs what the host's pip needs to reach its package index: the
index settings and the CA bundle from the host pip's configuration are handed in as build secrets
(see the Dockerfile), which stay out of the image. `docker build` on a machine with internet
needs neither.

Every podman command here reads containers.conf beside this file (CONTAINERS_CONF), not the
machine's: the runc runtime (crun refuses a hybrid cgroup layout) and no default ulimits (setting
RLIMIT_NOFILE/NPROC is refused in some sandboxes).

Caching: the base image is made once and kept; podman keeps each build step's layer, so a build
with nothing changed takes seconds, and one after a change to kproxy/ rebuilds only the wheels.
Each build removes what the one before it left (see build()), so the cache does not grow.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = Path(__file__).resolve().parent / "containers.conf"
IMAGE = "kproxy:latest"
BUILDER_IMAGE = "kproxy-builder:cache"
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
SUITE = "bookworm"
TOOLS = ("podman", "runc", "mmdebstrap")
# Where the secrets are mounted in the builder stage (buildah's default target for an id).
PIP_CA_SECRET = "/run/secrets/pip-ca.crt"
# The host's apt sources, in the order tried: the Debian base is built from the same archive.
APT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
# As Debian's slim images: no documentation or translations (the copyright files stay).
_SLIM = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
)
_BUILD_TIMEOUT = 1800.0


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(
    *args: str, check: bool = True, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """`podman ARGS` with this directory's containers.conf; raises with its output if it fails."""
    argv = ["podman", *args]
    proc = subprocess.run(
        argv,
        env=podman_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(argv)}` exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def apt_sources() -> Path:
    for path in APT_SOURCES:
        if path.exists() and path.stat().st_size > 0:
            return path
    raise FileNotFoundError(f"no apt sources to build the base image from: {APT_SOURCES}")


def ensure_base() -> None:
    """The Dockerfile's base image, made from Debian's packages unless it is already there."""
    if image_exists(BASE_IMAGE):
        return
    with tempfile.TemporaryDirectory(prefix="kproxy-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        argv = ["mmdebstrap", "--variant=minbase", "--quiet"]
        argv += [f"--dpkgopt={option}" for option in _SLIM]
        argv += [SUITE, str(rootfs), str(apt_sources())]
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,  # mmdebstrap reads sources from a standard input not a tty
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` exited {proc.returncode}:\n{proc.stderr}")
        podman("import", "--quiet", str(rootfs), BASE_IMAGE, timeout=_BUILD_TIMEOUT)


# pip's precedence for `pip wheel`: the environment over the [wheel] section over [global].
_PIP_SCOPES = {"global": 1, "wheel": 2, ":env:": 3}


def parse_pip_config(text: str) -> dict[str, str]:
    """`pip config list` output (`global.index-url='https://...'`, `:env:.cert='...'`, sorted by
    name) -> the settings that matter inside the build: index-url, extra-index-url (without local
    `file:` indexes, which are not in the build) and cert, each from the scope pip would take."""
    found: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        scope, _, name = key.rpartition(".")
        rank = _PIP_SCOPES.get(scope, 0)
        if not sep or not rank or name not in ("index-url", "extra-index-url", "cert"):
            continue
        value = value.strip().strip("'\"")
        if name == "extra-index-url":
            value = " ".join(u for u in value.split() if not u.startswith("file:"))
        if value and rank > found.get(name, (0, ""))[0]:
            found[name] = (rank, value)
    return {name: value for name, (_, value) in found.items()}


def pip_secrets(workdir: Path) -> list[str]:
    """`--secret` options handing the host pip's index settings and CA bundle to the build."""
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    settings = parse_pip_config(listing)
    lines = ["[global]"]
    for key in ("index-url", "extra-index-url"):
        lines += [f"{key} = {settings[key]}"] if key in settings else []
    options = []
    ca = settings.get("cert") or os.environ.get("REQUESTS_CA_BUNDLE")
    if ca and Path(ca).is_file():
        shutil.copy(ca, workdir / "pip-ca.crt")
        lines.append(f"cert = {PIP_CA_SECRET}")
        options += ["--secret", f"id=pip-ca.crt,src={workdir / 'pip-ca.crt'}"]
    (workdir / "pip.conf").write_text("\n".join(lines) + "\n")
    return [*options, "--secret", f"id=pip.conf,src={workdir / 'pip.conf'}"]


def image_ids(*names: str) -> set[str]:
    """The IDs of those of `names` that exist."""
    return {
        podman("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()
        for name in names
        if image_exists(name)
    }


def build(tag: str = IMAGE) -> None:
    """The image from the repository's Dockerfile, on the base from ensure_base().

    The builder stage is tagged too (BUILDER_IMAGE: its layers are the cache of the next build,
    and untagged they would look unused), and the images the previous build left, with their
    layers no other image uses, are removed: the cache holds one build, not one per change."""
    ensure_base()
    before = image_ids(tag, BUILDER_IMAGE)
    with tempfile.TemporaryDirectory(prefix="kproxy-build-") as tmp:
        argv = ["build", "--pull=never", "--network", "host", "--jobs", "2"]
        argv += pip_secrets(Path(tmp))
        podman(*argv, "--tag", tag, str(REPO_ROOT), timeout=_BUILD_TIMEOUT)
        # Every step is cached by the build above: this only names the builder's last layer.
        podman(*argv, "--target", "builder", "--tag", BUILDER_IMAGE, str(REPO_ROOT))
    for stale in before - image_ids(tag, BUILDER_IMAGE):
        podman("rmi", stale, check=False)  # in use by a container: kept


def run_argv(
    netns: str, args: Sequence[str], mounts: Mapping[Path, str] = {}, name: str | None = None
) -> list[str]:
    """`podman run` of the image as the DaemonSet runs it (privileged, the node's network: here
    the network namespace `netns`), with `mounts` (host path -> container path) read-only."""
    argv = ["podman", "run", "--rm", "--privileged", "--network", f"ns:/run/netns/{netns}"]
    argv += ["--name", name] if name else []
    if Path("/lib/modules").is_dir():  # as the DaemonSet, for python-iptables' modprobe
        argv += ["--volume", "/lib/modules:/lib/modules:ro"]
    for source, target in mounts.items():
        argv += ["--volume", f"{source}:{target}:ro"]
    return [*argv, IMAGE, *args]


def main() -> int:
    missing = missing_tools()
    if missing:
        print(f"missing {', '.join(missing)}: `make image-deps` installs them", file=sys.stderr)
        return 2
    build()
    print(f"built {IMAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
