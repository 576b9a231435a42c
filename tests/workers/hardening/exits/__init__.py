"""A module that may end the interpreter while it is imported."""
