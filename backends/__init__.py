"""Inference backends, one module each, registered through the `policy_engine` entry points."""
