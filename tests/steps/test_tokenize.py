import pytest

from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
from steps.errors import DataQualityError
from steps.ingest import ingest_records
from steps.scrub import scrub_records
from steps.tokenize import IGNORE, encode_chat, in_eval, tokenize_dataset
from steps.validate import validate_records
from helpers import chat, write_jsonl


def clean_dataset(store, tmp_path, rows):
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "raw.jsonl", rows))), store)
    return scrub_records(ScrubConfig(), validate_records(ValidateConfig(), raw, store), store)


def test_only_assistant_tokens_are_labelled(tiny_tokenizer):
    messages = [{"role": "user", "content": "Where is Seoul?"}, {"role": "assistant", "content": "In Korea."},
                {"role": "user", "content": "고마워요"}, {"role": "assistant", "content": "천만에요!"}]
    ids, labels = encode_chat(tiny_tokenizer, messages)
    assert len(ids) == len(labels)
    kept = tiny_tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    assert kept == "In Korea.<|im_end|>천만에요!<|im_end|>"
    assert tiny_tokenizer.decode(ids).startswith("<|im_start|>system\n")


def test_split_is_seeded_and_stable():
    cfg = TokenizeConfig(eval_fraction=0.2, seed=7)
    ids = [f"r{i}" for i in range(2000)]
    first = [in_eval(i, cfg) for i in ids]
    assert first == [in_eval(i, cfg) for i in ids]
    assert 0.17 < sum(first) / len(ids) < 0.23
    assert first != [in_eval(i, TokenizeConfig(eval_fraction=0.2, seed=8)) for i in ids]


def test_tokenize_writes_both_splits_and_eval_prompts(store, tmp_path, tiny_model):
    rows = [chat(f"question {i}", f"answer number {i}") for i in range(60)]
    data = tokenize_dataset(TokenizeConfig(eval_fraction=0.25, max_seq_len=64), clean_dataset(store, tmp_path, rows),
                            tiny_model, store)
    train, evals = store.read_jsonl(data, "train.jsonl"), store.read_jsonl(data, "eval.jsonl")
    prompts = store.read_jsonl(data, "eval_prompts.jsonl")
    assert len(train) + len(evals) == 60 and len(evals) == len(prompts) > 0
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in evals)
    assert prompts[0]["messages"][-1]["role"] == "user" and prompts[0]["reference"].startswith("answer number")
    assert data.stats["train_records"] == len(train) and data.stats["truncated"] == 0
    assert all(any(label != IGNORE for label in r["labels"]) for r in train)


def test_truncation_that_removes_every_answer_drops_the_record(store, tmp_path, tiny_model):
    rows = [chat("long " * 200, "short answer")] + [chat(f"q{i}", f"a{i}") for i in range(40)]
    data = tokenize_dataset(TokenizeConfig(max_seq_len=64, eval_fraction=0.3), clean_dataset(store, tmp_path, rows),
                            tiny_model, store)
    assert data.stats["truncated"] == 1 and data.stats["dropped_no_answer"] == 1


def test_a_split_left_empty_is_an_error(store, tmp_path, tiny_model):
    with pytest.raises(DataQualityError, match="both splits non-empty"):
        tokenize_dataset(TokenizeConfig(eval_fraction=0.01), clean_dataset(store, tmp_path, [chat("a", "b")]),
                         tiny_model, store)


def test_the_truncation_gate_names_the_rule_and_the_share(store, tmp_path, tiny_model):
    from helpers import chat, sft_dataset  # noqa: F401
    from steps.config import IngestConfig, ScrubConfig, TokenizeConfig, ValidateConfig
    from steps.errors import DataQualityError
    from steps.ingest import ingest_records
    from steps.scrub import scrub_records
    from steps.tokenize import tokenize_dataset
    from steps.validate import validate_records
    from helpers import write_jsonl

    rows = [chat(f"question {i}", "a long answer " * (40 if i % 2 else 1)) for i in range(20)]
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "r.jsonl", rows))), store)
    clean = scrub_records(ScrubConfig(), validate_records(ValidateConfig(), raw, store), store)
    ok = tokenize_dataset(TokenizeConfig(max_seq_len=64, eval_fraction=0.2), clean, tiny_model, store)
    assert ok.stats["truncated_share"] == 0.5
    with pytest.raises(DataQualityError, match=r"truncated share at most 25%': 10 of 20 records \(50.0%\)"):
        tokenize_dataset(TokenizeConfig(max_seq_len=64, eval_fraction=0.2, max_truncated_share=0.25), clean,
                         tiny_model, store)


def test_eval_records_that_nearly_copy_a_train_record_are_dropped(store, tmp_path, tiny_model):
    from steps.tokenize import in_eval as goes_to_eval

    cfg = TokenizeConfig(max_seq_len=64, eval_fraction=0.3)
    rows = [chat(f"Tell me fact number {i} about the moon {'x' * i}", f"Fact {i}: the moon is {i} km away.",
                 id=f"r{i}") for i in range(30)]
    train_row = next(r for r in rows if not goes_to_eval(r["id"], cfg))
    eval_ids = [r["id"] for r in rows if goes_to_eval(r["id"], cfg)]
    copy = dict(train_row, id=next(f"c{i}" for i in range(100) if goes_to_eval(f"c{i}", cfg)))
    copy["messages"] = [dict(m) for m in train_row["messages"]]
    copy["messages"][1]["content"] += "!"  # a near copy, not an exact one
    raw = ingest_records(IngestConfig(source=str(write_jsonl(tmp_path / "r.jsonl", rows + [copy]))), store)
    # scrub's own near dedup would drop the copy first; off here, so tokenize's leakage check is what is tested
    clean = scrub_records(ScrubConfig(near_dedup=False), validate_records(ValidateConfig(), raw, store), store)
    data = tokenize_dataset(cfg, clean, tiny_model, store)
    assert data.stats["eval_leakage_removed"] == 1
    kept = {r["id"] for r in store.read_jsonl(data, "eval.jsonl")}
    assert copy["id"] not in kept and kept == set(eval_ids)
    off = tokenize_dataset(cfg.model_copy(update={"leakage_threshold": None}), clean, tiny_model, store)
    assert copy["id"] in {r["id"] for r in store.read_jsonl(off, "eval.jsonl")}


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
    from steps.tokenize import _template_is_transparent

    template = TRANSPARENT.get(name) or NOT_TRANSPARENT[name]
    assert _template_is_transparent(template, {"bos_token", "eos_token"}) is (name in TRANSPARENT)


def test_filled_layouts_encode_exactly_as_rendered_conversations(tiny_tokenizer, monkeypatch):
    """The SmolLM2 template is transparent: conversations are filled into layouts, not rendered;
    token ids and labels equal those of a real rendering, whatever the contents hold."""
    import steps.tokenize as tokenize

    conversations = [
        [{"role": "user", "content": "  spaced  \n\n"}, {"role": "assistant", "content": "<|im_end|> {{ x }} & \"q\""}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "안녕하세요?"},
         {"role": "assistant", "content": "네!\t"}, {"role": "user", "content": "{% if %}"},
         {"role": "assistant", "content": "\ue000 marker-like"}],
    ]
    assert tokenize._transparent(tiny_tokenizer) is True
    filled = tokenize.encode_chat_batch(tiny_tokenizer, conversations)
    monkeypatch.setattr(tokenize, "_transparent", lambda tokenizer: False)
    assert filled == tokenize.encode_chat_batch(tiny_tokenizer, conversations)


def test_worker_tokenizer_renders_like_transformers_without_importing_it(tiny_tokenizer, tmp_path):
    """Worker processes render a transparent template in their own sandboxed Jinja environment
    (no transformers import, ~1 s each): same text as the real tokenizer, including generation
    prompts, Korean, markup and a raise_exception branch; other templates go through transformers."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import jinja2

    from steps.tokenize import TemplateTokenizer, _plain_template, worker_tokenizer

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
    code = ("import json, sys; from steps.tokenize import TemplateTokenizer; "
            f"t = TemplateTokenizer(**json.load(open({str(tmp_path / 'config.json')!r}))); "
            f"t.apply_chat_template({chats!r}); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"
