"""Optional packages checked before anything loads (qwenvl_ft/training/preflight.py): each dist engine, Liger,
vLLM and the chat page's Gradio that a config needs and this machine lacks is one message naming the setting and
the extra that installs it, asked of the import system without importing anything. The trackers' own check is in
tests/test_config_ux.py."""

import importlib.util
import sys

import pytest

from qwenvl_ft.commands.cli import main
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.training import preflight


@pytest.fixture
def missing(monkeypatch):
    """`missing(*modules)`: find_spec answers None for them, as on a machine without those extras."""
    real = importlib.util.find_spec

    def hide(*modules):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name.split(".")[0] in modules else real(name, *a))
    return hide


@pytest.mark.parametrize("overrides, module, message", [
    (["dist=zero3"], "deepspeed", 'dist=zero3 (dist.engine=deepspeed) needs DeepSpeed, which is not installed: '
                                  'pip install "qwenvl-ft[deepspeed]"'),
    (["dist=zero3_offload"], "deepspeed", "dist=zero3_offload (dist.engine=deepspeed) needs DeepSpeed"),
    (["dist=zero2"], "deepspeed", "dist=zero2 (dist.engine=deepspeed) needs DeepSpeed"),
    (["model.use_liger_kernel=true"], "liger_kernel", 'model.use_liger_kernel=true needs Liger Kernel, which is not '
                                                       'installed: pip install "qwenvl-ft[liger]"'),
    (["recipe=grpo_demo", "trainer.grpo.vllm.enabled=true"], "vllm",
     'trainer.grpo.vllm.enabled=true needs vLLM, which is not installed: pip install "qwenvl-ft[vllm]"'),
])
def test_an_optional_package_a_config_needs_is_named_with_its_extra(missing, overrides, module, message):
    cfg = validate(compose(["recipe=demo", *overrides], output_dir="/tmp/o"))
    imported_before = module in sys.modules  # by another test of this process (tests/test_liger.py)
    if importlib.util.find_spec(module) is not None:
        preflight.check_optional_packages(cfg)  # installed here: nothing to say
    missing(module)
    with pytest.raises(ConfigError) as err:
        preflight.check_optional_packages(cfg)
    assert str(err.value).startswith(message)
    assert imported_before or module not in sys.modules  # asked, not imported


def test_what_a_config_does_not_use_is_not_asked_for(missing):
    missing("deepspeed", "liger_kernel", "vllm", "gradio")
    cfg = validate(compose(["recipe=demo", "dist=ddp"], output_dir="/tmp/o"))
    preflight.check_optional_packages(cfg)
    with pytest.raises(ConfigError, match=r'qwenvl-ft chat needs Gradio, which is not installed: pip install '
                                          r'"qwenvl-ft\[ui\]"'):
        preflight.check_optional_packages(cfg, "chat")


def test_train_without_deepspeed_stops_before_anything_loads(missing, tmp_path, capsys):
    missing("deepspeed")
    status = main(["train", "recipe=demo", "dist=zero3", f"hydra.run.dir={tmp_path / 'run'}"])
    out, err = capsys.readouterr()
    assert status == 2 and "Traceback" not in out + err
    assert 'dist=zero3 (dist.engine=deepspeed) needs DeepSpeed, which is not installed: pip install ' \
           '"qwenvl-ft[deepspeed]"' in err
