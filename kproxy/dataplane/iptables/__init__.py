"""The iptables mode's dataplane: its NodePlan carried out through the x_tables writer
(dataplane/xtables/), and what `kproxy trace` and `dump --diff` read of it."""
