"""Built-in verdict post-processors, registered through the `policy_engine` entry points."""
