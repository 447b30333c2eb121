"""Qwen3.5, dense (Qwen/Qwen3.5-0.8B/2B/4B/9B/27B): Qwen3-VL's vision tower without DeepStack (LayerNorm blocks,
tanh-GELU MLP, learned positions, 16-pixel patches merged 2 x 2; timestamped video frames) in front of a hybrid
language model: three of every four decoder layers are Gated DeltaNet (linear attention: a causal depthwise conv
over the fused q/k/v projection, then the gated delta rule, a recurrent state per head), the fourth is gated softmax
attention (RMSNorm on each head of q and k, q_proj also produces a sigmoid gate on the output, rotary positions on a
quarter of each head, interleaved M-RoPE). Its own tokenizer (Qwen3_5Tokenizer, a 248k vocabulary with `<think>`
and `</think>`) and a chat template that thinks by default (CHAT_TEMPLATE below).

What that means here:
  - LoRA may target both layer kinds: q/k/v/o_proj of the attention layers, in_proj_qkv (q, k and v of the delta
    rule, one fused Linear), in_proj_z (the output gate) and out_proj of the DeltaNet layers, and the MLP of every
    layer. in_proj_a and in_proj_b (hidden -> one scalar per value head: the decay and the write strength) may be
    named too, but are left out of the recipes: a rank-r update of a 32-wide output adapts little.
  - Out of 4-bit besides lm_head: in_proj_a and in_proj_b, as Qwen's own quantised releases keep them (the decay
    is exponentiated, so its error compounds over the sequence); conv1d is a Conv1d, which bitsandbytes never
    quantises.
  - Packed rows: a DeltaNet layer carries its state from one token to the next, so samples packed into one row
    would see each other through it (and through its conv) where attention masks keep them apart. The torch
    path of transformers ignores sample boundaries; modeling/linear_attention.py runs these layers per sample
    (`linear_attention_class`).
"""

from __future__ import annotations

from typing import Any, List

from qwenvl_ft.families.base import LANGUAGE_PROJECTIONS, Family, text_config, vision_token_ids
from qwenvl_ft.families._gated_deltanet import hybrid_layer_bytes
# Qwen3-VL's vision tower and processor: the same functions serve both
from qwenvl_ft.families.qwen3_vl import BOX_CONVENTION, positions, random_processor, video_tokens, \
    vision_block_bytes, vision_sizes

# Qwen3.5's chat template, verbatim: the `chat_template` of Qwen/Qwen3.5-27B's tokenizer_config.json (7,756 bytes;
# the same file ships with Qwen3.5-35B-A3B, and the 4B and 9B think by default as it does). It thinks by default: a
# generation prompt ends with `<think>\n`, or with an empty `<think>\n\n</think>\n\n` when `enable_thinking=False`;
# an assistant turn after the last user query is rendered `<think>\n{reasoning}\n</think>\n\n{answer}` (the reasoning
# from `reasoning_content`, or split off the content at `</think>`), earlier assistant turns without their reasoning.
# The smaller checkpoints (0.8B, 2B) ship a variant whose generation prompt closes the think block unless
# `enable_thinking=True`; a real checkpoint brings its own template, this one is the tiny test model's.
CHAT_TEMPLATE = r'''{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\n' }}
    {{- "# Tools\n\nYou have access to the following functions:\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>" }}
    {{- '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>' }}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {%- if content %}
            {{- '\n\n' + content }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first %}
                    {%- if content|trim %}
                        {{- '\n\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- else %}
                        {{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- endif %}
                {%- else %}
                    {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- endif %}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments|items %}
                        {{- '<parameter=' + args_name + '>\n' }}
                        {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
                        {{- args_value }}
                        {{- '\n</parameter>\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}'''

# The DeltaNet layers' Linears (Qwen3_5GatedDeltaNet); o_proj is the attention layers' output, out_proj theirs.
LINEAR_ATTENTION_PROJECTIONS = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
# Tokens Qwen3.5's tokenizer adds after Qwen's special tokens (plain added tokens: decoding keeps them).
ADDED_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>")


def random_config(arch: Any, tokenizer):
    from transformers import Qwen3_5Config

    # transformers' Qwen3_5TextConfig lays out the layers from full_attention_interval, as the released configs do
    text = text_config(arch, tokenizer, head_dim=arch.attention_head_dim,
                       full_attention_interval=arch.full_attention_interval,
                       rope_parameters={"mrope_interleaved": True,
                                        "partial_rotary_factor": arch.partial_rotary_factor},
                       linear_conv_kernel_dim=arch.linear_conv_kernel_dim,
                       linear_key_head_dim=arch.linear_key_head_dim, linear_value_head_dim=arch.linear_value_head_dim,
                       linear_num_key_heads=arch.linear_num_key_heads,
                       linear_num_value_heads=arch.linear_num_value_heads)
    vision = dict(depth=arch.vision_depth, hidden_size=arch.vision_embed_dim,
                  intermediate_size=arch.vision_intermediate_size, num_heads=arch.vision_num_heads,
                  out_hidden_size=arch.hidden_size, patch_size=arch.patch_size,
                  temporal_patch_size=arch.temporal_patch_size, spatial_merge_size=arch.spatial_merge_size,
                  num_position_embeddings=arch.vision_num_position_embeddings)
    return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=arch.tie_word_embeddings,
                         **vision_token_ids(tokenizer))


def architecture_problems(arch: Any) -> List[str]:
    problems = []
    if arch.vision_intermediate_size is None:
        problems.append("model.architecture.vision_intermediate_size is required for family=qwen3_5 (the width of "
                        "the vision MLP)")
    if arch.full_attention_interval is None:
        problems.append("model.architecture.full_attention_interval is required for family=qwen3_5 (every n-th "
                        "decoder layer is softmax attention, the others Gated DeltaNet)")
    if arch.deepstack_visual_indexes:
        problems.append("model.architecture.deepstack_visual_indexes must be empty for family=qwen3_5 (no DeepStack)")
    return problems


FAMILY = Family(
    name="qwen3_5",
    title="Qwen3.5",
    box_convention=BOX_CONVENTION,  # Qwen3-VL's
    model_class="Qwen3_5ForConditionalGeneration",
    processor_class="Qwen3VLProcessor",
    tokenizer_class="Qwen3_5Tokenizer",
    added_tokens=ADDED_TOKENS,
    config_class="Qwen3_5Config",
    vision_block_class="Qwen3_5VisionBlock",
    decoder_layer_class="Qwen3_5DecoderLayer",
    linear_attention_class="Qwen3_5GatedDeltaNet",
    test_model="tiny_qwen3_5",
    patch_size=16,
    image_max_pixels=16384 * 32 * 32,  # Qwen3-VL's processor bound (Qwen3.5's preprocessor_config was not found)
    vision_stem=("model.visual.patch_embed", "model.visual.pos_embed"),
    never_quantized=("lm_head", r"model\.language_model\.layers\.\d+\.linear_attn\.in_proj_[ab]"),
    language_lora_targets=LANGUAGE_PROJECTIONS + LINEAR_ATTENTION_PROJECTIONS,
    qk_norm=True,
    positions=positions,
    video_tokens=video_tokens,
    chat_template=CHAT_TEMPLATE,
    random_config=random_config,
    random_processor=random_processor,
    architecture_problems=architecture_problems,
    vision_sizes=vision_sizes,
    vision_block_bytes=vision_block_bytes,
    kind_layer_bytes=hybrid_layer_bytes,
)
