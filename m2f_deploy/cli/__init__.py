"""Command-line tools: m2f-export (and, as they land, m2f-predict, m2f-bench, m2f-validate)."""
