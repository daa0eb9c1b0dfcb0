"""Launching a sweep: expanding its points, the checks before any job, the launcher, the code
snapshot, branches and held-out ordering, live progress, and the sweep's end."""
