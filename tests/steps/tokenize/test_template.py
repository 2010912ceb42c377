"""steps/tokenize/template.py: which chat templates copy contents verbatim (then conversations are filled
into layouts instead of rendered), and the template tokenizer of worker processes."""

import pytest

TRANSPARENT = {
    "chatml": "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "tilde and first message": "{{ messages[0]['role'] }}{% for m in messages %}{{ m.role ~ ': ' ~ m.content }}{% endfor %}",
    "length and loop": "{{ messages | length }}{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
                       "{{ m['content'] }}{% endfor %}",
}

NOT_TRANSPARENT = {  # each could change the output with the content: rendered per conversation
    "trim": "{% for m in messages %}{{ m['content'] | trim }}{% endfor %}",
    "set": "{% for m in messages %}{% set c = m['content'] %}{{ c }}{% endfor %}",
    "test on content": "{% for m in messages %}{% if m['content'] %}{{ m['content'] }}{% endif %}{% endfor %}",
    "method call": "{% for m in messages %}{% if m.content.startswith('<') %}x{% endif %}{{ m.content }}{% endfor %}",
    "whole message": "{% for m in messages %}{{ m | tojson }}{% endfor %}",
    "get": "{% for m in messages %}{{ m.get('content') }}{% endfor %}",
    "filtered loop": "{% for m in messages | selectattr('role') %}{{ m['content'] }}{% endfor %}",
    "other key": "{% for m in messages %}{{ m['tool_calls'] }}{{ m['content'] }}{% endfor %}",
    "unknown name": "{% for m in messages %}{{ m['content'] }}{{ today }}{% endfor %}",
    "content compared": "{% if messages[0]['content'] == 'x' %}y{% endif %}",
}


@pytest.mark.parametrize("name", sorted(TRANSPARENT) + sorted(NOT_TRANSPARENT))
def test_only_templates_that_copy_contents_verbatim_skip_rendering(name):
    from steps.tokenize.template import _template_is_transparent

    template = TRANSPARENT.get(name) or NOT_TRANSPARENT[name]
    assert _template_is_transparent(template, {"bos_token", "eos_token"}) is (name in TRANSPARENT)


def test_filled_layouts_encode_exactly_as_rendered_conversations(tiny_tokenizer, monkeypatch):
    """The SmolLM2 template is transparent: conversations are filled into layouts, not rendered;
    token ids and labels equal those of a real rendering, whatever the contents hold."""
    import steps.tokenize.encode as encode

    conversations = [
        [{"role": "user", "content": "  spaced  \n\n"}, {"role": "assistant", "content": "<|im_end|> {{ x }} & \"q\""}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "안녕하세요?"},
         {"role": "assistant", "content": "네!\t"}, {"role": "user", "content": "{% if %}"},
         {"role": "assistant", "content": "\ue000 marker-like"}],
    ]
    assert encode._transparent(tiny_tokenizer) is True
    filled = encode.encode_chat_batch(tiny_tokenizer, conversations)
    monkeypatch.setattr(encode, "_transparent", lambda tokenizer: False)
    assert filled == encode.encode_chat_batch(tiny_tokenizer, conversations)


def test_worker_tokenizer_renders_like_transformers_without_importing_it(tiny_tokenizer, tmp_path):
    """Worker processes render a transparent template in their own sandboxed Jinja environment
    (no transformers import, ~1 s each): same text as the real tokenizer, including generation
    prompts, Korean, markup and a raise_exception branch; other templates go through transformers."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import jinja2

    from steps.tokenize.template import TemplateTokenizer, _plain_template, worker_tokenizer

    config = worker_tokenizer(tiny_tokenizer)
    assert config is not None
    rebuilt = TemplateTokenizer(**config)
    assert _plain_template(rebuilt.chat_template, frozenset(rebuilt.template_kwargs)) is not None
    chats = [[{"role": "user", "content": "안녕 {{ x }} <b>&</b>"}, {"role": "assistant", "content": " ok\n"}],
             [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]]
    for prompt in (False, True):
        assert rebuilt.apply_chat_template(chats, add_generation_prompt=prompt) == \
            tiny_tokenizer.apply_chat_template(chats, tokenize=False, add_generation_prompt=prompt)
    guarded = TemplateTokenizer(config["backend"], "{% if messages | length == 0 %}{{ raise_exception('empty') }}"
                                "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}", {})
    with pytest.raises(jinja2.exceptions.TemplateError, match="empty"):
        guarded.apply_chat_template([])
    assert _plain_template("{% for m in messages %}{{ m['role'] | tojson }}{{ m['content'] }}{% endfor %}",
                           frozenset()) is None  # transformers' tojson is not Jinja's
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = ("import json, sys; from steps.tokenize.template import TemplateTokenizer; "
            f"t = TemplateTokenizer(**json.load(open({str(tmp_path / 'config.json')!r}))); "
            f"t.apply_chat_template({chats!r}); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "False"
