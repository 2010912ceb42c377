"""The train/eval split and the checks on it: a seeded hash of each record id (a record stays on its
side when the dataset grows), eval records that nearly copy a train record dropped (or ruled out
by scrub's near dedup), and the gates on both sides being non-empty and on truncation.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from steps.config import TokenizeConfig
from steps.core.errors import DataQualityError
from steps.core.store import ArtifactStore, DatasetRef

log = logging.getLogger(__name__)


def split_records(records: list[dict[str, Any]], cfg: TokenizeConfig) -> dict[str, list[dict[str, Any]]]:
    """Each record on the side its source is pinned to (``split``, ingest.sources[].split), else on the
    side the seeded hash of its id gives."""
    sides: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for record in records:
        sides[record.get("split") or ("eval" if in_eval(record["id"], cfg) else "train")].append(record)
    return sides


def pinned_counts(sides: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """How many records of each side were pinned there by their source: {"pinned_train": n, "pinned_eval": m}."""
    return {f"pinned_{side}": sum(1 for r in rows if "split" in r) for side, rows in sides.items()}


def pinned_stats(counts: dict[str, int]) -> dict[str, Any]:
    """``{"pinned": {"train": n, "eval": m}}`` for the stats when a source was pinned, else nothing."""
    pinned = {side: counts.get(f"pinned_{side}", 0) for side in ("train", "eval")}
    return {"pinned": pinned} if any(pinned.values()) else {}

def in_eval(record_id: str, cfg: TokenizeConfig) -> bool:
    h = hashlib.sha256(f"{cfg.seed}:{record_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < cfg.eval_fraction

LEAKAGE_PERMUTATIONS = 128  # MinHash permutations of the leakage check (steps.text.dedup.LeakageIndex's default)

def leakage_checked_by(cfg: TokenizeConfig, source: DatasetRef, store: ArtifactStore) -> str | None:
    """Which step rules out train/eval leakage: "scrub" when the records come from a scrub whose
    exact and near dedup ran at the leakage threshold with the same MinHash signatures (then no
    two kept records reach the threshold: the later one of any such pair was checked against
    the earlier one, which was indexed, under the same LSH bands, and dropped), "tokenize"
    when this step has to check, None when the check is off."""
    if cfg.leakage_threshold is None:
        return None
    manifest = store.manifest(source.key)
    scrub = manifest.get("config") or {}
    covered = (manifest.get("step") == "scrub" and scrub.get("dedup") is True and scrub.get("near_dedup") is True
               and scrub.get("near_threshold") == cfg.leakage_threshold
               and scrub.get("minhash_permutations") == LEAKAGE_PERMUTATIONS)
    return "scrub" if covered else "tokenize"

def drop_leakage(sides: dict[str, list[dict[str, Any]]], cfg: TokenizeConfig) -> list[tuple[str, str]]:
    """Remove eval records that nearly copy a train record; returns the (eval id, train id) pairs."""
    if cfg.leakage_threshold is None or not sides["eval"]:
        return []
    from steps.text.dedup import leakage, record_text

    pairs = leakage([(r["id"], record_text(r)) for r in sides["train"]],
                    [(r["id"], record_text(r)) for r in sides["eval"]], threshold=cfg.leakage_threshold,
                    num_perm=LEAKAGE_PERMUTATIONS)
    if pairs:
        gone = {eval_id for eval_id, _ in pairs}
        sides["eval"] = [r for r in sides["eval"] if r["id"] not in gone]
        log.info("tokenize: %d eval records dropped as near copies of train records (e.g. %s ~ %s)",
                 len(pairs), *pairs[0])
    return pairs

def check_both_splits(cfg: TokenizeConfig, train: int, evals: int, records: int) -> None:
    if not train or not evals:
        raise DataQualityError(
            f"tokenize: rule 'both splits non-empty': {train} train and {evals} eval "
            f"rows from {records} records (eval_fraction={cfg.eval_fraction}, max_seq_len={cfg.max_seq_len}); "
            "add records or change the fraction"
        )

def check_truncation(cfg: TokenizeConfig, stats: dict[str, Any], records: int) -> None:
    """The truncation-rate gate: too many records cut at max_seq_len means the length is wrong for the data."""
    share = stats.get("truncated", 0) / max(records, 1)
    stats["truncated_share"] = round(share, 4)
    if share > cfg.max_truncated_share:
        raise DataQualityError(
            f"tokenize: rule 'truncated share at most {cfg.max_truncated_share:.0%}': {stats['truncated']} of "
            f"{records} records ({share:.1%}) are longer than max_seq_len={cfg.max_seq_len} tokens; raise "
            "tokenize.max_seq_len or the gate"
        )

def split_summary(stats: dict) -> str:
    """Chat records are truncated rows; text records are packed into blocks; augmented copies are counted."""
    added = f" (incl. {stats['augmentation']['records_added']} augmented)" if "augmentation" in stats else ""
    if "train_documents" in stats:
        return (f"{stats.get('train_documents')}{added} train / {stats.get('eval_documents')} eval documents packed "
                f"into {stats.get('train_records')} / {stats.get('eval_records')} blocks")
    long = ", ".join(f"{stats[k]} {k.replace('_', ' ')}" for k in ("windowed", "dropped_long") if stats.get(k))
    pinned = stats.get("pinned") or {}
    pins = ", ".join(f"{n} pinned to {side}" for side, n in pinned.items() if n)
    return (f"{stats.get('train_records')}{added} train / {stats.get('eval_records')} eval records, "
            f"{stats.get('truncated')} truncated" + (f", {long}" if long else "") + (f" ({pins})" if pins else ""))
