"""A package with worker submodules (the loader walks it recursively)."""
