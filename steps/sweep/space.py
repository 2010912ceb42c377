"""A sweep's search space: which ``PipelineParams`` fields vary, and how, checked against the schema.

    space = SweepSpace.from_yaml("deployments/sweeps/lora-tiny.yaml")
    space.check(params)                       # ConfigError: an unknown path, or a bound the schema refuses
    values = space.suggest(trial)             # {"train.learning_rate": 0.0031, "train.lora.r": 8}
    trial_params = space.apply(params, values)

A space file::

    sampler: tpe                   # tpe (default) or random
    seed: 42
    pruner: {kind: median, startup_trials: 2, warmup_steps: 0}   # median, hyperband or none
    eval_every: 4                  # train.early_stopping.eval_every when the parameters set none
    parameters:
      train.learning_rate: {type: log, low: 1.0e-5, high: 3.0e-2}
      train.lora.r: {type: categorical, choices: [2, 4, 8, 16]}
      train.warmup_steps: {type: int, low: 0, high: 4}
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from steps.config import PipelineParams
from steps.core.contract import StrictModel
from steps.core.errors import ConfigError

Scalar = Union[bool, int, float, str, None]


class FloatRange(StrictModel):
    type: Literal["float"]
    low: float
    high: float
    step: float | None = Field(None, gt=0.0, description="Values low, low + step, ... (not with log).")

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        return self


class LogRange(StrictModel):
    type: Literal["log"]
    low: float = Field(gt=0.0)
    high: float = Field(gt=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> LogRange:
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        return self


class IntRange(StrictModel):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        return self


class Choices(StrictModel):
    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=2)


Distribution = Annotated[Union[FloatRange, LogRange, IntRange, Choices], Field(discriminator="type")]


class PrunerSettings(StrictModel):
    kind: Literal["median", "hyperband", "none"] = Field("median", description="Optuna's MedianPruner, "
                                                         "HyperbandPruner, or no pruning.")
    startup_trials: int = Field(2, ge=0, description="median: trials that complete before any is pruned.")
    warmup_steps: int = Field(0, ge=0, description="median: steps of a trial before it can be pruned.")
    min_resource: int = Field(1, ge=1, description="hyperband: the smallest step a bracket prunes at.")
    reduction_factor: int = Field(3, ge=2, description="hyperband: the share of trials each rung keeps is 1/this.")


class SweepSpace(StrictModel):
    """The search space of ``tuneline sweep``: dotted ``PipelineParams`` paths and their distributions."""

    parameters: dict[str, Distribution] = Field(min_length=1, description="Dotted PipelineParams path -> "
                                                "distribution (float, log, int, categorical).")
    sampler: Literal["tpe", "random"] = Field("tpe", description="Optuna's sampler: TPE, or random search.")
    seed: int | None = Field(None, description="The sampler's seed: the same suggestions for the same seed when "
                             "trials run one at a time (Optuna reseeds the sampler for parallel trials).")
    pruner: PrunerSettings = Field(default_factory=PrunerSettings, description="Which trials stop early.")
    eval_every: int = Field(5, ge=1, description="Steps between a trial's eval-loss reports, when "
                            "train.early_stopping of the parameters is not set.")

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepSpace:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read the space file {path}: {exc}") from exc
        return cls.parse(data, origin=str(path))

    @classmethod
    def parse(cls, data: object, origin: str = "space") -> SweepSpace:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid {origin}: {problems}") from exc

    def check(self, params: PipelineParams) -> None:
        """Every path names a leaf field of ``PipelineParams``, and every bound (each choice) is a value the
        schema accepts with ``params``, and evaluations reach the last step; ConfigError naming the path otherwise."""
        stopping, steps = params.train.early_stopping, params.train.max_steps
        every = stopping.eval_every if stopping else self.eval_every
        name = "train.early_stopping.eval_every" if stopping else "the space's eval_every"
        if steps and "train.max_steps" not in self.parameters and steps % every:
            raise ConfigError(f"space: {name} {every} does not divide train.max_steps {steps}: a trial's value is its "
                              "eval loss at its last evaluation, so its last steps would go unmeasured")
        for path, dist in self.parameters.items():
            field_at(path)
            edges = dist.choices if isinstance(dist, Choices) else [dist.low, dist.high]
            for value in edges:
                try:
                    self.apply(params, {path: value})
                except ConfigError as exc:
                    raise ConfigError(f"space: {path} = {value!r} (a bound of its range) is refused by the "
                                      f"parameters' schema: {exc}") from None

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One value per path from an Optuna trial (named by the path)."""
        values = {}
        for path, d in self.parameters.items():
            if isinstance(d, Choices):
                values[path] = trial.suggest_categorical(path, d.choices)
            elif isinstance(d, IntRange):
                values[path] = trial.suggest_int(path, d.low, d.high, step=d.step, log=d.log)
            else:
                values[path] = trial.suggest_float(path, d.low, d.high, log=isinstance(d, LogRange),
                                                   step=getattr(d, "step", None))
        return values

    def apply(self, params: PipelineParams, values: dict[str, Any]) -> PipelineParams:
        """``params`` with ``values`` set at their dotted paths, validated again."""
        data = params.model_dump(mode="json", by_alias=True)
        for path, value in values.items():
            *parents, leaf = path.split(".")
            node = data
            for part in parents:
                if not isinstance(node.get(part), dict):  # a null section (train.early_stopping): its defaults
                    node[part] = {}
                node = node[part]
            node[leaf] = value
        return PipelineParams.parse(data, origin=f"parameters with {values}")

    def baseline(self, params: PipelineParams) -> dict[str, Any] | None:
        """The parameters' own values of the swept fields, if every one lies in its distribution (the sweep's
        first trial then measures the parameters as given); None otherwise."""
        data = params.model_dump(mode="json", by_alias=True)
        values = {}
        for path, d in self.parameters.items():
            node: Any = data
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None or not _inside(d, node):
                return None
            values[path] = node
        return values


def _inside(d: Any, value: Any) -> bool:
    if isinstance(d, Choices):
        return value in d.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(d, IntRange):
        return isinstance(value, int) and d.low <= value <= d.high and (value - d.low) % d.step == 0
    step = getattr(d, "step", None)
    return d.low <= value <= d.high and (step is None or math.isclose((value - d.low) / step,
                                                                      round((value - d.low) / step)))


def field_at(path: str) -> Any:
    """The pydantic field a dotted path names in ``PipelineParams`` (aliases as in the YAML: ``validate``,
    ``register``); ConfigError for an unknown name or a path that stops at a section."""
    model: Any = PipelineParams
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = {(f.alias or name): f for name, f in model.model_fields.items()}
        where = ".".join(parts[:i]) or "PipelineParams"
        if part not in fields:
            raise ConfigError(f"space: {path!r} names no field: {where} has {', '.join(sorted(fields))}")
        field = fields[part]
        section = _section(field.annotation)
        if i == len(parts) - 1:
            if section is not None:
                raise ConfigError(f"space: {path!r} is a section, not a value: name one of its fields "
                                  f"({', '.join(sorted((f.alias or n) for n, f in section.model_fields.items()))})")
            return field
        if section is None:
            raise ConfigError(f"space: {path!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        model = section
    return None


def _section(annotation: Any) -> type[BaseModel] | None:
    """The model type of a field (also inside Optional), or None for a value."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def with_reports(params: PipelineParams, space: SweepSpace, study: str, number: int) -> PipelineParams:
    """A trial's parameters: its eval losses reported to trial ``number`` of ``study`` (and early stopping on at
    ``space.eval_every`` with a patience no trial reaches, if the parameters set none)."""
    data = copy.deepcopy(params.model_dump(mode="json", by_alias=True))
    stopping = data["train"].get("early_stopping") or {"eval_every": space.eval_every, "patience": 1_000_000}
    data["train"]["early_stopping"] = {**stopping, "trial": {"study": study, "number": number}}
    return PipelineParams.parse(data, origin=f"trial {number}'s parameters")
