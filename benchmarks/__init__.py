"""mullama's benchmarks against its peers. Run ``python -m benchmarks --help``."""
