"""Workers for the reliability drills."""
