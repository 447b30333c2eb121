"""The commands of `qwenvl-ft COMMAND`, the top of the package: each is a plain function of the composed config."""
