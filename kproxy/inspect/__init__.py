"""Read-only views for operators: `kproxy trace`, `kproxy dump --diff`, `kproxy status`."""
