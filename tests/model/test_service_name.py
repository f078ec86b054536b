"""ServicePortName hashes once, at construction, and a pickled one is hashed again where it is
unpickled (string hashes differ between processes)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

from kproxy.model.service import NamespacedName, Protocol, ServicePortName

SPN = ServicePortName(NamespacedName("default", "web"), "http", Protocol.TCP)

UNPICKLE = """
import pickle, sys
from kproxy.model.service import NamespacedName, Protocol, ServicePortName
spn = pickle.loads(bytes.fromhex(sys.argv[1]))
same = ServicePortName(NamespacedName("default", "web"), "http", Protocol.TCP)
print(hash(spn) == hash(same) and spn in {same: 1})
"""


def test_equal_names_hash_alike_and_order_by_their_fields() -> None:
    again = ServicePortName(NamespacedName("default", "web"), "http", Protocol.TCP)
    assert again == SPN and hash(again) == hash(SPN) and {SPN: 1}[again] == 1
    other = ServicePortName(NamespacedName("default", "api"), "", Protocol.UDP)
    assert sorted([SPN, other]) == [other, SPN]
    assert repr(SPN) == (
        "ServicePortName(service=NamespacedName(namespace='default', name='web'), "
        "port='http', protocol=<Protocol.TCP: 'TCP'>)"
    )


def test_a_name_unpickled_in_another_process_is_found_in_its_maps() -> None:
    payload = pickle.dumps(SPN).hex()
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", UNPICKLE, payload], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == "True", out.stderr
