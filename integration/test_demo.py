"""`make demo` works and cleans up after itself."""

from __future__ import annotations

import re
import subprocess
import sys

from integration.netns import PREFIX, list_namespaces
from integration.traffic import REPO_ROOT

DEMO_PREFIX = f"{PREFIX}demo-"  # other tests' namespaces may come and go meanwhile


def test_demo_reaches_both_nginx_endpoints_and_leaves_no_namespace() -> None:
    before = set(list_namespaces(DEMO_PREFIX))

    demo = subprocess.Popen(
        [sys.executable, "-m", "integration.demo"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.terminate()  # the demo removes its namespaces on SIGTERM
            out, err = demo.communicate()

    assert demo.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    direct, _, via_ingress = out.partition("(via the ingress)")
    assert via_ingress, out
    for section in (direct, via_ingress):
        for pod, ip in (("my-nginx-1", "192.168.183.140"), ("my-nginx-2", "192.168.224.7")):
            tally = re.search(rf"{pod} \({re.escape(ip)}:80\): (\d+) of 20", section)
            assert tally and int(tally.group(1)) > 0, out
    assert "to http://172.31.0.2:30189/testpath" in direct, out
    assert "my-nginx saw the requests coming from 192.168.235.20" in via_ingress, out
    assert re.search(r"UDP 10\.96\.0\.10:53 .*answered by coredns-1", out), out
    assert "KUBE-SVC-" in out
    leftover = set(list_namespaces(DEMO_PREFIX)) - before
    assert not leftover, f"the demo left namespaces behind: {sorted(leftover)}"
