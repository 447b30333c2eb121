"""Tier 1 of the distributed engines (qwenvl_ft/distributed/): the dist options and their rules, the generated
DeepSpeed config checked by DeepSpeed itself, FSDP2 arguments, the launch plan and command, rank agreement under an
srun launch, the vision tower kept in step, the per-GPU estimate and the sweep presets. The multi-process runs are
in tests/test_distributed_runs.py."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from qwenvl_ft.config.compose import compose, config_dir, validate
from qwenvl_ft.config.dist import DistEngine
from qwenvl_ft.errors import ConfigError
from qwenvl_ft.families import all_families

DIST_OPTIONS = sorted(p.stem for p in (config_dir() / "dist").glob("*.yaml"))
ZERO_OPTIONS = ["zero2", "zero3", "zero3_offload"]


def _typed(*overrides):
    return validate(compose(list(overrides), output_dir="/tmp/unused"))


def test_dist_options_compose_and_their_rules_hold():
    assert DIST_OPTIONS == ["ddp", "fsdp", "single", "zero2", "zero3", "zero3_offload"]
    engines = {option: _typed("recipe=demo", f"dist={option}").dist for option in DIST_OPTIONS}
    assert engines["single"].engine == DistEngine.none and not engines["single"].is_sharded
    assert engines["zero3_offload"].zero.offload_param.value == "cpu" and engines["zero3"].is_sharded
    assert engines["fsdp"].is_sharded and not engines["zero2"].is_sharded
    assert _typed("recipe=demo").dist.engine == DistEngine.none  # the default
    refused = {
        ("adapter=qlora", "dist=zero3"): "cannot be combined with dist.zero.stage=3",
        ("adapter=qlora", "dist=fsdp"): "cannot be combined with dist=fsdp",
        ("dist.num_processes=2",): "dist=single runs one process",
        ("dist=ddp", "dist.num_machines=2", "dist.machine_rank=2"): "machine_rank must be in 0..1",
        ("dist=zero2", "dist.zero.offload_param=cpu"): "needs dist.zero.stage=3",
        ("dist=zero2", "dist.zero.stage=5"): "must be 0, 1, 2 or 3",
        # the silent drop: an added TrainingArguments key names the dist group instead
        ("+trainer.deepspeed=zero3.json",): "unknown config key 'trainer.deepspeed'. .* the dist group's",
    }
    for overrides, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            _typed("recipe=demo", *overrides)
    _typed("recipe=demo", "adapter=qlora", "dist=zero2")  # QLoRA on ZeRO-2 or DDP is fine


@pytest.mark.parametrize("option", ZERO_OPTIONS)
def test_every_generated_deepspeed_config_passes_deepspeeds_validation(option):
    from qwenvl_ft.distributed.zero import check_deepspeed_config, deepspeed_config

    cases = [["recipe=demo"], ["recipe=full_7b_llava", "data.path=/d.json"],
             ["recipe=demo", "optimizer.vision_lr=1e-5", "trainer.precision=bf16", "model.dtype=bfloat16"]]
    if option == "zero2":
        cases.append(["recipe=qlora_7b_amazon"])
    for overrides in cases:
        typed = _typed(*overrides, f"dist={option}")
        generated = deepspeed_config(typed)
        assert generated["zero_optimization"]["stage"] == typed.dist.zero.stage
        for world in (1, 8):
            hidden = typed.model.architecture.hidden_size
            resolved = check_deepspeed_config(typed, world, hidden)  # DeepSpeed's own DeepSpeedConfig accepts it
            t = typed.trainer
            assert resolved["train_batch_size"] == t.batch_size * t.gradient_accumulation_steps * world
            assert "auto" not in json.dumps(resolved), resolved
            assert resolved["zero_optimization"]["reduce_bucket_size"] == hidden * hidden
            assert resolved["bf16"]["enabled"] == (t.precision.value == "bf16")
        offload = option == "zero3_offload"
        per_module_lr = typed.optimizer.vision_lr is not None
        assert ("optimizer" in generated) == (offload and not per_module_lr)  # DeepSpeed's CPU Adam when offloaded
        assert generated.get("zero_force_ds_cpu_optimizer", True) == (not (offload and per_module_lr))
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled(), "the check must not leave a ZeRO-3 config registered in this process"


def test_the_deepspeed_check_reads_the_values_the_trainer_gets():
    """`zero.trainer_values` mirrors what training/arguments.py gives the TrainingArguments, for every value
    transformers' DeepSpeed integration reads."""
    from transformers import TrainingArguments

    from qwenvl_ft.distributed.zero import trainer_values
    from qwenvl_ft.training.arguments import training_arguments

    typed = _typed("recipe=qlora_7b_amazon", "trainer.precision=fp32", "optimizer.warmup_ratio=0.1")
    args = TrainingArguments(**training_arguments(typed))
    mirror = trainer_values(typed, world_size=args.world_size)
    for name, value in vars(mirror).items():
        if name != "get_warmup_steps":
            assert getattr(args, name) == value, name
    assert mirror.get_warmup_steps(250) == args.get_warmup_steps(250)


def test_fsdp_arguments_wrap_decoder_layers_and_vision_blocks():
    from transformers import TrainingArguments

    from qwenvl_ft.distributed.fsdp import fsdp_arguments, wrap_classes
    from qwenvl_ft.modeling.build import build_model

    from qwenvl_ft import families

    for family in families.all_families():  # each family's tiny model: its declared units are its layers
        typed = _typed("recipe=demo", f"model={family.test_model}", "dist=fsdp", "model.gradient_checkpointing=true")
        args = TrainingArguments(output_dir="/tmp/unused", report_to=[], **fsdp_arguments(typed))
        plugin = args.fsdp_plugin_args
        assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True
        assert plugin["activation_checkpointing"] and not args.gradient_checkpointing  # FSDP's wrapper instead
        assert plugin["state_dict_type"] == "SHARDED_STATE_DICT"
        classes = wrap_classes(typed)
        assert plugin["transformer_cls_names_to_wrap"] == ",".join(classes)
        parts = family.parts(build_model(typed.model, typed.adapter))
        assert [type(parts.decoder_layers[0]).__name__, type(parts.vision_blocks[0]).__name__] == classes
    own = _typed("recipe=demo", "dist=fsdp", "dist.fsdp.wrap_classes=[Qwen2VLDecoderLayer]")
    assert wrap_classes(own) == ["Qwen2VLDecoderLayer"]
    no_checkpointing = fsdp_arguments(_typed("recipe=demo", "dist=fsdp", "model.gradient_checkpointing=false"))
    assert not no_checkpointing["fsdp_config"]["activation_checkpointing"]


def test_launch_plan_and_the_torchrun_command(monkeypatch):
    from torch.distributed.run import parse_args

    from qwenvl_ft.distributed import launch

    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    assert launch.plan(_typed("recipe=demo")) is None
    assert launch.plan(_typed("recipe=demo", "dist=ddp")) is None  # no GPU, no count: one process (with a warning)
    assert launch.plan(_typed("recipe=demo", "dist=zero3")).world_size == 1  # DeepSpeed needs its launch env
    typed = _typed("recipe=demo", "dist=ddp", "dist.num_processes=2", "run_name=exp1")
    plan = launch.plan(typed)
    assert (plan.processes, plan.machines, plan.world_size) == (2, 1, 2)
    with pytest.raises(ConfigError, match="dist=fsdp needs GPUs"):
        launch.plan(_typed("recipe=demo", "dist=fsdp", "dist.num_processes=2"))

    command = launch.worker_command("train", ["recipe=demo", "dist=ddp", "dist.num_processes=2", "run_name=exp1"],
                                    typed, plan)
    assert command[:2] == ["qwenvl_ft", "train"] and command.count("run_name=exp1") == 1
    assert f"hydra.run.dir={typed.output_dir}" in command and "dist.world_size=2" in command
    args = parse_args(launch.torchrun_arguments(typed, plan, command))
    assert (args.nproc_per_node, args.standalone, args.module) == ("2", True, True)
    assert [args.training_script] + args.training_script_args == command

    monkeypatch.setattr(launch, "visible_gpus", lambda: 4)
    assert launch.plan(_typed("recipe=demo", "dist=ddp")).processes == 4  # default: every visible GPU
    single = launch.plan(_typed("recipe=demo"))  # never DataParallel over 4 GPUs: one launched process
    assert single.processes == 1 and single.world_size == 1
    two = _typed("recipe=demo", "dist=zero3", "dist.num_machines=2", "dist.machine_rank=1",
                 "dist.main_process_ip=10.0.0.1", "dist.main_process_port=29999")
    plan = launch.plan(two)
    assert (plan.world_size, plan.machine_rank, plan.main_address) == (8, 1, "10.0.0.1")
    args = parse_args(launch.torchrun_arguments(two, plan, ["qwenvl_ft", "train"]))
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == ("2", 1, "10.0.0.1", 29999)
    with pytest.raises(ConfigError, match="fixed name"):
        launch.check_before_launch(two, plan, ["dist=zero3"], is_sweep=False)
    with pytest.raises(ConfigError, match="main_process_ip"):
        launch.plan(_typed("recipe=demo", "dist=ddp", "dist.num_machines=2"))
    # srun with one task per node (an sbatch script): each task is a machine running this launcher, its rank and
    # the main node taken from the job
    for name, value in dict(SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="2", SLURM_PROCID="1",
                            SLURM_NODEID="1", MASTER_ADDR="10.0.0.9").items():
        monkeypatch.setenv(name, value)
    assert not launch.export_slurm_env() and not launch.is_worker()
    plan = launch.plan(_typed("recipe=demo", "dist=ddp", "dist.num_machines=2"))
    assert (plan.machine_rank, plan.main_address, plan.world_size) == (1, "10.0.0.9", 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_srun_tasks_agree_on_one_run_name_and_launch_id(tmp_path):
    """`srun python -m qwenvl_ft train ...` with two tasks: SLURM's variables become torch's, and the task that
    starts later takes rank 0's run name (its own clock would name another folder) and launch id."""
    code = ("import json, os, sys, time; from qwenvl_ft.distributed.launch import prepare_worker; "
            "time.sleep(1.5 * int(os.environ['SLURM_PROCID'])); args = prepare_worker(['recipe=demo']); "
            "print(json.dumps({'args': args, 'env': {k: os.environ.get(k) for k in "
            "('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'QWENVL_FT_LAUNCH_ID')}}))")
    port = _free_port()
    procs = []
    for task in range(2):
        env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_PROCID=str(task),
                   SLURM_LOCALID=str(task), SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1", SLURM_NNODES="1",
                   SLURM_NTASKS_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "QWENVL_FT_LAUNCH_ID", "TORCHELASTIC_RUN_ID"):
            env.pop(name, None)
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    names = [next(a for a in o["args"] if a.startswith("run_name=")) for o in outputs]
    assert names[0] == names[1]
    assert [o["env"]["RANK"] for o in outputs] == ["0", "1"] and outputs[1]["env"]["WORLD_SIZE"] == "2"
    assert outputs[1]["env"]["LOCAL_RANK"] == "1" and outputs[1]["env"]["LOCAL_WORLD_SIZE"] == "2"
    assert outputs[0]["env"]["QWENVL_FT_LAUNCH_ID"] == outputs[1]["env"]["QWENVL_FT_LAUNCH_ID"] == "4242"


@pytest.mark.parametrize("statuses", [{0: 2, 1: 2}, {0: -15, 1: 2}, {0: 2, 1: -15}, {0: 2, 1: -9}])
def test_a_data_error_stops_the_launch_whichever_rank_exits_first(tmp_path, statuses):
    """torchrun stops the remaining workers once one has exited: a rank stopped on its way out of the same data
    error must not turn the launch's one message into a failure with a traceback."""
    from qwenvl_ft.distributed.launch import WorkersStopped, _failed

    cfg = validate(compose(["recipe=demo", "dist=ddp"], output_dir=str(tmp_path)))
    with pytest.raises(WorkersStopped, match="the launched processes stopped"):
        _failed(cfg, statuses)


@pytest.mark.parametrize("statuses", [{0: 1, 1: -15}, {0: -15, 1: -15}, {0: 2, 1: 1}])
def test_a_launch_with_a_failed_rank_is_a_failure(tmp_path, statuses):
    from qwenvl_ft.distributed.launch import WorkersFailed, _failed

    cfg = validate(compose(["recipe=demo", "dist=ddp"], output_dir=str(tmp_path)))
    with pytest.raises(WorkersFailed, match="the launched processes failed"):
        _failed(cfg, statuses)


def test_a_single_process_is_left_alone(monkeypatch):
    from qwenvl_ft.distributed import launch, ranks

    for name in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "QWENVL_FT_LAUNCH_ID"):
        monkeypatch.delenv(name, raising=False)
    assert launch.prepare_worker(["recipe=demo"]) == ["recipe=demo"]
    assert not launch.is_worker() and ranks.is_main_process() and ranks.world_size() == 1
    assert ranks.run_on_main(lambda x: x + 1, 1) == 2 and ranks.any_rank(True) and not ranks.any_rank(False)
    ranks.barrier()  # nothing to wait for


@pytest.mark.parametrize("model_option", [family.test_model for family in all_families()])
def test_the_vision_pass_of_a_text_only_batch_changes_no_loss_and_no_gradient(model_option):
    """The dummy image's contribution is zero: same loss, same gradients; the vision tower and merger get exact
    zeros instead of no gradient (what DDP needs, and the collectives FSDP/ZeRO-3 run)."""
    from qwenvl_ft.distributed.modality import keep_vision_in_step
    from qwenvl_ft.modeling.build import build_model

    typed = _typed("recipe=demo", f"model={model_option}", "adapter=full")
    model = build_model(typed.model, typed.adapter)
    model.train()
    ids = torch.randint(10, 500, (2, 12), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    loss, grads = step()
    handle = keep_vision_in_step(model, always=False)
    kept_loss, kept_grads = step()
    handle.remove()
    assert torch.equal(loss, kept_loss)
    vision = [n for n in grads if ".visual." in n]
    assert vision and all(grads[n] is None for n in vision)
    assert all(kept_grads[n] is not None and not kept_grads[n].any() for n in vision)
    assert all(torch.equal(grads[n], kept_grads[n]) for n in grads if n not in vision)
    model.eval()
    with torch.no_grad():  # without `always`, evaluation forwards are left alone
        handle = keep_vision_in_step(model, always=False)
        calls = []
        hook = model.model.visual.register_forward_hook(lambda *a: calls.append(1))
        model(input_ids=ids)
        assert not calls
        hook.remove()
        handle.remove()


def test_per_gpu_memory_by_dist_option():
    from dataclasses import replace

    from qwenvl_ft.distributed.memory import SingleProcess, per_gpu, table

    # 1B trained parameters in bf16, full fine-tuning, 2 GiB of activations
    gib = 1024 ** 3
    s = SingleProcess(frozen_weights=0, trained_weights=2 * 10 ** 9, gradients=2 * 10 ** 9, optimizer=4 * 10 ** 9,
                      reference=0, activations=2 * gib, trained_params=10 ** 9, base_params=10 ** 9,
                      adapter_params=0, quantized_params=0, quantized_bytes=0, unit_params=10 ** 7, dtype_bytes=2,
                      mixed_precision=True)
    unit = 2 * 10 ** 7 * 2
    assert per_gpu("ddp", 1, s).gpu == 8 * 10 ** 9 + 2 * gib
    assert per_gpu("ddp", 4, s).gpu == 10 * 10 ** 9 + 2 * gib  # + DDP's gradient buckets
    assert per_gpu("zero2", 4, s).gpu == 2 * 10 ** 9 + (2 + 12) * 10 ** 9 // 4 + 2 * gib
    assert per_gpu("zero3", 4, s).gpu == 16 * 10 ** 9 // 4 + unit + 2 * gib
    offload = per_gpu("zero3_offload", 4, s)
    assert offload.gpu == 2 * 10 ** 9 // 4 + unit + 2 * gib and offload.cpu == (12 + 2) * 10 ** 9 // 4
    assert per_gpu("fsdp", 8, s).gpu == 16 * 10 ** 9 // 8 + unit + 2 * gib
    _, quantized, _ = table(replace(s, quantized_params=10 ** 8, quantized_bytes=10 ** 8 // 2), (1,), None)
    assert set(quantized) == {"ddp", "zero2"}  # 4-bit weights: no ZeRO-3, no FSDP
    text, by_option, fits = table(s, (1, 2, 8), gpu_gib=8.0)
    assert by_option["zero3"][8] < by_option["zero3"][2] < by_option["zero3"][1]
    # 90% of 8 GiB is 7.7e9 bytes: ZeRO-2/3 and FSDP need 8 GPUs, ZeRO-3 with offloading fits one
    assert fits == ["fits 8 GiB GPUs (at most 90% used), by number of GPUs: zero2 on 8; zero3 on 8; "
                    "zero3_offload on 1, 2, 8; fsdp on 8"]


def test_estimate_prints_the_sharding_section(capsys):
    from qwenvl_ft.commands.estimate import estimate

    metrics = estimate(compose(["recipe=full_7b_llava", "data.path=/d.json", "dist.gpu_memory_gib=80"],
                               output_dir="/tmp/unused"))
    out = capsys.readouterr().out
    assert "per GPU by dist option and world size" in out and "fits 80 GiB GPUs" in out
    by_option = metrics["per_gpu_gib_by_dist"]
    assert by_option["ddp"][1] == metrics["predicted_peak_gib"]
    # The recipe's claim: ZeRO-3 over 8 GPUs fits 80 GB GPUs with room to spare; one GPU does not hold it
    assert by_option["zero3"][8] < 0.9 * 80 < by_option["zero3"][1]


def _cli(capsys, *args):
    """`qwenvl-ft ARGS --cfg ...` through the CLI's main in this process (it prints a config: a fresh interpreter
    proves nothing more); (exit status, stdout, stderr)."""
    from qwenvl_ft.commands.cli import main

    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_full_7b_recipe_shows_zero3_and_its_generated_deepspeed_config(capsys):
    status, out, err = _cli(capsys, "train", "recipe=full_7b_llava", "--cfg", "job")
    assert status == 0, err[-2000:]
    assert "engine: deepspeed" in out and "stage: 3" in out
    generated = out.split("# DeepSpeed config generated", 1)[1]
    assert '"stage": 3' in generated and '"stage3_gather_16bit_weights_on_model_save": true' in generated
    ddp = _typed("recipe=lora_7b_llava_ddp", "data.path=/d.json")
    assert ddp.dist.engine == DistEngine.ddp and ddp.adapter.is_peft


def test_the_default_run_name_is_the_one_ranks_agree_on():
    from omegaconf import OmegaConf

    from qwenvl_ft.distributed.launch import RUN_NAME_FORMAT

    raw = OmegaConf.to_container(OmegaConf.load(config_dir() / "train.yaml"), resolve=False)
    assert raw["run_name"] == "${now:" + RUN_NAME_FORMAT + "}"


def test_sweep_presets_compose_with_their_launchers_wired_to_dist(capsys):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from qwenvl_ft.config.compose import register_all

    register_all()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        slurm = hydra_compose("train", ["sweep=slurm", "recipe=full_7b_llava", "dist.num_processes=8",
                                        "dist.num_machines=2"], return_hydra_config=True)
        local = hydra_compose("train", ["sweep=submitit_local", "recipe=demo"], return_hydra_config=True)
        optuna = hydra_compose("train", ["sweep=optuna", "recipe=demo"], return_hydra_config=True)
    launcher = OmegaConf.to_container(slurm.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (2, 8, 1)
    assert local.hydra.launcher._target_.endswith("LocalLauncher")
    assert optuna.hydra.sweeper._target_.endswith("OptunaSweeper") and optuna.objective == "eval_loss"
    status, out, err = _cli(capsys, "train", "sweep=slurm", "recipe=demo", "dist=ddp", "dist.num_processes=4",
                            "--cfg", "hydra")
    assert status == 0 and "submitit_slurm" in out, err[-2000:]


def test_objective_values_and_the_best_job(tmp_path):
    from omegaconf import OmegaConf

    from qwenvl_ft.commands.runtime import objective_value
    from qwenvl_ft.commands.sweep import best_job, format_table

    (tmp_path / "log_history.json").write_text(json.dumps([{"eval_loss": 3.0}, {"loss": 1.0}, {"eval_loss": 2.5}]))
    cfg = OmegaConf.create({"objective": "eval_loss", "output_dir": str(tmp_path)})
    assert objective_value(cfg, {"train_loss": 1.0}) == 2.5  # the last logged value
    assert objective_value(OmegaConf.create({"objective": "train_loss", "output_dir": str(tmp_path)}),
                           {"train_loss": 1.0}) == 1.0
    assert str(objective_value(OmegaConf.create({"objective": "nope", "output_dir": str(tmp_path)}), {})) == "nan"
    assert objective_value(OmegaConf.create({"objective": None}), {}) is None
    rows = [{"output_dir": f"/s/{i}", "status": "completed", "overrides": [f"optimizer.lr={lr}"], "metrics": {},
             "objective": {"name": "eval_loss", "value": value}} for i, (lr, value) in enumerate([(1, 2.0), (2, 1.5)])]
    assert best_job(rows)["output_dir"] == "/s/1"
    assert best_job(rows, "maximize")["output_dir"] == "/s/0"
    assert "1 (best)" in format_table(rows)


def test_qlora_loads_each_process_model_onto_its_own_gpu(monkeypatch):
    """bitsandbytes quantises while loading onto a device: under a launcher every process names its own GPU (its
    LOCAL_RANK), never the first one; one process, or a model that is not 4-bit, leaves placement to the engine."""
    import torch

    from qwenvl_ft.distributed.placement import device_map

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    qlora, lora = _typed("recipe=demo", "adapter=qlora", "dist=ddp"), _typed("recipe=demo", "adapter=lora", "dist=ddp")
    for name, value in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1").items():
        monkeypatch.setenv(name, value)
    assert device_map(qlora) == {"": 1} and device_map(lora) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert device_map(qlora) is None


@pytest.mark.parametrize("family", [f for f in all_families() if f.moe_block_class], ids=lambda f: f.name)
def test_zero3_keeps_every_moe_block_whole(family):
    """Under ZeRO-3 a mixture-of-experts family's sparse MoE blocks are DeepSpeed leaf modules (one per decoder
    layer, from the family declaration); under other engines nothing is marked. FSDP2's wrap units are the decoder
    layers, which hold the MoE blocks whole."""
    from deepspeed.utils import get_z3_leaf_modules

    from qwenvl_ft.distributed.fsdp import wrap_classes
    from qwenvl_ft.distributed.placement import keep_moe_blocks_whole
    from qwenvl_ft.estimate.counts import meta_model

    for dist, marked in (("zero2", 0), ("fsdp", 0), ("zero3", None)):
        typed = _typed("recipe=demo", f"model={family.test_model}", f"dist={dist}")
        model = meta_model(typed.model)
        layers = typed.model.architecture.num_hidden_layers
        assert keep_moe_blocks_whole(model, typed) == (layers if marked is None else marked)
        leaves = get_z3_leaf_modules(model)
        assert len(leaves) == (layers if marked is None else 0)
        assert all(isinstance(m, family.load_moe_block_class()) for m in leaves)
    assert wrap_classes(typed) == [family.decoder_layer_class, family.vision_block_class]
