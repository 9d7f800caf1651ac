"""Training jobs: one driver (driver.py) for every job kind (asr.py, tts.py), registered by name
(registry.py), run by `speechrl train` (cli.py) or the trainer's job service (service.py), with
their checkpoints, metrics, weight sync and the job store."""
