"""steps/register/serving.py: the registered pyfunc, loaded from a folder as MLflow hands it over
(base model URI, trained weights and tokenizer as local artifacts); no tracking server needed."""

from __future__ import annotations

import types

import pandas as pd
import pytest

from helpers import kind_dataset, labelled_rows, sft_dataset
from steps.config import LoraSettings, TrainConfig
from steps.register.serving import ChatAdapterModel
from steps.train.step import train_model

TRAIN = TrainConfig(max_steps=2, batch_size=4, warmup_steps=0, checkpoint_every=0, lora=LoraSettings(r=4, alpha=8))


def served(store, tuned, base) -> ChatAdapterModel:
    base_dir = store.download(base.base)
    context = types.SimpleNamespace(model_config={"base_model_uri": str(base_dir), "max_new_tokens": 5},
                                    artifacts={"trained": str(store.download(tuned.adapter)), "tokenizer": str(base_dir)})
    model = ChatAdapterModel()
    model.load_context(context)
    return model


def test_a_chat_model_answers_prompts_greedily_from_a_list_or_a_frame(store, tmp_path, tiny_model):
    import torch

    from steps.train import methods

    tuned = train_model(TRAIN, sft_dataset(store, tmp_path, tiny_model, n=16), tiny_model, store)
    model = served(store, tuned, tiny_model)
    prompts = ["What is 3 plus 3?", "안녕하세요"]
    answers = model.predict(None, prompts)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert model.predict(None, pd.DataFrame({"prompt": prompts})) == answers
    assert [len(a) for a in model.predict(None, prompts, params={"max_new_tokens": 1})] <= [len(a) for a in answers]
    # The same answer as the trained model loaded by its method, rendered with the chat template.
    net = methods.load(store.download(tiny_model.base), store.download(tuned.adapter), "cpu")
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=False,
                                               add_generation_prompt=True)
    ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                           pad_token_id=model.tokenizer.pad_token_id)
    assert model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == answers[0]


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_sequence_models_answer_labels_or_numbers(store, tmp_path, tiny_encoder, kind):
    data = kind_dataset(store, tmp_path, tiny_encoder, kind, labelled_rows(kind, n=24))
    tuned = train_model(TRAIN.model_copy(update={"method": "full", "lora": LoraSettings()}), data, tiny_encoder, store)
    model = served(store, tuned, tiny_encoder)
    answers = model.predict(None, ["the team scored a goal today", "bank shares and profit"])
    if kind == "classification":
        assert set(answers) <= {"money", "sport", "tech"} and len(answers) == 2
    else:
        assert len(answers) == 2 and all(isinstance(a, float) for a in answers)


def test_the_code_artifact_is_one_reproducible_zip_the_model_imports_from(tmp_path):
    """The served model's ``steps`` comes from the ``code`` zip (one upload): a python with only the
    zip and the site-packages on its path (no repository, no editable install) imports the methods from it."""
    import hashlib
    import subprocess
    import sys
    import sysconfig

    from steps.register.step import STEPS_DIR, package_zip

    first, second = package_zip(STEPS_DIR, tmp_path / "a.zip"), package_zip(STEPS_DIR, tmp_path / "b.zip")
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    probe = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; from steps.train import methods; "
             "import steps.train.methods.lora; print(methods.__file__)")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe, str(first), sysconfig.get_paths()["purelib"]],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(first / "steps" / "train" / "methods" / "__init__.py")
