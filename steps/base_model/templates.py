"""Chat templates for base models whose tokenizer has none (``tokenize.chat_template``): the built-in
``chatml``, ``llama3`` and ``gemma`` layouts, or a Jinja file. The chosen template is written into the
base model's tokenizer files, so tokenize, evaluate and the registered model all render the same way.

    text, name = resolve_template("chatml")
    apply_template(folder, text)   # tokenizer_config.json / chat_template.jinja rewritten in ``folder``

Each template copies message contents verbatim and renders every conversation prefix as a prefix of
the whole, which is what label masking needs (steps/tokenize/template.py checks that on the data).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from steps.core.errors import ConfigError

log = logging.getLogger(__name__)

BUILT_IN = {
    # Tool calls as <tool_call> blocks of {"name", "arguments"} JSON after the content (Hermes/Qwen style).
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
               "{% for call in message.get('tool_calls') or [] %}{{ '<tool_call>\\n{\"name\": \"' + "
               "call['function']['name'] + '\", \"arguments\": ' + (call['function']['arguments'] if "
               "call['function']['arguments'] is string else call['function']['arguments'] | tojson) + "
               "'}\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>' + '\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "gemma": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
              "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
              "{{ '<start_of_turn>' + role + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"),
}
# The token that ends an answer in each built-in layout: generation stops there when the vocabulary has it.
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}


def resolve_template(setting: str) -> tuple[str, str]:
    """(template text, name for the record): a built-in name, or the path of a Jinja file."""
    if setting in BUILT_IN:
        return BUILT_IN[setting], setting
    path = Path(setting)
    if not path.is_file():
        raise ConfigError(f"tokenize.chat_template {setting!r} is neither a built-in template "
                          f"({', '.join(BUILT_IN)}) nor a readable Jinja file")
    text = path.read_text(encoding="utf-8")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        ImmutableSandboxedEnvironment().parse(text)
    except Exception as exc:  # noqa: BLE001 - any syntax error, reported with the file
        raise ConfigError(f"tokenize.chat_template {setting!r}: not a valid Jinja template ({exc})") from None
    return text, f"file:{path.name}"


def apply_template(folder: Path, text: str, name: str) -> None:
    """Write ``text`` as the chat template of the tokenizer in ``folder``; with a built-in layout whose
    end-of-turn token is one token of the vocabulary, generation also stops at it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = text
    tokenizer.save_pretrained(folder)
    end = END_OF_TURN.get(name)
    if end is None:
        return
    ids = tokenizer.convert_tokens_to_ids([end])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        log.warning("base_model: the %s template's %s is not a token of this vocabulary: it is encoded as text, "
                    "and generation stops only at the tokenizer's end-of-sequence token", name, end)
        return
    path = folder / "generation_config.json"
    generation = json.loads(path.read_text()) if path.exists() else {}
    eos = generation.get("eos_token_id", tokenizer.eos_token_id)
    eos = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    generation["eos_token_id"] = sorted({*eos, ids[0]})
    path.write_text(json.dumps(generation, indent=2) + "\n")
