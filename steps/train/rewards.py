"""Reward functions of online RL (train.rl.rewards, evaluate.rewards): built-ins and your own callables,
summed with their weights.

    rewards = build_rewards([RewardSpec(function="exact_match"), RewardSpec(function="mypkg.r:brevity", weight=0.2)])
    total, per_function = score(rewards, prompts, completions, records)

Every reward is a callable ``(prompts, completions, records) -> one number per completion``: ``prompts`` the
prompt texts, ``completions`` the decoded answers, ``records`` the prompt rows (``id``, ``prompt``,
``answer`` when the record has one). The built-ins:

- ``exact_match``: 1.0 when the answer equals the record's ``answer`` (both stripped of surrounding
  whitespace and a final period; two numbers compare as numbers: "42.0" matches "42"), else 0.0; a
  record without an answer is an error naming it;
- ``number_match``: 1.0 when the last number in the answer equals the record's (numeric) answer ("14 - 2 =
  12" matches "12"), else 0.0: partial credit for a right result said in a sentence;
- ``regex``: 1.0 when ``pattern`` is found in the answer (``re.search``), else 0.0;
- ``json``: 1.0 when the answer (stripped) parses as JSON, else 0.0;
- ``length``: 1.0 when the answer's length in characters is within ``min_chars``..``max_chars``, else 0.0;
- ``model``: the score of a registered reward model (``model: models:/NAME@ALIAS``) for prompt + answer,
  encoded as its training pairs were; its files are checked against the digests recorded at registration,
  and a run pins the alias to one version when it starts (``pin_models``).

``module:function`` is imported by path (the callable itself, or a class/factory is not called for you);
a reward that raises, returns the wrong number of values or a value that is not a finite number is a
``ConfigError`` naming the function (and the position of the bad value).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from steps.config import RewardSpec
from steps.core.errors import ConfigError

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str], list[dict[str, Any]]], Sequence[Any]]


@dataclass(frozen=True)
class Reward:
    name: str
    weight: float
    fn: RewardFn


def _clean(text: str) -> str:
    text = text.strip()
    return text[:-1].strip() if text.endswith(".") else text


def _number(text: str) -> float | None:
    try:
        value = float(text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def exact_match(prompts: list[str], completions: list[str], records: list[dict[str, Any]]) -> list[float]:
    out = []
    for completion, record in zip(completions, records):
        if record.get("answer") is None:
            raise ConfigError(f"reward exact_match: record {record.get('id')!r} has no answer to match")
        got, want = _clean(completion), _clean(str(record["answer"]))
        a, b = _number(got), _number(want)
        out.append(1.0 if (got == want or (a is not None and b is not None and a == b)) else 0.0)
    return out


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def number_match(prompts: list[str], completions: list[str], records: list[dict[str, Any]]) -> list[float]:
    out = []
    for completion, record in zip(completions, records):
        want = _number(_clean(str(record.get("answer", ""))))
        if want is None:
            raise ConfigError(f"reward number_match: record {record.get('id')!r} has no numeric answer")
        found = NUMBER.findall(completion.replace(",", ""))
        out.append(1.0 if found and float(found[-1]) == want else 0.0)
    return out


def regex(pattern: str) -> RewardFn:
    compiled = re.compile(pattern)

    def reward(prompts: list[str], completions: list[str], records: list[dict[str, Any]]) -> list[float]:
        return [1.0 if compiled.search(c) else 0.0 for c in completions]

    return reward


def valid_json(prompts: list[str], completions: list[str], records: list[dict[str, Any]]) -> list[float]:
    out = []
    for completion in completions:
        try:
            json.loads(completion.strip())
            out.append(1.0)
        except ValueError:
            out.append(0.0)
    return out


def length_window(low: int, high: int | None) -> RewardFn:
    def reward(prompts: list[str], completions: list[str], records: list[dict[str, Any]]) -> list[float]:
        return [1.0 if low <= len(c) and (high is None or len(c) <= high) else 0.0 for c in completions]

    return reward


def load_callable(path: str) -> RewardFn:
    """``module:function`` -> the callable; a ConfigError naming it when it cannot be imported."""
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"reward {path!r} cannot be loaded: {type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise ConfigError(f"reward {path!r} is not callable")
    return obj


def model_reward(uri: str, device: str) -> RewardFn:
    """The score of the registered reward model ``uri`` (models:/NAME@ALIAS or models:/NAME/VERSION) for each
    (prompt, completion), encoded as its training pairs were; every file checked against the digests recorded
    at registration. A ConfigError when the version is not a reward model."""
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    from steps.register.verify import pyfunc_config, verified_base_dir, verified_model_dir
    from steps.train import methods
    from steps.train.reward import score_items

    spec = uri.removeprefix("models:/")
    with tempfile.TemporaryDirectory(prefix="tuneline-reward-") as tmp:
        folder = verified_model_dir(spec, Path(tmp))
        config = pyfunc_config(folder)
        trained = folder / "artifacts" / "trained"
        if "base_model_uri" not in config or not trained.is_dir() or methods.task_of(trained).kind != "reward":
            raise ConfigError(f"reward model {uri}: not a tuneline reward model (train.preference.loss 'reward')")
        net = methods.load(verified_base_dir(config, Path(tmp)), trained, device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder / "artifacts" / "tokenizer")
    tokenizer.padding_side = "right"
    pair_input, max_seq_len = config.get("pair_input", "chat"), int(config.get("max_seq_len", 256))

    def reward(prompts: list[str], completions: list[str], records: list[dict[str, Any]]) -> list[float]:
        return score_items(net, tokenizer, list(zip(prompts, completions)), pair_input, max_seq_len, device)

    return reward


def pin_models(specs: Sequence[RewardSpec]) -> list[RewardSpec]:
    """``specs`` with each model reward's alias replaced by the version it names now (models:/NAME/N), so a
    run scores with one version from start to end and its parameters say which."""
    from steps.core.model_source import parse_source
    from steps.register.verify import resolve

    pinned = []
    for spec in specs:
        if spec.model is not None and (source := parse_source(spec.model)).version is None:
            version = resolve(f"{source.name}@{source.ref}")
            spec = spec.model_copy(update={"model": f"models:/{source.name}/{version.version}"})
        pinned.append(spec)
    return pinned


def pin_reward_models(params: Any) -> Any:
    """``params`` (PipelineParams) with the model rewards of training and evaluation pinned (``pin_models``):
    what a flow run does first, so every step of the run scores with the same reward model version."""
    rl, evaluate = params.train.rl, params.evaluate
    if not any(spec.model for spec in [*rl.rewards, *(evaluate.rewards or [])]):
        return params
    train = params.train.model_copy(update={"rl": rl.model_copy(update={"rewards": pin_models(rl.rewards)})})
    if evaluate.rewards:
        evaluate = evaluate.model_copy(update={"rewards": pin_models(evaluate.rewards)})
    pinned = params.model_copy(update={"train": train, "evaluate": evaluate})
    for spec in [*pinned.train.rl.rewards, *(pinned.evaluate.rewards or [])]:
        if spec.model:
            log.info("rewards: scoring with the reward model %s for this run", spec.model)
    return pinned


def build_rewards(specs: Sequence[RewardSpec], device: str = "cpu") -> list[Reward]:
    """The reward callables of ``specs`` (a model reward loads its model onto ``device``)."""
    rewards = []
    for spec in specs:
        if spec.function == "exact_match":
            fn: RewardFn = exact_match
        elif spec.function == "number_match":
            fn = number_match
        elif spec.function == "regex":
            fn = regex(spec.pattern or "")
        elif spec.function == "json":
            fn = valid_json
        elif spec.function == "length":
            fn = length_window(spec.min_chars, spec.max_chars)
        elif spec.function == "model":
            fn = model_reward(spec.model or "", device)
        else:
            fn = load_callable(spec.function)
        rewards.append(Reward(spec.function, spec.weight, fn))
    return rewards


def score(rewards: Sequence[Reward], prompts: list[str], completions: list[str], records: list[dict[str, Any]]
          ) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted sum per completion, and each function's own values (by name)."""
    per_function: dict[str, list[float]] = {}
    total = [0.0] * len(completions)
    for reward in rewards:
        try:
            values = list(reward.fn(prompts, completions, records))
        except ConfigError:
            raise
        except Exception as exc:  # a user's function: name it, keep the cause
            raise ConfigError(f"reward function {reward.name!r} raised {type(exc).__name__}: {exc}") from exc
        if len(values) != len(completions):
            raise ConfigError(f"reward function {reward.name!r} returned {len(values)} values for "
                              f"{len(completions)} completions")
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
                raise ConfigError(f"reward function {reward.name!r} returned {value!r} for completion {i}: "
                                  "expected a finite number")
        name = reward.name if reward.name not in per_function else f"{reward.name}#{len(per_function)}"
        per_function[name] = [float(v) for v in values]
        total = [t + reward.weight * float(v) for t, v in zip(total, values)]
    return total, per_function
