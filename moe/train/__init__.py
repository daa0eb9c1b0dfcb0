"""The training loop and what it runs on: the plan (budget -> steps), LR schedules, the optimizer,
evaluation and durable checkpoints."""
