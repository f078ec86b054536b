"""The userspace mode's relay: listeners per service port that carry TCP and UDP to endpoints.

`Relay` (relay.py) is the entry point; `LoadBalancerRR` (balancer.py) picks endpoints and
`PortAllocator` (ports.py) hands out proxy ports from `portRange`."""
