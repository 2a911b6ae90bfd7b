"""Processes: groups and collectives, counting them, mixed precision and loss scaling, liveness."""
