"""Mixture-of-experts families (families.Family.expert_parameters; docs/moe.md): LoRA on the fused experts, the
router's load-balancing loss in the trained loss, what the config refuses, and the estimate's expert terms
(qwenvl_ft/estimate/experts.py; the saved-tensor check of a whole decoder layer is in tests/test_estimate.py)."""

import pytest
import torch

from qwenvl_ft.config.compose import compose, validate
from qwenvl_ft.errors import ConfigError

from family_models import TEST_MODELS, family_of_option, lora_settings

MOE_MODELS = [option for option in TEST_MODELS if family_of_option(option).expert_parameters]
EVERY_PROJECTION = "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def _typed(*overrides):
    return validate(compose(["recipe=demo", *overrides], output_dir="/tmp/unused"))


def test_both_moe_families_have_test_models():
    assert {family_of_option(option).name for option in MOE_MODELS} == {"qwen3_vl_moe", "qwen3_5_moe"}


@pytest.mark.parametrize("option", MOE_MODELS)
def test_expert_lora_holds_expert_parameters_and_changes_expert_outputs(option):
    """The MLP names adapt every layer's fused experts (one rank-r LoRA per expert) and the shared expert's Linear
    layers where there is one; the router stays frozen and unadapted. A non-zero LoRA changes what the experts
    compute; disabled, the block computes the base model's output."""
    from peft.tuners.lora.layer import ParamWrapper

    from qwenvl_ft.modeling.build import build_model, model_parts

    family = family_of_option(option)
    typed = _typed(f"model={option}", "adapter=lora", EVERY_PROJECTION, *lora_settings(option))
    model = build_model(typed.model, typed.adapter)
    r = typed.adapter.r
    for layer in model_parts(model).decoder_layers:
        wrappers = [m for m in layer.mlp.modules() if isinstance(m, ParamWrapper)]
        assert sorted(w.parameter_name for w in wrappers) == ["down_proj", "gate_up_proj"]
        for wrapper in wrappers:
            experts = wrapper.get_param().shape[0]
            assert wrapper.num_experts == experts == typed.model.architecture.num_experts
            assert wrapper.lora_A["default"].weight.shape[0] == r * experts  # one rank-r pair per expert
            assert wrapper.lora_A["default"].weight.requires_grad
        assert not layer.mlp.gate.weight.requires_grad
        if hasattr(layer.mlp, "shared_expert"):
            for name in ("gate_proj", "up_proj", "down_proj"):
                assert hasattr(getattr(layer.mlp.shared_expert, name), "lora_A"), name
        assert not hasattr(getattr(layer.mlp, "shared_expert_gate", None), "lora_A")
    expert_lora = [n for n, p in model.named_parameters() if "mlp.experts" in n and "lora_" in n and p.requires_grad]
    layers = typed.model.architecture.num_hidden_layers
    assert len(expert_lora) == 2 * 2 * layers  # A and B of gate_up_proj and down_proj, every layer

    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "mlp.experts" in name and "lora_B" in name:
                parameter.normal_(std=0.5)  # PEFT starts B at zero: make the update visible
    block = model_parts(model).decoder_layers[0].mlp
    hidden = torch.randn(1, 16, typed.model.architecture.hidden_size)
    with torch.no_grad():
        adapted = block(hidden)
        with model.disable_adapter():
            base = block(hidden)
    assert (adapted - base).abs().max() > 1e-3
    assert family.adapted_experts(["gate_proj"]) == ["mlp.experts.gate_up_proj"]  # gate and up share one weight


@pytest.mark.slow
@pytest.mark.parametrize("option", MOE_MODELS)
def test_router_loss_is_in_the_trained_loss(option, tmp_path):
    """TRL's SFT loss with model.router_aux_loss_coef=c is the loss with 0 plus c x the router's load-balancing
    loss (transformers' load_balancing_loss_func over every layer's router logits)."""
    from qwenvl_ft.data.arrow import to_dataset
    from qwenvl_ft.data.collate import VisionChatCollator
    from qwenvl_ft.data.shapes import make_rows
    from qwenvl_ft.modeling.build import build_model, build_processor
    from qwenvl_ft.trainers.sft import build_trainer

    rows = make_rows(4, 56, seed=0, split="train")
    losses = {}
    for coef in (0.5, 0.0):
        typed = validate(compose(["recipe=demo", f"model={option}", "adapter=full", "trainer.report_to=[none]",
                                  f"model.router_aux_loss_coef={coef}"], output_dir=str(tmp_path / str(coef))))
        processor = build_processor(typed.model, typed.data)
        collator = VisionChatCollator(processor, typed.data)
        model = build_model(typed.model, typed.adapter)
        assert model.config.get_text_config().output_router_logits is (coef > 0)
        trainer = build_trainer(typed, model, processor, collator, to_dataset(rows), None)
        batch = trainer._prepare_inputs(collator(rows))
        with torch.no_grad():
            losses[coef] = trainer.compute_loss(model, dict(batch))
            if coef:
                aux = model(**batch, output_router_logits=True).aux_loss
    assert aux > 0
    torch.testing.assert_close(losses[0.5] - losses[0.0], 0.5 * aux, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("option", MOE_MODELS)
def test_what_expert_lora_cannot_do_is_a_config_error_naming_the_key(option):
    family = family_of_option(option)
    with pytest.raises(ConfigError, match=r"adapter.dropout=0.05: adapter.target_modules \['down_proj'\] adapt "
                                          rf"{family.title}'s fused experts \(mlp.experts.down_proj\).*no dropout"):
        _typed(f"model={option}", "adapter=lora", "adapter.target_modules=[q_proj,down_proj]")
    with pytest.raises(ConfigError, match=r"adapter=dora: .*mlp.experts.gate_up_proj.*no DoRA"):
        _typed(f"model={option}", "adapter=dora", "adapter.dropout=0", "adapter.target_modules=[gate_proj]")
    with pytest.raises(ConfigError, match=rf"adapter=qlora .*model.family={family.name}: bitsandbytes quantises "
                                          r"Linear layers only"):
        _typed(f"model={option}", "adapter=qlora")
    # the adapters' defaults (attention only, dropout 0.05) and DoRA off the experts stay valid
    assert _typed(f"model={option}", "adapter=lora").adapter.dropout == 0.05
    _typed(f"model={option}", "adapter=dora", "adapter.target_modules=[q_proj,v_proj]")
    # the language model frozen: the MLP names adapt nothing, so dropout is fine
    _typed(f"model={option}", "adapter=lora", "model.freeze_language_model=true", "adapter.vision_lora=true",
           "adapter.target_modules=[down_proj]")


def test_the_cli_says_it_on_one_screen(capsys, tmp_path, monkeypatch):
    from qwenvl_ft.commands.cli import main

    monkeypatch.chdir(tmp_path)  # the run folder Hydra makes stays out of the repository

    option = MOE_MODELS[0]
    assert main(["estimate", "recipe=demo", f"model={option}", "adapter=lora",
                 "adapter.target_modules=[q_proj,gate_proj]"]) == 2
    err = capsys.readouterr().err
    assert "adapter.dropout=0.05" in err and "Traceback" not in err


# Mixture-of-experts options against the released models: the total (Qwen3-VL-30B-A3B: the count of its released
# safetensors, exact; the others: the model cards' and names' rounded totals, within 1%) and the language model's
# parameters a token runs through (decoder layers with its k routed experts, and the LM head) against the name's
# "A..B" (within 12%: the names round, and the 122B-A10B's counts 9.0B this way).
@pytest.mark.parametrize("option, total, tolerance, active", [
    ("qwen3_vl_30b_a3b", 31_070_754_032, 0, 3e9),
    ("qwen3_vl_235b_a22b", 235e9, 0.01, 22e9),
    ("qwen3_5_35b_a3b", 35e9, 0.01, 3e9),  # Megatron-Bridge's Qwen3.5 page, transformers' qwen3_5_moe doc
    ("qwen3_5_122b_a10b", 122e9, 0.01, 10e9),  # Megatron-Bridge's Qwen3.5 page
])
def test_moe_parameter_totals_match_the_released_models(option, total, tolerance, active):
    from qwenvl_ft.estimate.counts import count_parameters

    counts = count_parameters(validate(compose([f"model={option}", "adapter=full"], output_dir="/tmp/unused")))
    assert abs(counts.total - total) <= tolerance * total
    parts = counts.by_part
    language_active = counts.active - parts["vision"] - parts["merger"] - parts["embeddings"]
    assert abs(language_active - active) <= 0.12 * active
    assert counts.experts > 0.9 * counts.total  # the routed experts are most of the weights


@pytest.mark.parametrize("option", MOE_MODELS)
def test_expert_counts_and_active_parameters(option):
    """The estimate's counts of a mixture-of-experts model against the built model: the fused experts' parameters,
    the expert LoRA (r x experts x (in + out) per fused weight), and the active parameters (all but the routed
    experts a token is not sent to)."""
    from qwenvl_ft.estimate.counts import count_parameters, meta_model

    typed = _typed(f"model={option}", "adapter=lora", EVERY_PROJECTION, *lora_settings(option))
    arch = typed.model.architecture
    counts = count_parameters(typed, meta_model(typed.model))
    h, inter, experts, k = arch.hidden_size, arch.moe_intermediate_size, arch.num_experts, arch.num_experts_per_tok
    per_layer = experts * 3 * h * inter
    assert counts.experts == arch.num_hidden_layers * per_layer
    assert counts.active == counts.total - counts.experts + counts.experts * k // experts
    r = typed.adapter.r
    assert counts.expert_lora == arch.num_hidden_layers * r * experts * ((2 * inter + h) + (h + inter))
    from qwenvl_ft.modeling.build import build_model

    built = build_model(typed.model, typed.adapter)
    lora = sum(p.numel() for n, p in built.named_parameters() if p.requires_grad and "lora_" in n)
    assert counts.lora == lora


@pytest.mark.slow
@pytest.mark.parametrize("option", MOE_MODELS)
def test_every_command_runs_on_the_moe_family(option, tmp_path, monkeypatch):
    """The commands a user types, in process, on the family's tiny model: data-check, estimate, SFT training with
    expert LoRA on packed rows, eval, infer and merge of that run, a DPO step, and the chat engine's answer with
    the adapter on and off (GRPO: tests/test_grpo.py::test_grpo_trains_on_every_family)."""
    from qwenvl_ft.chat.engine import BASE, TUNED, ChatEngine, conversation_row, user_turn
    from qwenvl_ft.commands.cli import main
    from qwenvl_ft.config.commands import GenerationSettings

    from data_helpers import write_image

    monkeypatch.chdir(tmp_path)
    common = ["recipe=demo", f"model={option}", "run_name=exp1", "data.shapes.num_train=16", "data.shapes.num_eval=4",
              "trainer.report_to=[none]", "trainer.disable_tqdm=true"]
    lora = ["adapter=lora", EVERY_PROJECTION, *lora_settings(option)]
    assert main(["data-check", *common]) == 0
    assert main(["estimate", *common, *lora]) == 0
    assert main(["train", *common, *lora, "trainer.max_steps=2", "data.packing=true", "data.max_tokens_per_batch=512",
                 "trainer.eval_generation=false"]) == 0
    run = tmp_path / "outputs" / "demo" / "exp1"
    adapter = (run / "final" / "adapter_config.json").read_text()
    assert "mlp.experts.gate_up_proj" in adapter and "mlp.experts.down_proj" in adapter  # target_parameters
    assert main(["eval", *common, *lora, "eval.num_examples=1", "trainer.max_new_tokens=4"]) == 0
    image = write_image(tmp_path / "red.png", size=(56, 56))
    assert main(["infer", *common, *lora, f"infer.images=[{image}]", "infer.prompt=What is it?",
                 "trainer.max_new_tokens=4"]) == 0
    assert main(["merge", *common, *lora]) == 0 and (run / "merged" / "config.json").exists()
    assert main(["train", "recipe=dpo_demo", f"model={option}", "run_name=dpo", "trainer.max_steps=1",
                 "data.shapes.num_train=8", "data.shapes.num_eval=2", "trainer.eval_generation=false",
                 "trainer.report_to=[none]", "trainer.disable_tqdm=true"]) == 0
    chat = validate(compose(["recipe=demo", f"model={option}", *lora, f"chat.model_path={run / 'final'}",
                             "chat.port=null", "chat.generation.max_new_tokens=4"], config_name="chat",
                            output_dir=str(tmp_path / "chat")))
    engine = ChatEngine.load(chat)
    turn = user_turn("What is in the image?", [str(image)])
    settings = GenerationSettings(max_new_tokens=4)
    assert isinstance(engine.answer(conversation_row([turn], TUNED), settings, TUNED), str)
    assert isinstance(engine.answer(conversation_row([turn], BASE), settings, BASE), str)


def _saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd saves for the backward of `run()`, parameters left out."""
    seen = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return seen


@pytest.mark.parametrize("option", MOE_MODELS)
@pytest.mark.parametrize("targets", ["q_proj", "q_proj,down_proj", "q_proj,gate_proj,down_proj"])
def test_moe_block_saved_tensors_match_the_expert_terms(option, targets):
    """One sparse MoE block (router, routed experts, and the shared expert where there is one) against
    estimate/experts.py, with the experts frozen and with LoRA on one or both fused weights: per token the routed
    terms (+ the shared expert as the dense formula's gated MLP, and its LoRA), per layer the folded expert stacks.
    Two token counts separate the two. Qwen3.5 MoE's whole decoder layer waits for the DeltaNet formula
    (tests/test_estimate.py), so its block is checked here."""
    from qwenvl_ft.estimate import experts
    from qwenvl_ft.families.base import lora_bytes
    from qwenvl_ft.modeling.build import build_model, model_parts

    family = family_of_option(option)
    typed = _typed(f"model={option}", "adapter=lora", f"adapter.target_modules=[{targets}]", "adapter.dropout=0")
    model = build_model(typed.model, typed.adapter).train()
    block = model_parts(model).decoder_layers[0].mlp
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    text, r = model.config.get_text_config(), typed.adapter.r
    adapted = family.adapted_experts(targets.split(","))
    shared = getattr(text, "shared_expert_intermediate_size", None) or 0
    measured = {}
    for tokens in (64, 128):
        hidden = torch.randn(1, tokens, text.hidden_size, requires_grad=True)
        saved = _saved_bytes(lambda: block(hidden))
        measured[tokens] = sum(b for ptr, b in saved.items() if ptr not in params)
    per_token = (measured[128] - measured[64]) / 64
    per_layer = measured[64] - 64 * per_token
    expected = experts.routed_bytes(text, family, 4, False, adapted) + 3 * 4 * shared
    if shared:  # the shared expert's Linear layers carry the names too
        expected += sum(lora_bytes(width, r, 4, 0) for name, width in (("gate_proj", text.hidden_size),
                                                                         ("down_proj", shared))
                        if name in targets.split(","))
    assert per_token == expected
    assert per_layer == experts.folded_weight_bytes(text, family, 4, adapted)
