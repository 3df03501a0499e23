"""Test harnesses shipped with graphopt (importable by tests and benchmarks): opinfo.py is the differential
harness that runs PyTorch's OpInfo samples through graphopt's compiler and compares with eager."""
