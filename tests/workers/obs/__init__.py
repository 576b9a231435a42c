"""Workers for the console, metrics, sd_notify and log tests."""
