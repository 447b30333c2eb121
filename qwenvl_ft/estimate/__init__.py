"""Peak GPU memory and model FLOPs of a training run, predicted from the config before anything
loads (the command: qwenvl_ft/commands/estimate.py)."""
