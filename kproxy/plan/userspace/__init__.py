"""The userspace mode's pure planner: listeners per service port and the portal rules in front
of them."""
