"""The iptables mode's planner: kube-proxy's iptables-mode chains as a Ruleset."""
