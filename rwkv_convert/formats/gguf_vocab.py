"""The vocabulary a GGUF carries: the model's own. The World vocabulary for World-sized models (as llama.cpp's
convert_hf_to_gguf.py writes it), the single bytes with the other ids marked unused for byte-level models,
or a given tokenizer.json where llama.cpp has a matching tokenizer model (byte-level BPE: "gpt2")."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RwkvConvertError, brief
from ..tokenizer import (
    BYTE_TOKENS,
    HFTokenizer,
    WorldTokenizer,
    check_fits,
    gpt_neox_special_tokens,
    model_vocabulary,
    vocabulary_too_small,
)

EOT_TOKEN = 261  # "\n\n" in the World vocabulary: llama.cpp's converter makes it the end of a chat turn
# llama.cpp's models/templates/llama-cpp-rwkv-world.jinja (MIT, the llama.cpp authors), which its converter
# writes into World-vocabulary GGUFs: clients that render Jinja need the template itself, not its name
RWKV_WORLD_TEMPLATE = """{%- if not add_generation_prompt is defined -%}
    {%- set add_generation_prompt = true -%}
{%- endif -%}
{%- set ns = namespace(system_prompt='') -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {%- set ns.system_prompt = message['content'] -%}
    {%- endif -%}
{%- endfor -%}
{{bos_token}}
{%- if ns.system_prompt != '' -%}
{{- 'System: ' + ns.system_prompt + '\\n\\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] == 'user' -%}
        {{- 'User: ' + message['content']|trim + '\\n\\n' -}}
    {%- endif -%}
    {%- if message['role'] == 'assistant' and message['content'] is  not none -%}
        {%- set content = message['content'] -%}
        {%- if '</think>' in content -%}
            {%- set content = content.split('</think>')[-1] -%}
        {%- endif -%}
        {{- 'Assistant: ' + content|trim + '\\n\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'Assistant:' -}}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- ' <think>\\n</think>' }}
    {%- endif %}
    {%- if enable_thinking is defined and enable_thinking is true %}
        {{- ' <think>' }}
    {%- endif %}
{%- endif -%}"""


def needs(vocab_size: int, tokenizer: str | None) -> str | None:
    """Why the defaults cannot write this model's vocabulary (None: they can)."""
    return vocabulary_too_small(vocab_size) if tokenizer is None else None


def write_vocabulary(writer, gguf, vocab_size: int, tokenizer: str | None) -> None:
    if tokenizer is not None:
        _write_bpe(writer, gguf, Path(tokenizer), vocab_size)
        return
    world = model_vocabulary(vocab_size) == "world"
    known = WorldTokenizer(vocab_size=None if world else BYTE_TOKENS).id_to_bytes
    tokens, types = ["<s>"], [gguf.TokenType.CONTROL]
    for idx in range(1, vocab_size):
        if idx in known:
            tokens.append(repr(known[idx])[2:-1])
            types.append(gguf.TokenType.NORMAL)
        else:  # World's padding above 65529, or the ids a byte-level model never saw as text
            tokens.append(f"[PAD{idx}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(0)
    if world:
        writer.add_eot_token_id(EOT_TOKEN)
        writer.add_chat_template(RWKV_WORLD_TEMPLATE)


def _write_bpe(writer, gguf, path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json (GPT-2 / GPT-NeoX style) as llama.cpp's "gpt2" model: the tokens by id,
    the merges, the added special tokens as control tokens."""
    tokenizer = HFTokenizer(path)  # readable by the tokenizers library, or one clear line
    check_fits(tokenizer, vocab_size)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RwkvConvertError(f"{path} is not a readable tokenizer.json: {brief(e)}") from None
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or '"ByteLevel"' not in pre:
        raise RwkvConvertError(f"{path} is a {model.get('type')} tokenizer without a byte-level pre-tokenizer; GGUF"
                               " export embeds byte-level BPE tokenizers (GPT-2/GPT-NeoX style), which llama.cpp"
                               " runs as its gpt2 model")
    ids = tokenizer.vocab()
    by_id = {i: t for t, i in ids.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise RwkvConvertError(f"{path}: its token ids are not 0..{len(by_id) - 1} without gaps; llama.cpp needs that")
    control_ids = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens = [by_id[i] for i in range(len(by_id))] + [f"[PAD{i}]" for i in range(len(by_id), vocab_size)]
    types = [gguf.TokenType.CONTROL if i in control_ids else gguf.TokenType.NORMAL for i in range(len(by_id))] \
        + [gguf.TokenType.UNUSED] * (vocab_size - len(by_id))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_add_bos_token(False)
    special = gpt_neox_special_tokens(ids)
    for role, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                      ("pad_token", writer.add_pad_token_id)):
        if role in special:
            add(ids[special[role]])
