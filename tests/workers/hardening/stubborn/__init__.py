"""Workers that ignore what the supervisor asks."""
