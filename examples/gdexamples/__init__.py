"""Example workers served by `make run`."""
