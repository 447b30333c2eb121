"""Experiment trackers (qwenvl_ft/training/trackers.py): one tiny training run reports to TensorBoard, W&B (offline
mode), SwanLab (offline mode) and MLflow (a file store) at once; each tracker's files are read back to find the
resolved config, the training curve, the held-out metrics before and after training, and the prediction gallery
before training, at the evaluation and after training."""

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qwenvl_ft.config.compose import compose, validate

PROJECT, RUN, TAGS = "qwenvl-ft-test", "tracked", ["ci", "tiny"]
# 16 rows in batches of 8: steps 1-3, evaluations at step 2 and (the Trainer's last one) step 3
COMMAND = ["train", "recipe=demo", "data.shapes.num_train=16", "data.shapes.num_eval=4", "trainer.max_steps=3",
           "trainer.eval_steps=2", "trainer.logging_steps=1", "trainer.disable_tqdm=true", f"run_name={RUN}",
           "trainer.report_to=[tensorboard,wandb,swanlab,mlflow]", f"trainer.tracker.project={PROJECT}",
           f"trainer.tracker.tags=[{','.join(TAGS)}]", "trainer.tracker.gallery_size=2"]
GALLERIES = [("before", 0), ("eval", 2), ("eval", 3), ("after", 3)]  # (when, step) of each gallery


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The run, in a process of its own as a user starts it: the trackers patch sys.stdout / sys.stderr (W&B keeps
    its patch after its run ends), which must not leak into the test session."""
    root = tmp_path_factory.mktemp("tracked")
    home = str(root / "wandb_home")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=home, WANDB_DATA_DIR=home,
               WANDB_CACHE_DIR=home, WANDB_CONFIG_DIR=home, SWANLAB_MODE="offline",
               SWANLAB_LOG_DIR=str(root / "swanlog"), MLFLOW_TRACKING_URI=(root / "mlruns").as_uri(),
               MLFLOW_ALLOW_FILE_STORE="true")  # MLflow 3 keeps the file store behind this switch
    out = subprocess.run([sys.executable, "-m", "qwenvl_ft", *COMMAND], cwd=root, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    # the library noise qwenvl_ft/quiet.py filters stays out of a real command's output
    assert "kernels-community" not in out.stderr + out.stdout and "Setting accelerator" not in out.stdout
    run = root / "outputs" / "demo" / RUN
    history = json.loads((run / "log_history.json").read_text())
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [2, 3]  # what GALLERIES assumes
    return root, run, json.loads((run / "metrics.json").read_text())


# -- TensorBoard ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tensorboard_gets_config_metrics_and_gallery(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, run, metrics = tracked
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    before, = events.Scalars("held_out_before/exact_match")
    after, = events.Scalars("held_out_after/exact_match")
    assert (before.step, before.value) == (0, pytest.approx(metrics["eval_exact_match_before"]))
    assert (after.step, after.value) == (3, pytest.approx(metrics["eval_exact_match_after"]))
    late, = events.Scalars("held_out_before/rouge_l")  # scored once training has ended, plotted at step 0 still
    assert (late.step, late.value) == (0, pytest.approx(metrics["eval_rouge_l_before"]))
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]  # the integration's curve, same run
    assert [e.step for e in events.Images("gallery/00")] == [step for _, step in GALLERIES]
    cards = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("gallery/01/text_summary")]
    assert [c.split("**")[1] for c in cards] == [when for when, _ in GALLERIES]
    assert all("**prompt:** What is in the image?" in c and "**reference:** a " in c for c in cards)
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.003" in config
    content = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["optimizer.lr"].number_value == pytest.approx(0.003)
    assert json.loads(hparams["trainer.report_to"].string_value) == ["tensorboard", "wandb", "swanlab", "mlflow"]


# -- W&B, offline ----------------------------------------------------------------------------------------------------


def _leveldb_records(path: Path, ident: bytes):
    """Records of a W&B transaction log (LevelDB's log format: 32 KiB blocks of checksummed chunks)."""
    data = path.read_bytes()
    assert data[:4] == ident
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position: position + 7])
        if kind == 0:
            break
        chunk = data[position + 7: position + 7 + length]
        position += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        else:
            yield pending + chunk


@pytest.mark.slow
def test_wandb_offline_run_gets_config_metrics_and_gallery(tracked):
    from wandb.proto import wandb_internal_pb2

    root, _, metrics = tracked
    log, = glob.glob(str(root / "outputs" / "demo" / RUN / "wandb" / "offline-run-*" / "*.wandb")) or \
        glob.glob(str(root / "wandb_home" / "wandb" / "offline-run-*" / "*.wandb"))
    records = []
    for chunk in _leveldb_records(Path(log), b":W&B"):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    start, = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (start.project, start.display_name, list(start.tags)) == (PROJECT, RUN, TAGS)
    config = {item.key: json.loads(item.value_json) for item in start.config.update}
    assert config["optimizer"]["lr"] == 0.003 and config["trainer"]["tracker"]["gallery_size"] == 2
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    before = [h for h in history if "held_out_before/exact_match" in h]
    after = [h for h in history if "held_out_after/exact_match" in h]
    assert before[0]["held_out_before/exact_match"] == pytest.approx(metrics["eval_exact_match_before"])
    assert after[0]["held_out_after/exact_match"] == pytest.approx(metrics["eval_exact_match_after"])
    assert (before[0]["train/global_step"], after[0]["train/global_step"]) == (0, 3)
    assert any("train/loss" in h for h in history)  # the integration's curve, same run
    # each gallery is a table artifact: the table (prompt, prediction, reference) and the images it shows
    artifacts = {r.artifact.name.split("-")[2]: r.artifact for r in records
                 if r.WhichOneof("record_type") == "artifact"}
    assert {"gallerybefore", "galleryeval", "galleryafter"} <= set(artifacts)
    for when in ("before", "eval", "after"):
        contents = {Path(c.path).parent.name: c for c in artifacts[f"gallery{when}"].manifest.contents}
        table = json.loads(Path(contents["gallery"].local_path).read_text())
        assert table["columns"] == ["image", "prompt", "prediction", "reference"] and len(table["data"]) == 2
        image, prompt, _, reference = table["data"][0]
        assert image["_type"] == "image-file" and prompt == "What is in the image?" and reference.startswith("a ")
        assert contents["images"].size > 0


# -- SwanLab, offline ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_swanlab_offline_run_gets_config_metrics_and_gallery(tracked):
    from swanlab.proto.swanlab.record.v1 import record_pb2
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    root, _, metrics = tracked
    folder, = glob.glob(str(root / "swanlog" / "run-*"))
    reader = DataStoreReader()
    reader.open(glob.glob(f"{folder}/*.swanlab")[0])
    records = []
    while (chunk := reader.scan()) is not None:
        record = record_pb2.Record()
        record.ParseFromString(chunk)
        records.append(record)
    start, = [r.start for r in records if r.HasField("start")]
    assert (start.project, start.name, list(start.tags)) == (PROJECT, RUN, TAGS)
    config = yaml.safe_load(Path(folder, "files", "config.yaml").read_text())
    assert config["optimizer"]["value"]["lr"] == 0.003
    scalars = {(r.scalar.key, r.scalar.step): r.scalar.value.number for r in records if r.HasField("scalar")}
    assert scalars[("held_out_before/exact_match", 0)] == pytest.approx(metrics["eval_exact_match_before"])
    assert scalars[("held_out_after/exact_match", 3)] == pytest.approx(metrics["eval_exact_match_after"])
    assert ("train/loss", 3) in scalars  # the integration's curve, same run
    media = {(r.media.key, r.media.step): list(r.media.value.items) for r in records if r.HasField("media")}
    for when, step in GALLERIES:
        images = media[(f"gallery/{when}", step)]
        assert len(images) == 2 and all("prediction:" in i.caption and "reference: a " in i.caption for i in images)
        assert len(media[(f"gallery_text/{when}", step)]) == 2
        assert all(glob.glob(f"{folder}/media/**/{i.filename}", recursive=True) for i in images)


# -- MLflow, file store ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mlflow_file_store_run_gets_config_metrics_and_gallery(tracked, monkeypatch):
    from mlflow import MlflowClient

    root, _, metrics = tracked
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((root / "mlruns").as_uri())
    run, = client.search_runs([client.get_experiment_by_name(PROJECT).experiment_id])
    assert run.info.run_name == RUN and run.info.status == "FINISHED"
    assert set(TAGS) <= set(run.data.tags)
    assert run.data.params["optimizer.lr"] == "0.003" and run.data.params["adapter.method"] == "full"
    assert run.data.params["learning_rate"] == "0.003"  # the integration's own parameters, same run
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in ("held_out_before/exact_match", "held_out_after/exact_match", "loss")}
    assert history["held_out_before/exact_match"] == [(0, pytest.approx(metrics["eval_exact_match_before"]))]
    assert history["held_out_after/exact_match"] == [(3, pytest.approx(metrics["eval_exact_match_after"]))]
    assert [step for step, _ in history["loss"]] == [1, 2, 3]
    galleries = sorted(a.path for a in client.list_artifacts(run.info.run_id, "gallery"))
    assert galleries == sorted(f"gallery/{when}_step{step:06d}.json" for when, step in GALLERIES)
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "gallery/after_step000003.json",
                                                      str(root))).read_text())
    assert table["columns"] == ["image", "prompt", "prediction", "reference"] and len(table["data"]) == 2
    image, prompt, _, reference = table["data"][0]
    assert prompt == "What is in the image?" and reference.startswith("a ")
    assert image["type"] == "image"
    assert client.download_artifacts(run.info.run_id, image["filepath"], str(root))  # the image itself
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]


# -- main process only ---------------------------------------------------------------------------------------------


def test_only_the_main_process_opens_and_logs(monkeypatch):
    from types import SimpleNamespace

    from qwenvl_ft.training import trackers as trackers_module
    from qwenvl_ft.training.trackers import Trackers

    opened = []
    for name in ("TensorBoardTracker", "WandbTracker", "SwanLabTracker", "MlflowTracker"):
        monkeypatch.setattr(trackers_module, name, lambda *a, _name=name, **k: opened.append(_name))
    cfg = validate(compose(["recipe=demo", "trainer.report_to=[tensorboard,wandb,swanlab,mlflow]"],
                           output_dir="/tmp/qwenvl_ft_test_out"))
    other = Trackers(cfg, {}, "", gallery=lambda model: pytest.fail("a gallery on another process"))
    other.held_out("before", {"exact_match": 0.5}, 0)  # before the Trainer exists: waits
    other.on_init_end(SimpleNamespace(run_name=RUN), SimpleNamespace(is_world_process_zero=False), None)
    other.on_evaluate(None, SimpleNamespace(global_step=2), None, model=object())
    other.held_out("after", {"exact_match": 1.0}, 3)
    other.close()
    assert opened == [] and other.pending == [] and not other.wants_gallery


# -- GRPO: held-out rewards and the gallery through the same skeleton ------------------------------------------------


@pytest.mark.slow
def test_grpo_run_reports_held_out_rewards_and_gallery(tmp_path):
    """A GRPO run's held-out figures are its rewards (eval_reward_before/_after, per reward too): they and the
    gallery of prompt, greedy completion and solution reach the trackers as an SFT run's metrics do."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qwenvl_ft.commands.train import train

    run = tmp_path / "grpo"
    metrics = train(compose(["recipe=grpo_demo", "model.start_from=null", "data.shapes.num_train=8",
                             "data.shapes.num_eval=2", "trainer.max_steps=1", "trainer.batch_size=4",
                             "trainer.grpo.num_generations=4", "trainer.grpo.max_completion_length=2",
                             "trainer.max_new_tokens=2", "trainer.disable_tqdm=true", "trainer.report_to=[tensorboard]",
                             "trainer.tracker.gallery_size=1"], output_dir=str(run)))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    for when, step in (("before", 0), ("after", 1)):
        for name in ("reward", "reward/accuracy", "reward/format"):
            logged, = events.Scalars(f"held_out_{when}/{name}")
            assert (logged.step, logged.value) == (step, pytest.approx(metrics[f"eval_{name}_{when}"]))
    assert [e.step for e in events.Images("gallery/00")] == [0, 1]
    cards = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("gallery/00/text_summary")]
    assert all("**prompt:** What is in the image?" in c and "**reference:** a " in c for c in cards)


def test_gallery_images_show_the_predicted_and_reference_boxes(processor_of):
    from PIL import Image

    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.training.trackers import gallery_entries
    from data_helpers import data_cfg

    collator = VisionChatCollator(processor_of("tiny"), data_cfg(format="shapes", max_length=None))
    row = {"messages": [], "images": [Image.new("RGB", (100, 100), (250, 250, 250))], "source": "t:1"}
    boxed, plain = gallery_entries([row, row], ["(0,0),(499,499)", "a cat"], ["(500,500),(999,999)", "a cat"],
                                   collator)
    assert boxed.image.getpixel((20, 0)) != (250, 250, 250)  # the predicted box's top edge (upper left)
    assert boxed.image.getpixel((75, 50)) != (250, 250, 250)  # the reference's (lower right)
    assert plain.image.getpixel((20, 0)) == (250, 250, 250)  # no box: the image as it is
