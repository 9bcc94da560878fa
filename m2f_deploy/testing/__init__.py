"""Helpers for tests and benchmarks, not used by the shipped pipeline: fake model outputs (``logits``) and the
tiny architecture they build (``configs``)."""
