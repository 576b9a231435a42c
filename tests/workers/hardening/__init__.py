"""Workers for the hardening drills, one namespace per drill."""
