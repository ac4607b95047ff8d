"""Per-task prompts, answer extraction and scoring; `synthetic` makes offline demo records."""
