"""Training over several ranks: the process group, the DDP / FSDP2 / expert-parallel layouts, and the
analytic memory planner that picks one (docs/parallel.md, docs/memory.md)."""
