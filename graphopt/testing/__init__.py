"""Helpers for testing graphopt on many models: seeded random networks and a checker that classifies what the
default pipeline, prune, lowrank and quantize do with them when compiled (graphopt.testing.fuzz)."""
