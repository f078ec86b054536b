"""The relay: listeners per service port that carry TCP and UDP to endpoints, in an asyncio loop
of its own. The userspace mode runs it behind its portals; the nftables mode on localhost
NodePorts (behind the KubeProxyNFTablesLocalhostNodePorts gate).

`Relay` (relay.py) is the entry point; `LoadBalancerRR` (balancer.py) picks endpoints and
`PortAllocator` (ports.py) hands out proxy ports from `portRange`."""
