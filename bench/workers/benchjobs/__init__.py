"""Worker modules of the benchmarks; each section loads one module as its namespace."""
