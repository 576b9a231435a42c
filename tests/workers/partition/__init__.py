"""Workers for the partition drills: each finished job is a line in a shared ledger."""
