"""The tests run the `kproxy` that is installed from the wheel (`make venv` builds and installs it),
never the source tree beside them: a module the wheel leaves out fails here as it fails for users.

pytest puts the repository on sys.path (the `integration` and `bench` support packages live there),
which would make `import kproxy` find the source tree first. So `kproxy` is imported once with the
repository left out of the path, and every child process the tests start runs with
PYTHONSAFEPATH (its working directory is not searched) and finds the support packages through a
directory that holds only them.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SUPPORT_PACKAGES = ("integration", "bench")


def _is_root(entry: str) -> bool:
    return Path(entry or ".").resolve() == ROOT


def _import_installed_kproxy() -> Path:
    kept = list(sys.path)
    sys.path[:] = [entry for entry in kept if not _is_root(entry)]
    try:
        module = importlib.import_module("kproxy")
    finally:
        sys.path[:] = kept
    location = Path(module.__file__ or "").resolve()
    if location.is_relative_to(ROOT / "kproxy"):
        raise RuntimeError(
            f"kproxy is imported from the source tree ({location}), not from an installed wheel: "
            "run `make venv`, which builds the wheel and installs it (not editable)"
        )
    return location


def _support_path() -> str:
    """A directory holding only links to the support packages, for child processes."""
    support = Path(tempfile.mkdtemp(prefix="kproxy-test-support-"))
    atexit.register(shutil.rmtree, support, ignore_errors=True)
    for name in SUPPORT_PACKAGES:
        (support / name).symlink_to(ROOT / name)
    return str(support)


INSTALLED_KPROXY = _import_installed_kproxy()
os.environ["PYTHONSAFEPATH"] = "1"
os.environ["PYTHONPATH"] = _support_path()
