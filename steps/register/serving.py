"""MLflow models-from-code pyfunc: base model + trained weights, pickle-free.

MLflow copies this file into the model version together with the ``steps`` package (the ``code``
artifact: one zip, put on ``sys.path``; versions registered before it carry it as ``code_paths``);
``load_context`` fetches the base model by URI (``runs:/<id>/base_model``
through the tracking server) and loads the trained weights stored with the version with
the method that made them (``steps/train/methods``: adapter, head, interventions, full weights).

    model = mlflow.pyfunc.load_model("models:/tuneline-chat@champion")
    model.predict(["What is the capital of France?"])   # -> ["Paris ..."]

Classification models answer label names, regression models numbers:

    mlflow.pyfunc.load_model("models:/tuneline-bbc@champion").predict(["Shares fell ..."])  # -> ["business"]

Reward models score plain texts or {prompt, response} pairs (rendered as in training), one float each:

    mlflow.pyfunc.load_model("models:/tuneline-reward@champion").predict(
        [{"prompt": "Hi there", "response": "Hello! How are you?"}])  # -> [1.73]

Encoder-decoders (T5, BART) generate the target of each input (cut at the training ``max_seq_len``):

    mlflow.pyfunc.load_model("models:/tuneline-seq2seq@champion").predict(["How are you?"])  # -> ["I am fine."]

Masked-LMs (domain-adapted encoders) fill each mask token (``[MASK]`` for BERT tokenizers) with their most likely
token and return the text as the tokenizer decodes it (an uncased tokenizer lower-cases it):

    mlflow.pyfunc.load_model("models:/tuneline-bbc-mlm@champion").predict(
        ["Shares in the [MASK] fell sharply."])  # -> ["shares in the market fell sharply."]
"""

from __future__ import annotations

import mlflow
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class ChatAdapterModel(PythonModel):
    def load_context(self, context):
        import sys
        from pathlib import Path

        import torch
        from transformers import AutoTokenizer

        config = context.model_config
        # Before any of the version's code or weights is used: its files against the digests in its config
        # (versions registered before they were recorded have none). `tuneline predict|serve` verified the
        # whole version against its registry tags already; this guards `mlflow models serve -m models:/...`.
        check_artifacts(context.artifacts, config.get("artifact_files"))
        code = context.artifacts.get("code")
        if code and code not in sys.path:
            sys.path.insert(0, code)
        from steps.core.device import tune_allocator
        from steps.train import methods

        tune_allocator()
        base_dir = mlflow.artifacts.download_artifacts(config["base_model_uri"])
        if "base_model_files" in config:
            from steps.register.verify import check_files

            check_files(Path(base_dir), config["base_model_files"], f"base model {config['base_model_uri']}")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        trained = Path(context.artifacts["trained"])
        self.task = methods.task_of(trained)
        self.model = methods.load(Path(base_dir), trained, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        # Generation pads on the left; an encoder's [CLS] must stay at position 0 (right padding, as in training).
        self.tokenizer.padding_side = "left" if self.task.causal_lm else "right"
        self.max_new_tokens = int(config.get("max_new_tokens", 64))
        if self.task.kind == "reward":  # how tokenize encoded the pairs: the same here (steps/tokenize/encode.py)
            self.pair_input = config.get("pair_input", "chat")
        self.max_seq_len = int(config.get("max_seq_len", 256))

    def predict(self, context, model_input, params=None):
        import torch

        if self.task.kind == "reward":
            return self.score(reward_inputs(model_input))
        if hasattr(model_input, "columns"):  # MLflow hands a list of strings over as a one-column DataFrame
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = list(model_input[column])
        else:
            prompts = list(model_input)
        if self.task.sequence_head:
            return self.classify([str(p) for p in prompts])
        if self.task.kind == "mlm":
            return self.fill_masks([str(p) for p in prompts])
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        if self.task.kind == "seq2seq":
            from steps.train.seq2seq import generate

            return generate(self.model, self.tokenizer, [str(p) for p in prompts], max_new, len(prompts) or 1,
                            self.device, self.max_seq_len)
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": str(p)}], tokenize=False,
                                                    add_generation_prompt=True) for p in prompts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return [s.strip() for s in self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                                skip_special_tokens=True)]


    def classify(self, texts):
        import torch

        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        with torch.no_grad():
            logits = self.model(**enc).logits.float()
        if self.task.kind == "regression":
            return logits[:, 0].tolist()
        return [self.task.labels[i] for i in logits.argmax(-1).tolist()]

    def fill_masks(self, texts):
        """Each text with every mask token replaced by the model's top token, decoded (special tokens dropped)."""
        import torch

        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        with torch.no_grad():
            logits = self.model(**enc).logits
        masked = enc["input_ids"] == self.tokenizer.mask_token_id
        filled = torch.where(masked, logits.argmax(-1), enc["input_ids"])
        return [self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip()
                for ids, mask in zip(filled, enc["attention_mask"])]

    def score(self, items):
        """A reward model's score of each input: a plain text as it is (the tokenizer's special tokens), a
        (prompt, response) pair encoded as in training (chat template, or an encoder's text pair); each cut
        at the training max_seq_len."""
        from steps.train.reward import score_items

        return score_items(self.model, self.tokenizer, items, self.pair_input, self.max_seq_len, self.device)


def reward_inputs(model_input):
    """A reward model's inputs as plain texts (str) and (prompt, response) tuples, from a list of strings and
    {"prompt", "response"} (or {"text"}) dicts, a dict of columns, or a DataFrame with such columns."""
    import math

    if isinstance(model_input, dict):
        model_input = [dict(zip(model_input, values)) for values in zip(*model_input.values())]
    if hasattr(model_input, "columns"):
        columns = list(model_input.columns)
        if not ({"prompt", "response"} <= set(columns) or "text" in columns):
            return [str(v) for v in model_input[columns[0]]]
        model_input = model_input.to_dict("records")

    def given(value):
        return isinstance(value, str) or (value is not None and not (isinstance(value, float) and math.isnan(value)))

    items = []
    for entry in model_input:
        if not isinstance(entry, dict):
            items.append(str(entry))
        elif given(entry.get("prompt")) and given(entry.get("response")):
            items.append((str(entry["prompt"]), str(entry["response"])))
        elif given(entry.get("text")):
            items.append(str(entry["text"]))
        else:
            raise ValueError(f"a reward model scores texts or {{'prompt', 'response'}} pairs; got keys {sorted(entry)}")
    return items


class TamperedModelError(RuntimeError):
    """A file of the model differs from the digest recorded at registration."""


def check_artifacts(artifacts, expected) -> None:
    """The pyfunc's artifacts (``trained`` and ``tokenizer`` folders, ``code`` zip) hold exactly the files of
    ``expected`` (``{"trained": {path: sha256}, "tokenizer": {...}, "code": sha256}``), else
    TamperedModelError naming the file. Standalone (hashlib only): it runs before the ``steps`` code is trusted."""
    import hashlib
    from pathlib import Path

    def sha256(path):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    for name, want in (expected or {}).items():
        root = Path(artifacts[name])
        if isinstance(want, str):
            if sha256(root) != want:
                raise TamperedModelError(f"model artifact {name} ({root.name}) differs from its registered sha256")
            continue
        found = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
        for path in sorted(set(found) | set(want)):
            if path not in want or path not in found or sha256(found[path]) != want[path]:
                raise TamperedModelError(f"model artifact {name}/{path} differs from its registered files "
                                         f"({'unexpected' if path not in want else 'missing' if path not in found else 'changed'})")


set_model(ChatAdapterModel())
