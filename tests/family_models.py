"""The tiny random model of every declared family: equivalence tests parametrise over this list, so that a new
family module (qwenvl_ft/families) gets them without a test edit."""

from qwenvl_ft import families

TEST_MODELS = [family.test_model for family in families.all_families()]
DEFAULT_MODEL = families.get(families.DEFAULT).test_model


def family_of_option(option: str) -> families.Family:
    return next(family for family in families.all_families() if family.test_model == option)


def lora_settings(option: str) -> list:
    """Overrides a LoRA on every projection needs on this family: none, except that on a mixture-of-experts family
    the MLP names adapt the fused experts, whose LoRA (PEFT's target_parameters) has no dropout."""
    return ["adapter.dropout=0"] if family_of_option(option).expert_parameters else []
