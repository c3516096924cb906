"""Deterministic simulator and linearizability checker used by the tests."""
