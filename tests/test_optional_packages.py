"""Installed trackers and DeepSpeed stay unimported by the jobs that do not use them
(qwenvl_ft/training/optional_packages.py)."""

import importlib.util
import json
import subprocess
import sys

from omegaconf import OmegaConf

from qwenvl_ft.config.compose import compose
from qwenvl_ft.training.optional_packages import hidden, unused_packages


def test_unused_packages_follow_report_to_and_the_engine():
    cfg = OmegaConf.create({"trainer": {"report_to": ["tensorboard", "wandb"]}, "dist": {"engine": "none"}})
    assert unused_packages(cfg) == ["swanlab", "mlflow", "deepspeed"]
    cfg = OmegaConf.create({"trainer": {"report_to": ["mlflow"]}, "dist": {"engine": "deepspeed"}})
    assert unused_packages(cfg) == ["wandb", "swanlab"]
    assert unused_packages(OmegaConf.create({"merge": {}})) == ["wandb", "swanlab", "mlflow", "deepspeed"]
    # as Hydra composes them: the schema's enum members
    composed = compose(["recipe=demo", "trainer.report_to=[tensorboard,wandb,mlflow]", "dist=zero2"],
                       output_dir="/tmp/unused")
    assert unused_packages(composed) == ["swanlab"]
    assert unused_packages(compose(["recipe=demo"], output_dir="/tmp/unused")) == ["wandb", "swanlab", "mlflow",
                                                                                     "deepspeed"]


def test_a_sweep_keeps_the_trackers_visible_for_its_later_jobs():
    # TRL imports the trackers it finds once, with its trainer modules: a sweep's first job must not hide one
    # from a later job that reports to it. DeepSpeed is looked up per call, so it stays hidden.
    composed = compose(["recipe=demo"], output_dir="/tmp/unused")
    assert unused_packages(composed, sweep=True) == ["deepspeed"]
    assert unused_packages(composed, sweep=False) == ["wandb", "swanlab", "mlflow", "deepspeed"]


def test_hidden_packages_look_uninstalled_and_come_back():
    name = "qwenvl_ft_test_never_imported_json"
    sys.modules.pop(name, None)
    with hidden([name, "json"]) as hid:  # json is imported already: nothing to save, left alone
        assert hid == [name]
        assert importlib.util.find_spec(name) is None
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise AssertionError("a hidden package imported")
        assert sys.modules["json"] is json
    assert name not in sys.modules


RUN = """
import gc, json, sys
from qwenvl_ft.commands.cli import main
from qwenvl_ft.training import startup

started = {}
mark = startup.mark


def noted(name):  # what the process holds when the start-up's last phase before the training loop ends
    mark(name)
    if name == "held-out generation before training":
        started.update(nltk="nltk" in sys.modules, collecting=gc.isenabled(), frozen=gc.get_freeze_count() > 0)


startup.mark = noted
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "imported": sorted(m for m in ("bitsandbytes", "deepspeed", "wandb", "mlflow", "swanlab")
                                                if m in sys.modules), "started": started}))
"""


def test_a_lora_run_imports_no_tracker_engine_or_bitsandbytes_it_does_not_use(tmp_path):
    argv = ["train", "recipe=demo", "adapter=lora", "data.shapes.num_train=16", "data.shapes.num_eval=4",
            "trainer.max_steps=2", "trainer.num_predictions_to_print=0", f"output_dir={tmp_path / 'run'}"]
    out = subprocess.run([sys.executable, "-c", RUN, *argv], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert {key: seen[key] for key in ("rc", "imported")} == {"rc": 0, "imported": []}
    # the same run's start-up: no nltk before the training loop (the check before training scores BLEU and ROUGE-L
    # once it has ended: evaluation/held_out.py), and the collector, paused for the imports, runs again with the
    # imported modules frozen (training/startup.py heavy_imports)
    assert seen["started"] == {"nltk": False, "collecting": True, "frozen": True}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {f"eval_{name}_{when}" for name in ("bleu", "rouge_l") for when in ("before", "after")} <= set(metrics)
    # the same run: its last step's loss is logged (logging_steps=10 > 2 steps; training/trainer.py), so the
    # result line reports it, and no library progress bar is in the (non-terminal) output
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2]
    assert "Loading weights" not in out.stderr and "Writing model shards" not in out.stderr
