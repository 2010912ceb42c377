"""What ``base_model.source`` may say, parsed without touching disk or network (the config validates
with it; steps/base_model fetches what it names).

    parse_source("hf:Qwen/Qwen2.5-0.5B@main")  # -> Source(kind="hf", name="Qwen/Qwen2.5-0.5B", ref="main")

Kinds: ``shipped`` (a short alias of a model shipped with tuneline), ``local`` (a folder in Hugging
Face layout), ``gguf`` (a .gguf file), ``s3`` (``s3://bucket/prefix/`` holding such a folder), ``hf``
(``hf:ORG/NAME[@REVISION]``), ``registry`` (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Shipped models (steps/base_model/shipped.py): alias -> whether it is an encoder.
SHIPPED: dict[str, bool] = {"smollm2-135m-instruct": False, "tiny-random-llama": False,
                            "all-minilm-l6-v2": True, "tiny-random-bert": True, "tiny-random-t5": False}
# The shipped encoder-decoders (sequence-to-sequence; neither a causal LM nor an encoder).
SHIPPED_SEQ2SEQ = {"tiny-random-t5"}
FORMS = ("a shipped name (" + ", ".join(SHIPPED) + "), a local Hugging Face folder, a .gguf file, "
         "s3://bucket/prefix/, hf:ORG/NAME[@REVISION], models:/NAME@ALIAS or models:/NAME/VERSION")
_HF = re.compile(r"hf:(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?")
_REGISTRY = re.compile(r"models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))")
_S3 = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(?P<prefix>\S*)")


@dataclass(frozen=True)
class Source:
    kind: str  # shipped | local | gguf | s3 | hf | registry
    name: str  # alias, path, bucket, repo id or registered model name
    ref: str = ""  # s3 prefix, hf revision, registry alias or version

    @property
    def version(self) -> str | None:
        """registry: the version number, when the source names one (else an alias)."""
        return self.ref if self.kind == "registry" and self.ref.isdigit() else None


def parse_source(text: str) -> Source:
    """The kind of source ``text`` names; ``ValueError`` saying which forms exist when none fits."""
    text = text.strip()
    if text in SHIPPED:
        return Source("shipped", text)
    if text.startswith("hf:"):
        if not (m := _HF.fullmatch(text)):
            raise ValueError(f"{text!r} is not hf:ORG/NAME or hf:ORG/NAME@REVISION")
        return Source("hf", m["repo"], m["rev"] or "main")
    if text.startswith("models:"):
        if not (m := _REGISTRY.fullmatch(text)):
            raise ValueError(f"{text!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
        return Source("registry", m["name"], m["alias"] or m["version"])
    if text.startswith("s3://"):
        if not (m := _S3.fullmatch(text)) or not m["prefix"].strip("/"):
            raise ValueError(f"{text!r} is not s3://bucket/prefix/ (a bucket name and a non-empty prefix)")
        return Source("s3", m["bucket"], m["prefix"].strip("/") + "/")
    if re.match(r"[a-z][a-z0-9+.-]*://", text) or not text:
        raise ValueError(f"{text!r} has no known form")
    return Source("gguf" if text.lower().endswith(".gguf") else "local", text)
