"""Augmentation of the train split: seeded synonym substitution, adjacent-word swap and
back-translation. Off unless ``tokenize.augment`` is set:

    tokenize:
      augment: {techniques: [synonym, swap], probability: 0.5, copies: 1, seed: 0}
      # back-translation through two local seq2seq models (loaded offline, no remote code):
      augment: {techniques: [back_translation, synonym],
                back_translation: {forward: models/opus-mt-en-de, backward: models/opus-mt-de-en}}
      # or your own callable list[str] -> list[str] (one paraphrase per text):
      augment: {techniques: [back_translation], back_translation: {translator: "mypkg.mt:round_trip"}}

The tokenize step calls ``augment_train`` after the train/eval split and the leakage
check: eval records are never augmented. A chosen train record keeps its place and is
followed by its copies (id ``<id>#aug<k>``, k = 1..copies); a copy that came out identical
to its original or to an earlier copy is not added.

What changes (``target``): ``prompt`` (default) changes only what the model reads -- the
user turns of chat records, the prompt of preference pairs, the text of text,
classification and regression records -- so the answers it learns stay verbatim; ``all``
also changes assistant turns and the chosen/rejected answers. Roles, system turns, ids of
originals, labels and the record kind are never changed; a copy has the same number of
messages in the same order.

Determinism: a record's choices come from ``random.Random`` seeded with (seed, record id,
copy), so the same seed gives the same copies whatever the record order, and a record's
copies do not change when the dataset grows.

Techniques, applied to each copy in this order:
- back_translation: every target text goes through a ``Translator`` (list of texts -> list
  of paraphrases, same length): the forward model's translation translated back by the
  backward model (greedy decoding, so deterministic), or the configured callable. A blank
  round trip keeps the original text. Each distinct text is translated once.
- synonym: English words of ``steps/reference/synonyms.tsv`` are replaced, each with
  probability ``word_rate``, by another word of their group (case kept). Korean and other
  non-Latin text is left untouched; PII placeholders (``<EMAIL>``, ``<PHONE:1a2b...>``) too.
- swap: ``max(1, round(word_rate x words))`` exchanges of two adjacent whitespace-separated
  words, at distinct positions (any script, so Korean word order is varied too).

Stats (the tokenize manifest's ``augmentation``): ``records_augmented`` (originals with at
least one copy), ``records_added`` (copies), ``techniques`` (copies each technique changed),
``seed`` and ``target``.

Limits: word-level only (no part-of-speech check: a synonym may not fit its sentence); the
synonym table is English; a back-translation model folder's files are hashed into the cache
key, a ``translator`` callable only by its name.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from steps.config import AugmentConfig, BackTranslationSettings
from steps.core.errors import ConfigError
from steps.core.progress import progress as tqdm

log = logging.getLogger(__name__)

Translator = Callable[[list[str]], list[str]]
SYNONYMS = Path(__file__).resolve().parents[1] / "reference" / "synonyms.tsv"
ORDER = ("back_translation", "synonym", "swap")
_WORD = re.compile(r"(?<![\w'’])[A-Za-z]+(?![\w'’])")
_PLACEHOLDER = re.compile(r"<[A-Z_]+(?::[0-9a-f]+)?>")


def augment_train(cfg: AugmentConfig, sides: dict[str, list[dict[str, Any]]], kind: str,
                  translator: Translator | None = None) -> dict[str, Any]:
    """Replace ``sides["train"]`` by the originals and their copies; returns the stats. Eval is left alone."""
    sides["train"], stats = augment_records(sides["train"], cfg, kind, translator)
    log.info("augment: %d train records got %d copies (%s)", stats["records_augmented"], stats["records_added"],
             stats["techniques"])
    return stats


def augment_records(records: list[dict[str, Any]], cfg: AugmentConfig, kind: str,
                    translator: Translator | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The records with their augmented copies after each chosen one, and the stats.

    ``translator`` replaces the one configured in ``cfg.back_translation`` (any callable
    list[str] -> list[str])."""
    chosen = {r["id"] for r in records if random.Random(f"{cfg.seed}:{r['id']}").random() < cfg.probability}
    paraphrase: dict[str, str] = {}
    if "back_translation" in cfg.techniques:
        texts = sorted({read(r, s) for r in records if r["id"] in chosen for s in slots(r, kind, cfg.target)})
        paraphrase = back_translate(texts, translator or load_translator(cfg.back_translation))
    counts = {t: 0 for t in ORDER if t in cfg.techniques}
    out: list[dict[str, Any]] = []
    augmented = 0
    for record in records:
        out.append(record)
        if record["id"] not in chosen:
            continue
        seen = {fingerprint(record, kind, cfg.target)}
        for k in range(1, cfg.copies + 1):
            copy, changed_by = augmented_copy(record, kind, cfg, k, paraphrase)
            if (key := fingerprint(copy, kind, cfg.target)) in seen:
                continue
            seen.add(key)
            out.append(copy)
            for technique in changed_by:
                counts[technique] += 1
        augmented += len(seen) > 1
    stats = {"records_augmented": augmented, "records_added": len(out) - len(records), "techniques": counts,
             "seed": cfg.seed, "target": cfg.target}
    return out, stats


def augmented_copy(record: dict[str, Any], kind: str, cfg: AugmentConfig, k: int,
                   paraphrase: dict[str, str]) -> tuple[dict[str, Any], set[str]]:
    """Copy ``k`` of a record and the techniques that changed it."""
    rng = random.Random(f"{cfg.seed}:{record['id']}:{k}")
    copy = {**record, "id": f"{record['id']}#aug{k}"}
    if "messages" in record:
        copy["messages"] = [dict(m) for m in record["messages"]]
    changed_by: set[str] = set()
    for slot in slots(record, kind, cfg.target):
        text = read(record, slot)
        for technique in ORDER:
            if technique not in cfg.techniques:
                continue
            if technique == "back_translation":
                new = paraphrase.get(text, text)
            elif technique == "synonym":
                new = substitute_synonyms(text, rng, cfg.word_rate)
            else:
                new = swap_words(text, rng, cfg.word_rate)
            if new != text:
                changed_by.add(technique)
            text = new
        write(copy, slot, text)
    return copy, changed_by


# --- which texts a record kind offers -------------------------------------------------------

Slot = tuple[str, int | None]  # (field, message index or None)


def slots(record: dict[str, Any], kind: str, target: str) -> list[Slot]:
    """The texts augmentation may change: prompt side only, or answers too (``target == "all"``)."""
    if kind == "chat":
        roles = ("user",) if target == "prompt" else ("user", "assistant")
        return [("messages", i) for i, m in enumerate(record["messages"]) if m["role"] in roles]
    if kind == "preference":
        return [("prompt", None), *([("chosen", None), ("rejected", None)] if target == "all" else [])]
    if kind == "prompt":  # the answer is the rewards' reference: never changed
        return [("prompt", None)]
    if kind == "seq2seq":
        return [("input", None), *([("target", None)] if target == "all" else [])]
    return [("text", None)]


def read(record: dict[str, Any], slot: Slot) -> str:
    field, index = slot
    return record[field] if index is None else record[field][index]["content"]


def write(record: dict[str, Any], slot: Slot, text: str) -> None:
    field, index = slot
    if index is None:
        record[field] = text
    else:
        record[field][index]["content"] = text


def fingerprint(record: dict[str, Any], kind: str, target: str) -> tuple[str, ...]:
    return tuple(read(record, s) for s in slots(record, kind, target))


# --- word-level techniques -------------------------------------------------------------------

@lru_cache(maxsize=1)
def synonym_table(path: Path = SYNONYMS) -> dict[str, tuple[str, ...]]:
    """word -> the other words of every group it is in (sorted, so choices are reproducible)."""
    table: dict[str, set[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        group = [w.strip().lower() for w in line.split("\t") if w.strip()]
        for word in group:
            table.setdefault(word, set()).update(w for w in group if w != word)
    return {word: tuple(sorted(others)) for word, others in table.items() if others}


def substitute_synonyms(text: str, rng: random.Random, rate: float) -> str:
    """Each table word is replaced with probability ``rate`` by a synonym of the same case; placeholders stay."""
    table = synonym_table()

    def replace(match: re.Match[str]) -> str:
        word = match.group()
        options = table.get(word.lower())
        if not options or rng.random() >= rate:
            return word
        new = rng.choice(options)
        if word.isupper() and len(word) > 1:
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    pieces = _PLACEHOLDER.split(text)
    marks = _PLACEHOLDER.findall(text)
    out = [_WORD.sub(replace, pieces[0])]
    for mark, piece in zip(marks, pieces[1:]):
        out += [mark, _WORD.sub(replace, piece)]
    return "".join(out)


def swap_words(text: str, rng: random.Random, rate: float) -> str:
    """``max(1, round(rate x words))`` exchanges of adjacent words at distinct positions; whitespace stays put."""
    parts = re.split(r"(\s+)", text)
    where = [i for i in range(0, len(parts), 2) if parts[i]]
    if len(where) < 2:
        return text
    # distinct pairs: a product of distinct adjacent transpositions is never the identity
    for n in rng.sample(range(len(where) - 1), min(max(1, round(rate * len(where))), len(where) - 1)):
        a, b = where[n], where[n + 1]
        parts[a], parts[b] = parts[b], parts[a]
    return "".join(parts)


# --- back-translation ------------------------------------------------------------------------

def back_translate(texts: list[str], translator: Translator) -> dict[str, str]:
    """text -> its round trip; a blank result keeps the text."""
    if not texts:
        return {}
    result = translator(list(texts))
    if not isinstance(result, list) or len(result) != len(texts) or not all(isinstance(t, str) for t in result):
        raise ConfigError(f"tokenize.augment.back_translation: the translator must return a list of {len(texts)} "
                          f"strings (one per text), got {type(result).__name__} "
                          f"of length {len(result) if hasattr(result, '__len__') else '?'}")
    return {text: new.strip() or text for text, new in zip(texts, result)}


def load_translator(settings: BackTranslationSettings | None) -> Translator:
    """The configured callable, or a round trip through the forward and backward seq2seq models."""
    if settings is None:
        raise ConfigError("tokenize.augment: the back_translation technique needs back_translation settings")
    if settings.translator is not None:
        return import_translator(settings.translator)
    assert settings.forward is not None and settings.backward is not None
    there = Seq2SeqTranslation(model_folder(settings.forward, "forward"), "forward", settings)
    back = Seq2SeqTranslation(model_folder(settings.backward, "backward"), "backward", settings)
    return lambda texts: back(there(texts))


def import_translator(spec: str) -> Translator:
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"tokenize.augment.back_translation.translator {spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"tokenize.augment.back_translation.translator {spec!r} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise ConfigError(f"tokenize.augment.back_translation.translator {spec!r} is not callable")
    return fn


def model_folder(spec: str, role: str) -> Path:
    """A local folder, or 'package:<module>': the model/ folder of an installed package (or the package folder)."""
    if spec.startswith("package:"):
        name = spec.removeprefix("package:")
        found = importlib.util.find_spec(name) if name else None
        if found is None or found.origin is None:
            raise ConfigError(f"tokenize.augment.back_translation.{role}: package {name!r} is not installed")
        root = Path(found.origin).parent
        folder = root / "model" if (root / "model").is_dir() else root
    else:
        folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"tokenize.augment.back_translation.{role}: {spec!r} is not a model folder "
                          f"(no config.json in {folder})")
    return folder


class Seq2SeqTranslation:
    """One direction of the round trip: a local seq2seq model with its tokenizer, greedy decoding."""

    def __init__(self, folder: Path, role: str, settings: BackTranslationSettings):
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            self.model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True,
                                                               trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - any load failure is a configuration problem to report
            raise ConfigError(f"tokenize.augment.back_translation.{role}: cannot load a seq2seq model and tokenizer "
                              f"from {folder} offline: {type(exc).__name__}: {exc}") from exc
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.role, self.batch_size, self.max_new_tokens = role, settings.batch_size, settings.max_new_tokens

    def __call__(self, texts: list[str]) -> list[str]:
        import torch

        out: list[str] = []
        with torch.inference_mode():
            for start in tqdm(range(0, len(texts), self.batch_size), desc=f"back-translation {self.role}",
                              unit="batch", mininterval=2):
                batch = self.tokenizer(texts[start: start + self.batch_size], return_tensors="pt", padding=True,
                                       truncation=True).to(self.device)
                ids = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
                out += self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return out


def augment_inputs(cfg: AugmentConfig | None) -> list[str]:
    """Digests of the back-translation model folders, for the tokenize cache key (empty when none)."""
    if cfg is None or cfg.back_translation is None or cfg.back_translation.translator is not None:
        return []
    digests = []
    for role in ("forward", "backward"):
        folder = model_folder(getattr(cfg.back_translation, role), role)
        h = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(path.relative_to(folder).as_posix().encode())
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        digests.append(h.hexdigest())
    return digests
