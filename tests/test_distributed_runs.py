"""Tier 2 of the distributed engines: two processes over gloo on the tiny model, started the way users start them
(`qwenvl-ft train dist=...`, two "machines" on localhost, torchrun), compared with one process on the same global
batch; sweeps through submitit's local launcher and Optuna.

Tolerance of the loss comparisons: relative 1e-4 (float32 sums over the tokens of two ranks are added in another
order than over one batch; the differences measured are about 1e-7).
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.training.resume import latest_complete

pytestmark = [pytest.mark.slow, pytest.mark.dist]

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = dict(rel=1e-4, abs=1e-6)
# The demo's tiny model, few steps; the global batch is 8 rows (two processes x 4, or one process x 8).
SMALL = ["recipe=demo", "data.shapes.num_train=32", "data.shapes.num_eval=4", "trainer.logging_steps=1",
         "trainer.eval_generation=false", "trainer.disable_tqdm=true", "optimizer.scheduler=constant",
         "optimizer.warmup_ratio=0", "adapter.dropout=0"]


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "QWENVL_FT_LAUNCH_ID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _start(cwd: Path, log: Path, *args) -> subprocess.Popen:
    """`qwenvl-ft train ARGS` as a user runs it, in its own session (so that it can be killed with its workers)."""
    return subprocess.Popen([sys.executable, "-m", "qwenvl_ft", "train", *args], cwd=cwd, env=_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _start_torchrun(cwd: Path, log: Path, *args) -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 -m qwenvl_ft train ARGS`: the processes started by someone else's launcher."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "qwenvl_ft", "train", *args], cwd=cwd, env=_env(), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_with_workers(proc: subprocess.Popen) -> None:
    """SIGKILL to the launcher and its workers (torch's launcher starts each worker in a session of its own)."""
    import psutil

    processes = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=60)
    proc.wait(timeout=60)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-4000:]
    return log.read_text()


def _losses(run: Path) -> dict:
    return {e["step"]: e["loss"] for e in json.loads((run / "log_history.json").read_text()) if "loss" in e}


def _single_process_losses(tmp_path: Path, name: str, *overrides) -> dict:
    from qwenvl_ft.commands.train import train

    train(compose(list(overrides), output_dir=str(tmp_path / name)))
    return _losses(tmp_path / name)


def _assert_same_losses(losses: dict, reference: dict, steps: int):
    assert sorted(losses) == sorted(reference) == list(range(1, steps + 1))
    for step in reference:
        assert losses[step] == pytest.approx(reference[step], **TOLERANCE), (step, losses, reference)


def _assert_same_weights(final: Path, reference_final: Path):
    """final/ loads with plain transformers and holds the one-process weights: every element within 1e-4 after a
    few AdamW steps at lr 1e-3..3e-3 (Adam divides by the gradient's own size, so where a gradient is ~0 the
    float32 differences of another summation order reach the update; measured: at most 1.1e-5 apart)."""
    from transformers import Qwen2VLForConditionalGeneration

    tuned = Qwen2VLForConditionalGeneration.from_pretrained(str(final)).state_dict()
    single = Qwen2VLForConditionalGeneration.from_pretrained(str(reference_final)).state_dict()
    assert tuned.keys() == single.keys()
    worst = max((float((tuned[k] - single[k]).abs().max()), k) for k in single)
    assert worst[0] < 1e-4, worst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mixed_data(folder: Path) -> Path:
    """LLaVA rows: images of six colours, and two text-only rows among them."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, colour) in enumerate([("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200)),
                                        ("yellow", (200, 200, 30)), ("cyan", (30, 200, 200)),
                                        ("magenta", (200, 30, 200))]):
        Image.new("RGB", (56, 56), colour).save(folder / f"{name}.png")
        rows.append({"image": f"{name}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": f"It is {name}."}]})
    rows.insert(1, {"conversations": [{"from": "human", "value": "Say hello."},
                                      {"from": "gpt", "value": "Hello there."}]})
    rows.insert(4, {"conversations": [{"from": "human", "value": "Count to three."},
                                      {"from": "gpt", "value": "One, two, three."}]})
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_ddp_lora_killed_part_way_resumes_on_both_ranks_and_equals_one_process(tmp_path):
    """`qwenvl-ft train dist=ddp dist.num_processes=2`, killed (launcher and workers) after its first complete
    checkpoint; the same command resumes both ranks from it. Every step's loss equals a single process's on the same
    global batch, and the run leaves one folder with one consolidated adapter that plain PEFT loads."""
    steps = 8  # 32 rows, global batch 8: two epochs, checkpoints every 2 steps
    command = SMALL + ["adapter=lora", "dist=ddp", "dist.num_processes=2", "trainer.batch_size=4",
                       f"trainer.max_steps={steps}", "trainer.save_steps=2", "trainer.save_total_limit=null",
                       "run_name=ddp"]
    run = tmp_path / "outputs" / "demo" / "ddp"
    first = _start(tmp_path, tmp_path / "first.log", *command)
    deadline = time.time() + 600
    while latest_complete(run) is None and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    _kill_with_workers(first)  # the launcher and both workers, as a lost machine would
    resumed_from = latest_complete(run)
    assert resumed_from is not None and not (run / "final").exists(), (tmp_path / "first.log").read_text()[-3000:]

    log = _finish(_start(tmp_path, tmp_path / "second.log", *command), tmp_path / "second.log")
    assert f"resuming from {resumed_from}" in log
    rank1_log = (run / "cli.rank1.log").read_text()
    assert f"rank 1 of 2: resuming from {resumed_from}" in rank1_log
    # The data check ran once (on the main process) in each launch; rank 1 took its result.
    assert "data check: the main process's result" in rank1_log and "data check:\n" not in rank1_log
    writers = {path.name.split(".")[-2] for path in (run / "tensorboard").rglob("events.out.tfevents.*")}
    assert len(writers) == 2  # the process ids that wrote event files: one per launch, its main process only

    reference = _single_process_losses(tmp_path, "single", *SMALL, "adapter=lora", "trainer.batch_size=8",
                                       f"trainer.max_steps={steps}")
    _assert_same_losses(_losses(run), reference, steps)

    assert [p.name for p in (tmp_path / "outputs" / "demo").iterdir()] == ["ddp"]  # one run folder
    recorded = OmegaConf.load(run / "config.yaml")
    assert (recorded.dist.engine, recorded.dist.world_size, recorded.dist.num_processes) == ("ddp", 2, 2)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    from qwenvl_ft.modeling.random_init import materialize

    architecture = validate(compose(SMALL, output_dir="/tmp/unused")).model.architecture
    base = Qwen2VLForConditionalGeneration.from_pretrained(materialize(architecture))
    model = PeftModel.from_pretrained(base, str(run / "final"))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    assert not list(run.glob(".final*"))


def test_zero3_with_a_text_only_rank_and_an_image_rank_equals_one_process(tmp_path):
    """DeepSpeed ZeRO-3 between two CPU processes: every step one rank gets the text-only row and the other the
    image row (two rows, one per rank); the model is created partitioned; the run stops after 2 steps and a longer
    run, started by torchrun this time, resumes from DeepSpeed's partitioned checkpoint. Each loss equals one
    process's on both rows, and final/ is one ordinary model gathered from the partitions."""
    data = _mixed_data(tmp_path / "data")
    rows = ["data=llava", f"data.path={data}", "data.max_length=96", "data.max_samples=2", "data.shuffle=false",
            "adapter=full", "trainer.save_steps=1", "optimizer.vision_lr=1e-3"]
    command = SMALL + rows + ["dist=zero3", "dist.num_processes=2", "trainer.batch_size=1", "run_name=z3"]
    _finish(_start(tmp_path, tmp_path / "first.log", *command, "trainer.max_steps=2"), tmp_path / "first.log")
    run = tmp_path / "outputs" / "demo" / "z3"
    assert list((run / "checkpoint-2").glob("global_step2/*optim_states.pt")), "DeepSpeed's partitioned states"
    log = _finish(_start_torchrun(tmp_path, tmp_path / "second.log", *command, "trainer.max_steps=3"),
                  tmp_path / "second.log")
    assert f"resuming from {run / 'checkpoint-2'}" in log
    for rank_log in (log, (run / "cli.rank1.log").read_text()):
        assert "model created partitioned by ZeRO-3: this process holds" in rank_log
    reference = _single_process_losses(tmp_path, "single", *SMALL, *rows, "trainer.batch_size=2",
                                       "trainer.max_steps=3")
    _assert_same_losses(_losses(run), reference, 3)
    _assert_same_weights(run / "final", tmp_path / "single" / "final")


def test_a_data_error_stops_every_process_with_one_message(tmp_path):
    """The main process's data check finds an invalid row: every process stops on it (none waits for the others
    until a timeout), the message is printed once, without a traceback, and the launcher exits with status 2."""
    data = _mixed_data(tmp_path / "data")
    with data.open("a") as f:
        f.write(json.dumps({"image": "missing.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Nothing."}]}) + "\n")
    proc = _start(tmp_path, tmp_path / "bad.log", *SMALL, "data=llava", f"data.path={data}", "dist=ddp",
                  "dist.num_processes=2", "run_name=bad")
    assert proc.wait(timeout=600) == 2
    text = (tmp_path / "bad.log").read_text()
    assert text.count("missing.png") >= 1 and "Traceback" not in text
    assert text.count("qwenvl-ft: ") == 2  # the worker's message, then the launcher's line
    # whichever rank exits first, torchrun may stop the other before it exits 2 itself (test_distributed.py)
    stopped = re.search(r"the launched processes stopped \(exit status rank 0: (.*), rank 1: (.*)\); ", text)
    assert stopped and "2" in stopped.groups()
    assert set(stopped.groups()) <= {"2", "stopped by the launcher (SIGTERM)", "stopped by the launcher (SIGKILL)"}


def test_fsdp2_on_gloo_mixed_modality_gradients_and_losses_equal_one_process(tmp_path):
    """FSDP2 as accelerate applies it (tests/fsdp_worker.py): decoder layers and vision blocks are the wrap
    units; a text-only rank next to an image rank gives the single-process gradients; LoRA and full fine-tuning
    give the single-process losses."""
    data = _mixed_data(tmp_path / "data")
    out = tmp_path / "fsdp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(REPO / "tests" / "fsdp_worker.py"), str(data), str(out)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    mixed = result["mixed_modality"]
    assert mixed["wrap_classes"] == ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"]
    # every decoder layer and vision block is its own unit (inside FSDP's activation-checkpoint wrapper), the model
    # the root unit (accelerate >= 1.16 also makes the embeddings and the head units of their own); transformers' own
    # checkpointing is off, so nothing is recomputed twice
    units = mixed["fsdp_units"]
    assert {name: units.get(name) for name in mixed["layers"]} == mixed["layers"]
    assert units.get("Qwen2VLForConditionalGeneration") == 1
    assert mixed["checkpoint_wrappers"] == sum(mixed["layers"].values())
    assert mixed["transformers_checkpointing"] == 0
    assert mixed["same_names"] and mixed["vision_grad_norm"] > 0
    assert mixed["max_abs_diff"] <= 1e-5 * mixed["max_abs_grad"] + 1e-7
    for adapter in ("lora", "full"):
        assert result[adapter]["fsdp"] == pytest.approx(result[adapter]["single"], **TOLERANCE)
        # the consolidated weights after three AdamW steps at lr 1e-2 (measured: at most 1.2e-5 apart)
        assert result[adapter]["state_dict_keys_match"] and result[adapter]["state_dict_max_abs_diff"] < 1e-4
    assert result["full"]["single"][-1] < result["full"]["single"][0]  # it trains


# One CLI over the launch configs, as TRL's tests/distributed runs one script under each accelerate config: every
# setup below trains on the same global batch of 8 rows per step, (machines, processes per machine, rows per
# process, accumulation steps), so every one must follow the single-process trajectory (1 x 1 x 8 x 1) and end with
# its weights. `ddp` runs as two "machines" on localhost (dist.num_machines=2, one process each); one machine with two
# ddp processes is the resume test above, and the launcher path the ZeRO entries take.
LAUNCH_CONFIGS = {"ddp": (2, 1, 4, 1), "zero2": (1, 2, 2, 2), "zero3": (1, 2, 1, 4), "fsdp": (1, 2, 4, 1)}
STEPS = 3
# ... and the held-out generation check after training (before too where the model is placed already: ddp)
FULL = ["adapter=full", f"trainer.max_steps={STEPS}", "trainer.eval_generation=true", "trainer.max_new_tokens=6"]
GENERATION = [f"eval_{name}_{when}" for when in ("before", "after") for name in ("exact_match", "bleu", "rouge_l")]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference trajectory: one process, batch 8, full fine-tuning (its folder, with final/, and losses)."""
    root = tmp_path_factory.mktemp("one_process")
    return root / "batch8", _single_process_losses(root, "batch8", *SMALL, *FULL, "trainer.batch_size=8")


def test_one_process_with_accumulation_follows_the_one_batch_trajectory(one_process, tmp_path):
    """1 process x 4 rows x 2 accumulation steps = 1 process x 8 rows: the same loss every step."""
    _, reference = one_process
    accumulated = _single_process_losses(tmp_path, "accum", *SMALL, *FULL, "trainer.batch_size=4",
                                         "trainer.gradient_accumulation_steps=2")
    _assert_same_losses(accumulated, reference, STEPS)


def _start_machines(tmp_path: Path, option: str, machines: int, command: list) -> list:
    """One launcher per machine; several meet at 127.0.0.1 with their own machine rank."""
    if machines == 1:
        return [(_start(tmp_path, tmp_path / f"{option}.log", *command), tmp_path / f"{option}.log")]
    rendezvous = ["dist.main_process_ip=127.0.0.1", f"dist.main_process_port={_free_port()}"]
    logs = [tmp_path / f"{option}.machine{rank}.log" for rank in range(machines)]
    return [(_start(tmp_path, log, *command, *rendezvous, f"dist.machine_rank={rank}"), log)
            for rank, log in enumerate(logs)]


@pytest.mark.parametrize("option", list(LAUNCH_CONFIGS))
def test_the_same_cli_under_every_launch_config_follows_the_one_process_trajectory(option, request, tmp_path,
                                                                                    monkeypatch, capsys):
    """`qwenvl-ft train dist=OPTION ...` on two processes: the losses of every step equal one process's on the
    same global batch (relative 1e-4), one run folder recording world size 2, and final/ is one ordinary model with
    the single-process weights. ZeRO-2 and ZeRO-3 run on CPU (DeepSpeed's CPU accelerator over gloo); dist=fsdp
    needs GPUs (accelerate applies FSDP on accelerators only), so without two of them the same command must refuse
    it before starting any process (FSDP2 sharding itself: the fsdp worker test above)."""
    import torch

    machines, processes, rows, accumulation = LAUNCH_CONFIGS[option]
    command = SMALL + FULL + [f"dist={option}", f"dist.num_processes={processes}", f"dist.num_machines={machines}",
                              f"trainer.batch_size={rows}", f"trainer.gradient_accumulation_steps={accumulation}",
                              "run_name=run"]
    if option == "fsdp" and torch.cuda.device_count() < 2:
        # refused before any process starts: the CLI's main in this process is the launcher a fresh one would run
        from qwenvl_ft.commands.cli import main

        monkeypatch.chdir(tmp_path)
        assert main(["train", *command]) == 2
        err = capsys.readouterr().err
        assert "dist=fsdp needs GPUs" in err and "Traceback" not in err
        return
    launchers = _start_machines(tmp_path, option, machines, command)
    for proc, log in launchers:
        _finish(proc, log)
    run = tmp_path / "outputs" / "demo" / "run"
    reference_folder, reference = request.getfixturevalue("one_process")  # not built for the refusal above
    _assert_same_losses(_losses(run), reference, STEPS)
    assert [p.name for p in (tmp_path / "outputs" / "demo").iterdir()] == ["run"]
    recorded = OmegaConf.load(run / "config.yaml").dist
    assert (recorded.world_size, recorded.num_machines) == (machines * processes, machines)
    _assert_same_weights(run / "final", reference_folder / "final")
    # held-out answers to all 4 rows, generated by the main process (ddp, ZeRO-2) or by both, each its share
    # (ZeRO-3, sharded, gathered): the one-process figures. Before training only under ddp (DeepSpeed places the
    # model when training starts). After 3 steps the answers are still degenerate, so equal figures show that every
    # row was answered and gathered, not more.
    metrics, expected = (json.loads((folder / "metrics.json").read_text()) for folder in (run, reference_folder))
    held_out = [key for key in GENERATION if option == "ddp" or key.endswith("_after")]
    assert {key: metrics.get(key) for key in held_out} == {key: expected[key] for key in held_out}
    assert ("eval_exact_match_before" in metrics) == (option == "ddp")
    assert "held-out predictions after training (exact match 0.0% on 4 rows)" in (run / "cli.log").read_text()


# The families added after the launch-config test was written: Qwen3.5 (Gated DeltaNet layers, a thinking template)
# and the two mixture-of-experts families (routed experts; their router's load-balancing loss is left out here: it is
# a product of means over the batch, so two ranks' halves do not average to the whole batch's, as in any DDP run).
NEWER_FAMILIES = {"tiny_qwen3_5": [], "tiny_qwen3_vl_moe": ["model.router_aux_loss_coef=0"],
                  "tiny_qwen3_5_moe": ["model.router_aux_loss_coef=0"]}


@pytest.mark.parametrize("option", list(NEWER_FAMILIES))
def test_newer_families_under_ddp_follow_the_one_process_trajectory(option, tmp_path):
    """The tiny model as `qwenvl-ft train dist=ddp` on two processes x 4 rows: the losses of every step and the
    final weights equal one process's on the same 8 rows."""
    from qwenvl_ft.modeling.build import model_class

    common = SMALL + [f"model={option}", "adapter=full", f"trainer.max_steps={STEPS}", *NEWER_FAMILIES[option]]
    log = tmp_path / "ddp.log"
    _finish(_start(tmp_path, log, *common, "dist=ddp", "dist.num_processes=2", "trainer.batch_size=4",
                   "run_name=run"), log)
    run = tmp_path / "outputs" / "demo" / "run"
    reference = _single_process_losses(tmp_path, "single", *common, "trainer.batch_size=8")
    _assert_same_losses(_losses(run), reference, STEPS)
    cls = model_class(validate(compose(common, output_dir="/tmp/unused")).model)
    tuned, single = (cls.from_pretrained(str(folder / "final")).state_dict() for folder in (run, tmp_path / "single"))
    assert tuned.keys() == single.keys()
    assert max(float((tuned[k] - single[k]).abs().max()) for k in single) < 1e-4


QUICK_SWEEP = ["recipe=demo", "data.shapes.num_train=16", "data.shapes.num_eval=4", "trainer.max_steps=2",
               "trainer.eval_generation=false", "trainer.disable_tqdm=true"]


def _sweep(tmp_path, *args):
    """In a fresh interpreter: submitit pickles the job for its processes, and a job pickled in this process (which
    has imported what the whole test session needed) made each job process import more (measured: 30 s of CPU
    instead of 18 for the test)."""
    return subprocess.run([sys.executable, "-m", "qwenvl_ft", "train", "-m", *QUICK_SWEEP, *args,
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=900)


def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    out = _sweep(tmp_path, "sweep=submitit_local", "optimizer.lr=1e-3,3e-3")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    sweep = tmp_path / "sweep"
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert [r["overrides"][-1] for r in rows] == ["optimizer.lr=0.001", "optimizer.lr=0.003"]
    assert list((sweep / ".submitit").iterdir()), "the jobs ran through submitit"
    for job in ("0", "1"):
        assert (sweep / job / "final" / "model.safetensors").is_file()


def test_optuna_sweep_of_three_trials_picks_the_best_by_the_objective(tmp_path, monkeypatch, capsys):
    # through the CLI's main in this process: Optuna's sweeper runs its trials in the sweep's own process, so a fresh
    # interpreter would only add its imports (measured: 13 s of CPU instead of 15)
    from qwenvl_ft.commands.cli import main

    monkeypatch.chdir(tmp_path)
    status = main(["train", "-m", *QUICK_SWEEP, "sweep=optuna", "hydra.sweeper.n_trials=3", "trainer.eval_steps=1",
                   "trainer.max_steps=3", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert status == 0, capsys.readouterr().err[-4000:]
    sweep = tmp_path / "sweep"
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    values = {r["output_dir"]: r["objective"]["value"] for r in rows}
    for row in rows:  # the objective is the run's last held-out loss
        history = json.loads((Path(row["output_dir"]) / "log_history.json").read_text())
        assert row["objective"]["value"] == [e["eval_loss"] for e in history if "eval_loss" in e][-1]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == pytest.approx(min(values.values()))
    best_dir = min(values, key=values.get)
    assert f"{Path(best_dir).name} (best)" in (sweep / "sweep_summary.txt").read_text()
