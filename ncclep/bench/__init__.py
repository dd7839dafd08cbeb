"""The ncclep benchmark: ``python -m ncclep.bench --help``."""
