"""Command-line helpers that prepare inputs for the stages (e.g. a real checkpoint, offline)."""
