"""Integration tests and the demo: real network namespaces, real netfilter rules, real traffic."""
