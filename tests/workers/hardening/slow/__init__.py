"""A module that takes its time to import."""
