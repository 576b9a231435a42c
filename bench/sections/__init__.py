"""The benchmark sections; each module has run(ctx) -> dict."""
