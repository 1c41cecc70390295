"""Dataset audits, their results, reports and evaluations (see docs/audit.md)."""
