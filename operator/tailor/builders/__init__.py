"""Pure functions from resource models and settings to child manifests and workload specs.
No I/O: everything here is unit-tested without a cluster."""
