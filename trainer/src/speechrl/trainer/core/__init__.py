"""The GRPO / DiffRO algorithm: config, advantages, losses, DiffRO, the update step, the policy forward
and the data-parallel update. Nothing here knows about services, files or jobs."""
