"""Each training method's implementation: one module per method (sft.py, dpo.py, grpo.py; base.py says what one
holds), named by the method's declaration (`Method.training`, qwenvl_ft/methods/) and loaded by that name
(`base.training_of`). They build the TRL trainer and compute the method's figures before and after training and
in `qwenvl-ft eval`."""
