"""A kubeconfig that does not exist is named in the error, wherever it was given."""

from __future__ import annotations

import pytest

from kproxy.errors import ConfigError
from kproxy.watch.api import api_client


def test_a_missing_kubeconfig_is_named() -> None:
    with pytest.raises(ConfigError, match="kubeconfig /nonexistent/config does not exist"):
        api_client("/nonexistent/config")


def test_a_missing_file_in_kubeconfig_env_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/env-config")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "")  # not in a pod
    with pytest.raises(ConfigError, match="kubeconfig /nonexistent/env-config does not exist"):
        api_client(None)
