"""Many small jobs, to run a supervisor out of descriptors."""
