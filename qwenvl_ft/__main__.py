"""`python -m qwenvl_ft COMMAND ...`: the same as the `qwenvl-ft` script; launchers that start a module
(`torchrun -m qwenvl_ft`, `accelerate launch -m qwenvl_ft`) use this."""

from qwenvl_ft.commands.cli import entrypoint

if __name__ == "__main__":
    entrypoint()
