"""Typed schema of every config: the root configs and their registration.

One dataclass per group, each in its own file with its own checks: `model` (config/model.py), `data`
(config/data.py), `adapter` and `optimizer` (config/adapter.py), `trainer` (config/trainer.py), `dist`
(config/dist.py), `hub` (config/hub.py), and the groups of eval, infer, merge and chat (config/commands.py). Here:
the root `TrainConfig` with the checks across groups, the roots of the other commands, and their registration.
They are registered in Hydra's ConfigStore as `*_schema` and the primary configs list them first in their
defaults, so every YAML option and every command-line override is merged into a typed node: a key that does not
exist or a value of the wrong type fails at compose time. Choice fields are `str` Enums, so a wrong value fails
with the list of valid choices. Range checks that types cannot express live in `__post_init__` and run in
`validate()` (OmegaConf.to_object instantiates the dataclasses).

These modules import only the standard library, hydra (when registering) and the torch-free registries they list
choices from (`qwenvl_ft.families` for model.family, `qwenvl_ft.methods`): `--cfg job` must not pay for torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from qwenvl_ft import families, methods
from qwenvl_ft.config.adapter import AdapterConfig, AdapterMethod, OptimizerConfig
from qwenvl_ft.config.commands import ChatConfig, EvalConfig, InferConfig, MergeConfig
from qwenvl_ft.config.data import DataConfig
from qwenvl_ft.config.dist import DistConfig, DistEngine, OffloadDevice
from qwenvl_ft.config.hub import HubConfig
from qwenvl_ft.config.model import ModelConfig
from qwenvl_ft.config.trainer import TrainerConfig
from qwenvl_ft.errors import ConfigError, check as _check


@dataclass
class TrainConfig:
    """The whole run. `output_dir` defaults to Hydra's run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output_dir: str = "outputs/run"  # where the run writes (the primary configs: outputs/<recipe>/<run_name>)
    seed: int = 42  # seed of initialisation, dropout and data order
    run_name: str = "run"  # names the output folder outputs/<recipe>/<run_name> (the primary configs: a timestamp)
    # What a Hydra sweeper optimises (sweep=optuna): the job returns this metric, a metrics.json key or the last
    # logged value of a log_history.json key (eval_loss, eval_exact_match_after, train_loss, ...).
    objective: Optional[str] = None
    hub: HubConfig = field(default_factory=HubConfig)  # upload final/ (train) or merged/ (merge) to the Hub

    def __post_init__(self) -> None:
        _check(not (self.adapter.method == AdapterMethod.qlora and not self.adapter.load_in_4bit),
               "adapter.method=qlora needs adapter.load_in_4bit=true")
        m = self.model
        if self.adapter.is_peft:
            trains_something = (not m.freeze_language_model and bool(self.adapter.target_modules)) \
                or self.adapter.vision_lora or not m.freeze_merger
        else:
            trains_something = not (m.freeze_language_model and m.freeze_merger and m.freeze_vision_tower)
        _check(trains_something, "model.freeze_* and the adapter settings leave nothing to train")
        # Each data format belongs to the method that reads it; the method checks the rest of its settings.
        method, owner = methods.get(self.trainer.kind), self.data.format.method
        _check(owner is method, f"trainer={method.name} needs {method.row_kind}, but data.format="
                                f"{self.data.format.value} holds {owner.row_kind}: train it with trainer={owner.name}, "
                                f"or use data={', data='.join(method.data_formats)}")
        _check(self.trainer.effective_batch_size is None
               or not (self.data.packing or self.data.max_tokens_per_batch is not None),
               "trainer.effective_batch_size counts rows of padded batches; with data.packing or "
               "data.max_tokens_per_batch a step holds a varying number of rows: set trainer.gradient_accumulation_steps")
        method.check_config(self)
        self._check_dist(method)
        self._check_experts()

    def _check_dist(self, method) -> None:
        """What the distributed engines cannot do with the rest of the config."""
        dist = self.dist
        _check(method.distributed or dist.engine == DistEngine.none,
               f"trainer={method.name} runs in one process only: use dist=single")
        if self.adapter.load_in_4bit and dist.is_sharded:
            engine = "dist=fsdp" if dist.engine == DistEngine.fsdp else "dist.zero.stage=3"
            raise ConfigError(f"adapter=qlora cannot be combined with {engine}: bitsandbytes' packed 4-bit weights "
                              f"are not split over processes here. QLoRA fits one GPU; use dist=ddp (a 4-bit copy "
                              f"per GPU) or dist=zero2 to train it on several")
        _check(dist.zero.offload_optimizer == OffloadDevice.none or dist.zero.stage >= 1,
               "dist.zero.offload_optimizer needs dist.zero.stage >= 1 (stage 0 keeps no optimizer partition)")
        # DeepSpeed applies the optimizer step inside its backward: there is no step left to skip afterwards
        _check(self.trainer.on_nonfinite.value != "skip_step" or dist.engine != DistEngine.deepspeed,
               "trainer.on_nonfinite=skip_step cannot be combined with DeepSpeed (it steps the optimizer inside its "
               "backward): use trainer.on_nonfinite=stop or ignore")

    def _check_experts(self) -> None:
        """What a mixture-of-experts family's fused expert weights (3-D parameters, not Linear layers) rule out."""
        family = families.get(self.model.family.value)
        if not family.expert_parameters:
            return
        _check(not self.adapter.load_in_4bit,
               f"adapter=qlora (adapter.load_in_4bit) with model.family={family.name}: bitsandbytes quantises Linear "
               f"layers only, so {family.title}'s fused experts ({', '.join(family.expert_parameters)}: most of its "
               f"weights) would stay 16-bit (fp32 with adapter.qlora_fp32_upcast). Use adapter=lora (dist=zero3 "
               f"shards the experts over GPUs); docs/moe.md")
        adapter = self.adapter
        if not adapter.is_peft or self.model.freeze_language_model:
            return
        experts = family.adapted_experts(adapter.target_modules)
        if not experts:
            return
        named = [name for name, _ in family.expert_lora_targets if name in adapter.target_modules]
        what = (f"adapter.target_modules {named} adapt {family.title}'s fused experts ({', '.join(experts)}) "
                f"through PEFT's target_parameters")
        _check(adapter.dropout == 0, f"adapter.dropout={adapter.dropout}: {what}, which has no dropout; set "
                                     f"adapter.dropout=0, or leave {'/'.join(named)} out of adapter.target_modules")
        _check(adapter.method != AdapterMethod.dora, f"adapter=dora: {what}, which has no DoRA; use adapter=lora, or "
                                                     f"leave {'/'.join(named)} out of adapter.target_modules")


# eval / infer / merge / chat: the train groups (so that a recipe means the same model, data and adapter) plus
# one group for the command (config/commands.py)


@dataclass
class EvalRunConfig(TrainConfig):
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class InferRunConfig(TrainConfig):
    infer: InferConfig = field(default_factory=InferConfig)


@dataclass
class MergeRunConfig(TrainConfig):
    merge: MergeConfig = field(default_factory=MergeConfig)


@dataclass
class ChatRunConfig(TrainConfig):
    chat: ChatConfig = field(default_factory=ChatConfig)


# primary config name (conf/<name>.yaml) -> root schema, registered as `<name>_schema`
ROOT_SCHEMAS = {
    "train": TrainConfig,
    "eval": EvalRunConfig,
    "infer": InferRunConfig,
    "merge": MergeRunConfig,
    "chat": ChatRunConfig,
}


def root_schema(config_name: str):
    return ROOT_SCHEMAS.get(config_name, TrainConfig)


GROUP_SCHEMAS = {
    "model": ModelConfig,
    "data": DataConfig,
    "adapter": AdapterConfig,
    "optimizer": OptimizerConfig,
    "trainer": TrainerConfig,
    "dist": DistConfig,
}


def register_schemas(config_name: Optional[str] = None) -> None:
    """Register the root schemas so that each primary config can list its own first in its defaults: only
    `config_name`'s when given (a command composes one primary config; each schema costs ~50 ms of start-up)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in ROOT_SCHEMAS.items():
        if config_name is None or name == config_name:
            store.store(name=f"{name}_schema", node=schema)
