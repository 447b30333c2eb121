"""bitsandbytes is imported by runs that quantise only (qwenvl_ft/modeling/peft_import.py), and the commands that
need no trainer import no TRL. The checks run in one fresh interpreter (`sys.modules` of this one holds whatever
earlier tests imported), each step recording what it found before the next one imports more: a LoRA config
composed, the commands without a trainer, a LoRA model built, then a QLoRA one (one interpreter's imports, 5-8 s
of CPU, instead of two)."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("bitsandbytes")

STEPS = """
import json, sys
from qwenvl_ft.commands.cli import main  # (what every command starts with)
from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.modeling.peft_import import defer_bitsandbytes

defer_bitsandbytes()  # as the CLI does when it starts
seen = {}
lora = validate(compose(["recipe=demo", "adapter=lora"], output_dir="/tmp/unused"))
seen["composed"] = sorted(m for m in ("bitsandbytes", "trl", "peft", "torch") if m in sys.modules)
# the commands without a trainer, one after the other: what is in sys.modules after both is what either imported
output_dir, commands = sys.argv[1], json.loads(sys.argv[2])
rcs = [main([*argv, f"output_dir={output_dir}/{i}"]) for i, argv in enumerate(commands)]
seen["commands"] = {"rc": rcs, "imported": sorted(m for m in ("trl", "bitsandbytes", "peft", "deepspeed", "wandb")
                                                  if m in sys.modules)}
from transformers import set_seed  # transformers' trainer_utils imports PEFT: the first import of it here
from qwenvl_ft.modeling.build import build_model
model = build_model(lora.model, lora.adapter)
seen["lora"] = sorted(m for m in ("bitsandbytes", "trl", "peft") if m in sys.modules)
seen["lora_layers"] = sorted({type(m).__module__ + "." + type(m).__name__ for n, m in model.named_modules()
                              if n.endswith("q_proj")})
qlora = validate(compose(["recipe=demo", "adapter=qlora"], output_dir="/tmp/unused"))
model = build_model(qlora.model, qlora.adapter)
seen["qlora"] = sorted(m for m in ("bitsandbytes", "trl", "peft") if m in sys.modules)
seen["qlora_layers"] = sorted({type(m).__module__ + "." + type(m).__name__ for n, m in model.named_modules()
                               if n.endswith("language_model.layers.0.self_attn.q_proj")})
print(json.dumps(seen))
"""
COMMANDS_WITHOUT_A_TRAINER = [["estimate", "recipe=demo"],
                              ["data-check", "recipe=demo", "data.shapes.num_train=16", "data.shapes.num_eval=4"]]


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> dict:
    cwd = tmp_path_factory.mktemp("fresh_interpreter")
    out = subprocess.run([sys.executable, "-c", STEPS, str(cwd / "run"), json.dumps(COMMANDS_WITHOUT_A_TRAINER)],
                         capture_output=True, text=True, timeout=300, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_lora_leaves_bitsandbytes_out_and_qlora_brings_it_in(seen):
    assert seen["composed"] == []  # the CLI and a composed LoRA config: no torch, PEFT, TRL or bitsandbytes
    assert seen["lora"] == ["peft"]
    assert seen["lora_layers"] == ["peft.tuners.lora.layer.Linear"]
    # the same process then quantises: PEFT sees bitsandbytes and wraps its 4-bit layers with its own LoRA layer
    assert seen["qlora"] == ["bitsandbytes", "peft"]
    assert seen["qlora_layers"] == ["peft.tuners.lora.bnb.Linear4bit"]


def test_commands_without_a_trainer_import_no_trl(seen):
    """estimate and data-check, after only a composed config: none of these packages after both means neither
    imported any."""
    assert seen["commands"] == {"rc": [0, 0], "imported": []}
