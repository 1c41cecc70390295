"""Shipped policy files (YAML), loadable by name: `load_policy("llavaguard")`."""
