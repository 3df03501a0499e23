"""Test harnesses shipped with graphopt (importable by tests and benchmarks):
  opinfo.py  the differential harness that runs PyTorch's OpInfo samples through graphopt's compiler and
             compares with eager;
  fuzz.py    seeded random networks and a checker that classifies what the default pipeline, prune, lowrank
             and quantize do with them when compiled;
  bounds.py  a static check of lowered TIR kernels for out-of-bounds accesses that are always evaluated
             (a Select's operands), whatever the inputs' values."""
