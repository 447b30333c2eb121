"""The run skeleton's parts (start, arguments, trainer, finish, resume, trackers, telemetry, ...), which the `train`
command (qwenvl_ft/commands/train.py) goes through for the method trainer.kind names."""
