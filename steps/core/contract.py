"""The contract between the steps: the files one step writes and the next reads, the label that
the losses skip, the model every configuration and reference is built on, and the task a tokenized
dataset is made for (tokenize writes it, train, evaluate and the served model read it)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RAW_FILE = "raw.jsonl"  # ingest: the source's bytes, as they came
RECORDS_FILE = "records.jsonl"  # validate and scrub: one record per line
IGNORE = -100  # a label no loss counts (prompt tokens, padding)
RECORD_LOSSES = "record_losses.jsonl"  # train: each record's loss after training (ids, never contents)
# A mixture's source pinned to one side of the train/eval split (``ingest.sources[].split``): ingest writes
# the side into each of its raw records under PINNED_SPLIT (a name no user field has); the records' forms
# after validate carry it as "split", which tokenize's split honours instead of the hash of the id.
PINNED_SPLIT = "_tuneline_split"
# ingest's record formats (``ingest.format``) and the record kind (``validate.record_kind``) each is read as;
# text records may also come from labelled files (the label is left out).
FORMAT_KINDS = {"messages": "chat", "sharegpt": "chat", "alpaca": "chat", "text": "text",
                "classification": "classification", "regression": "regression", "preference": "preference",
                "prompt": "prompt", "seq2seq": "seq2seq"}
# Chat formats a seq2seq record kind also reads: an instruction pair's prompt as the input, its answer as the target.
SEQ2SEQ_CHAT_FORMATS = ("messages", "sharegpt", "alpaca")


def form_schema(schema: dict[str, Any]) -> None:
    """A model's JSON schema as forms render it (the Prefect UI renders descriptions as markdown): ``<EMAIL>``
    and ``*`` shown as written (code spans), and each field's bounds said in its description."""
    for prop in (schema.get("properties") or {}).values():
        if "description" in prop:
            text = re.sub(r"<[^<>\s][^<>]*>|(?<![\w`])\*(?![\w`])", lambda m: f"`{m.group(0)}`", prop["description"])
            branches = (prop, *prop.get("anyOf", ()))
            bounds = [f"{word} {limit}" for key, word in BOUND_WORDS.items() for branch in branches
                      if (limit := branch.get(key)) is not None]
            prop["description"] = text + (f" Allowed: {', '.join(bounds)}." if bounds else "")


BOUND_WORDS = {"minimum": "≥", "exclusiveMinimum": ">", "maximum": "≤", "exclusiveMaximum": "<",
               "minLength": "length ≥", "maxLength": "length ≤", "minItems": "items ≥", "maxItems": "items ≤"}


class StrictModel(BaseModel):
    """Unknown fields are errors; instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=form_schema)


class Task(StrictModel):
    """What the model is trained to do; read from the tokenized dataset and stored in method.json.

    sft, cpt and preference train the causal LM head; classification and regression put a
    freshly initialised sequence head on the base (``AutoModelForSequenceClassification``:
    ``len(labels)`` outputs with cross-entropy, or one output with MSE); reward is a reward model, one
    output scoring prompt + answer, trained on preference pairs with the Bradley-Terry loss; mlm is
    masked-LM domain adaptation of an encoder (``AutoModelForMaskedLM``) on text records, whose masked
    positions take ``mask_token_id``; seq2seq is an encoder-decoder (``AutoModelForSeq2SeqLM``: T5, BART) that
    reads an input and generates its target, trained on the target tokens.
    """

    kind: Literal["sft", "cpt", "classification", "regression", "preference", "rl", "reward", "mlm",
                  "seq2seq"] = "sft"
    labels: list[str] = Field(default_factory=list)
    mask_token_id: int | None = None

    @classmethod
    def of_data(cls, stats: dict[str, Any]) -> Task:
        """The task a tokenized dataset is made for, from its stats (tokenize writes them)."""
        return cls(kind=stats.get("task", "sft"), labels=stats.get("labels", []),
                   mask_token_id=stats.get("mask_token_id"))

    @property
    def sequence_head(self) -> bool:
        return self.kind in ("classification", "regression", "reward")

    @property
    def causal_lm(self) -> bool:
        """Whether the model keeps the causal LM head (sft, cpt, preference, rl): it generates text."""
        return not self.sequence_head and self.kind not in ("mlm", "seq2seq")

    @property
    def generates(self) -> bool:
        """Whether the model answers with generated text (a causal LM, or an encoder-decoder)."""
        return self.causal_lm or self.kind == "seq2seq"


CAUSAL = Task()
