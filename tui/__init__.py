"""The Textual policy-authoring app (see the TUI issue); imports Textual only when run."""
