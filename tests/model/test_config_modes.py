"""Which KubeProxyConfiguration section each mode reads: as upstream's v1alpha1 conversion, the
nftables mode takes its masquerade and sync settings from `nftables:` and ignores `iptables:`,
the other modes the reverse."""

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kproxy.cli import cli
from kproxy.inspect.inputs import load_config_file
from kproxy.model.config import parse_config, with_flags
from tests import scenarios

HEADER = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"}
BOTH = {
    "iptables": {
        "masqueradeAll": False,
        "masqueradeBit": 12,
        "syncPeriod": "20s",
        "minSyncPeriod": "2s",
    },
    "nftables": {
        "masqueradeAll": True,
        "masqueradeBit": 10,
        "syncPeriod": "5s",
        "minSyncPeriod": "0s",
    },
}


def test_nftables_mode_reads_the_nftables_section_and_not_the_iptables_one() -> None:
    config, ignored = parse_config({**HEADER, "mode": "nftables", **BOTH})
    assert (config.masquerade_all, config.masquerade_bit) == (True, 10)
    assert (config.sync_period, config.min_sync_period) == (5.0, 0.0)
    assert ignored == []  # neither section is warned about: kubeadm writes both


@pytest.mark.parametrize("mode", ["", "iptables", "userspace"])
def test_the_other_modes_read_the_iptables_section_and_not_the_nftables_one(mode: str) -> None:
    config, ignored = parse_config({**HEADER, "mode": mode, **BOTH})
    assert (config.masquerade_all, config.masquerade_bit) == (False, 12)
    assert (config.sync_period, config.min_sync_period) == (20.0, 2.0)
    assert ignored == []


def test_nftables_section_alone_in_nftables_mode() -> None:
    doc = {**HEADER, "mode": "nftables", "nftables": {"syncPeriod": "5s", "masqueradeBit": 10}}
    config, ignored = parse_config(doc)
    assert (config.sync_period, config.masquerade_bit, config.min_sync_period) == (5.0, 10, 1.0)
    assert config.masquerade_mark == "0x400/0x400"
    assert ignored == []


def test_the_unread_section_is_not_checked_but_the_read_one_is() -> None:
    config, _ = parse_config({"mode": "iptables", "nftables": {"masqueradeBit": 99}})
    assert config.masquerade_bit == 14
    with pytest.raises(Exception, match=r"nftables\.masqueradeBit"):
        parse_config({"mode": "nftables", "nftables": {"masqueradeBit": 99}})


def test_unknown_names_in_the_nftables_section_are_still_named() -> None:
    _, ignored = parse_config({"mode": "nftables", "nftables": {"counters": True}})
    assert ignored == ["nftables.counters"]


def test_every_mode_flags_set_the_section_the_mode_reads() -> None:
    flags = {"--iptables-sync-period": "7s", "--masquerade-all": True, "--proxy-mode": "nftables"}
    config, _ = with_flags({**HEADER, **BOTH, "mode": "iptables"}, flags)
    assert (config.mode, config.sync_period, config.masquerade_all) == ("nftables", 7.0, True)
    assert config.masquerade_bit == 10  # --iptables-masquerade-bit not given: nftables: wins
    # --iptables-masquerade-bit is the iptables mode's only, as upstream's.
    config, _ = with_flags({"mode": "nftables"}, {"--iptables-masquerade-bit": 15})
    assert config.masquerade_bit == 14


def test_a_bad_every_mode_flag_names_the_flag_in_nftables_mode() -> None:
    with pytest.raises(Exception, match="--iptables-sync-period"):
        with_flags({"mode": "nftables"}, {"--iptables-sync-period": "soon"})


MANIFESTS = scenarios.ONE_SERVICE_YAML

NFT_CONFIG = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
iptables: {masqueradeBit: 12, syncPeriod: 20s}
nftables: {masqueradeBit: 10, syncPeriod: 5s}
"""


def test_dump_in_nftables_mode_marks_with_the_nftables_sections_bit(tmp_path: Path) -> None:
    manifests, config = tmp_path / "m.yaml", tmp_path / "config.yaml"
    manifests.write_text(MANIFESTS)
    config.write_text(NFT_CONFIG)
    result = CliRunner().invoke(
        cli, ["dump", "--manifests", str(manifests), "--config", str(config)]
    )
    assert result.exit_code == 0, result.output
    assert "table ip kube-proxy" in result.stdout
    assert "meta mark set meta mark | 0x00000400" in result.stdout
    assert "0x00004000" not in result.stdout and "0x00001000" not in result.stdout
    assert "config_field_ignored" not in result.stderr
    assert load_config_file(str(config)).sync_period == 5.0


def test_run_help_says_which_section_each_mode_reads() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kproxy.cli", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    text = " ".join(proc.stdout.split())
    assert "the nftables mode reads its nftables: section" in text
    assert "nftables.syncPeriod in the nftables mode" in text
