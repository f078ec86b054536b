"""Pods on a bridge with an address, as flannel's and the bridge plugin's `cni0`, beside the
routed pods of netns.py (veths without addresses, as Calico's):

    node: cni0 10.244.0.1/24 (a bridge) --- vb0 ==veth== pod 10.244.0.x/24, default via 10.244.0.1

The node reaches the bridge's subnet through the bridge's own connected route; each pod's
default route points at the bridge's address. Everything is created inside the topology's
namespaces and deleted with them.
"""

from __future__ import annotations

from integration.netns import Pod, Topology

BRIDGE = "cni0"
BRIDGE_IP = "10.244.0.1"
BRIDGE_PREFIX = 24


def add_bridge(topo: Topology, name: str = BRIDGE, address: str = BRIDGE_IP) -> str:
    """A bridge on the node holding `address`/24; returns its name."""
    topo.node.ip("link", "add", name, "type", "bridge")
    topo.node.ip("addr", "add", f"{address}/{BRIDGE_PREFIX}", "dev", name)
    topo.node.ip("link", "set", name, "up")
    return name


def add_bridged_pod(
    topo: Topology, name: str, ip: str, bridge: str = BRIDGE, gateway: str = BRIDGE_IP
) -> Pod:
    """A pod namespace holding `ip`/24 on its eth0, whose node-side veth is a port of `bridge`;
    its default route goes through the bridge's address."""
    ns, link = topo.pod_namespace(name, "vb")
    topo.node.ip("link", "set", link, "master", bridge)
    topo.node.ip("link", "set", link, "up")
    ns.ip("addr", "add", f"{ip}/{BRIDGE_PREFIX}", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("route", "add", "default", "via", gateway, "dev", "eth0")
    pod = Pod(name, ip, ns, link)
    topo.pods[name] = pod
    return pod
