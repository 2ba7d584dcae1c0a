"""A user's own task package, outside fedmq: what the task API is tested with."""
