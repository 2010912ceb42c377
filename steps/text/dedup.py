"""Exact and near-duplicate detection for the scrub step, one record at a time.

Usage::

    from steps.text.dedup import NearDuplicates, fingerprint, leakage

    seen, near = set(), NearDuplicates(threshold=0.85)
    for rid, text in records:
        key = fingerprint(text)                   # exact duplicates: a set of keys
        if key in seen or near.check_and_add(rid, text) is not None:
            continue                              # drop it
        seen.add(key)
    stats = near.report()                         # cluster counts and ids, never text
    leaks = leakage(train_pairs, eval_pairs, 0.85)   # [(eval_id, train_id), ...]

Normal forms (both start from Unicode NFKC, then ``str.casefold``):

- exact (``fingerprint``): control and format characters (Cc/Cf, e.g. zero-width
  spaces, BOMs) removed except whitespace, every run of whitespace (any Unicode
  space, tabs, newlines) becomes one space, ends stripped. Punctuation is *kept*:
  in code, math and numbers it carries meaning ("3.14" / "314", "a-b" / "ab"), and
  a punctuation-only edit is caught by ``NearDuplicates`` anyway.
- near (``NearDuplicates``): as exact, and every punctuation character (Unicode
  category P*) becomes a space first, so "Hello, World!" and "hello world" are the
  same text. Symbols (S*: ``$ + < >`` and emoji) are kept.

Near duplicates: MinHash (datasketch's ``affine32`` scheme) over *character*
shingles of the near form: every ``shingle`` consecutive characters, spaces included.
Characters rather than words because Korean (particles glued to words, optional
spacing), Chinese and Japanese have no reliable word boundaries, and a one-character
edit then changes at most ``shingle`` shingles instead of a whole word's. A text
shorter than ``shingle`` characters is one shingle, the whole text (an empty text
too, so all empty texts are duplicates of each other).

Speed: datasketch hashes one shingle per Python call (SHA-1 in ``update_batch``),
so ``MinHash.bulk`` takes ~4x as long per 300-character record as ``signature``
below, normalization included. Instead, each shingle's 32-bit hash is a polynomial over
its code points mixed by the 64-bit MurmurHash3 finalizer, computed for the whole text in a
few numpy operations, then datasketch's affine32 permutations (the same ``a, b`` for
the same seed, the same 32-bit pre-mix) are applied as one (num_perm x shingles)
matrix; the result is bit-for-bit what ``MinHash(num_perm, seed, hashfunc=<that
hash>).update_batch(shingles)`` gives, and is wrapped as a ``LeanMinHash``.

Batches: ``NearDuplicates.check_and_add_many`` and ``leakage`` hash a whole batch of
texts at once (one numpy pass over all their shingles, ``np.minimum.reduceat`` per
text), with the same results as one text at a time.

Index: LSH bands over the signatures, kept compact: each band's rows hash to one 32-bit
key, stored with the kept record's row in sorted numpy runs (8 bytes per band and
record, vs ~5 KB per record in a datasketch ``MinHashLSH``); the signatures themselves
wait in a temporary file until a candidate needs one. Its bands are chosen so that
a pair exactly at the threshold becomes a candidate with probability >= 0.95 (at 0.85 and
128 permutations: 14 bands of 9 rows; the datasketch optimizer's 8 bands of 16 rows make
such a pair a candidate only 46% of the time);
every candidate is then verified with the MinHash Jaccard estimate, so extra
candidates cost time, not precision. Only *kept* records (the first of each cluster)
are indexed: a duplicate always points at a kept record, clusters are stars around
it, and a chain of small edits cannot drift away from the original.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import unicodedata
from array import array
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from steps.core.workers import batches

SCHEME = "affine32"
_BLOCK = 4096            # rows of stored signatures per block (no big copies as the index grows)
_CHUNK = 8192            # shingles per permutation matrix (bounds memory on very long texts)
_MIN_RECALL = 0.95       # LSH candidate probability for a pair exactly at the threshold


# --- normal forms ------------------------------------------------------------------

class _Table(dict):
    """``str.translate`` table filled on first sight of each code point."""

    def __init__(self, punctuation_to_space: bool):
        super().__init__()
        self.punctuation_to_space = punctuation_to_space

    def __missing__(self, cp: int) -> Any:
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if ch.isspace():
            value: Any = " "
        elif cat in ("Cc", "Cf", "Cs"):
            value = None
        elif self.punctuation_to_space and cat[0] == "P":
            value = " "
        else:
            value = cp
        self[cp] = value
        return value


_EXACT = _Table(punctuation_to_space=False)
_NEAR = _Table(punctuation_to_space=True)


def exact_form(text: str) -> str:
    """NFKC, casefold, control/format characters removed, whitespace runs -> one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().translate(_EXACT).split())


def near_form(text: str) -> str:
    """``exact_form`` with every punctuation character (Unicode P*) turned into a space first."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().translate(_NEAR).split())


def fingerprint(text: str) -> str:
    """Exact-duplicate key: SHA-256 hex of ``exact_form(text)``.

    Texts differing only in case, Unicode form (full-width, ligatures), zero-width
    characters or whitespace share a key; punctuation still counts.
    """
    return hashlib.sha256(exact_form(text).encode()).hexdigest()


# --- shingle hashing -----------------------------------------------------------------

_M64 = np.uint64(0x9E3779B97F4A7C15)   # odd multiplier of the polynomial shingle hash
_FMIX64 = (np.uint64(33), np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place on a uint64 array (returned for chaining)."""
    s, m1, m2 = _FMIX64
    h ^= h >> s
    h *= m1
    h ^= h >> s
    h *= m2
    h ^= h >> s
    return h


_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35))


def shingle_hashes(normal: str, shingle: int) -> np.ndarray:
    """32-bit hashes (uint32) of the character shingles of an already normalized text.

    Shingle ``s`` of length ``w`` hashes as ``h = w; h = h * M + ord(c)`` for each
    character (mod 2**64), then the MurmurHash3 64-bit finalizer, top 32 bits. A text
    shorter than ``shingle`` yields one hash, of the whole text. Repeated shingles
    repeat in the output (the minimum is unaffected).
    """
    cps = np.frombuffer(normal.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    width = min(shingle, len(cps))
    n = len(cps) - width + 1
    h = np.full(n, width, dtype=np.uint64)
    for j in range(width):
        h = h * _M64 + cps[j:j + n]
    return (_fmix64(h) >> np.uint64(32)).astype(np.uint32)


def affine32_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's ``affine32`` permutation parameters (``MinHash(num_perm, seed,
    scheme="affine32").permutations`` as uint32): odd multipliers ``a`` and offsets ``b`` drawn
    from ``np.random.RandomState(seed)`` in that order. Computed here so that the data steps and
    their worker processes need not import datasketch (with scipy: ~1 s per process);
    tests/steps/text/test_dedup.py checks them against datasketch itself."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def _lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows): the most rows per band such that P(candidate | J = threshold) >= 0.95."""
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if bands >= 2 and 1 - (1 - threshold ** rows) ** bands >= _MIN_RECALL:
            return bands, rows
    return num_perm, 1


class NearDuplicates:
    """Streaming near-duplicate detector: MinHash over character shingles + LSH.

    ``check_and_add(id, text)`` returns the id of an earlier *kept* record whose
    estimated Jaccard similarity (over the near form's ``shingle``-character
    shingles, ``num_perm`` permutations) is at least ``threshold``, or ``None`` when
    there is none, in which case the record is kept and indexed. When several
    qualify, the most similar wins, ties going to the earliest. Either way the record
    is counted in ``report()``. ``check_and_add_many(ids, texts)`` gives the same
    answers as calling ``check_and_add`` in order, with the hashing done for the whole
    batch at once. Results depend only on the seed, the parameters and the input
    order (not on PYTHONHASHSEED). Record ids are assumed unique; only ids are
    retained, never text.

    Memory per kept record: a 4-byte key and a 4-byte row per band (14 bands at 0.85:
    112 bytes) and its id's bytes + 8; its ``num_perm`` uint32 signature (512 bytes at
    128) goes to a temporary file once its block of 4,096 is full. Duplicates cost their
    id in the cluster lists only.
    """

    def __init__(self, threshold: float = 0.85, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if num_perm < 2:
            raise ValueError("num_perm must be at least 2")
        if shingle < 1:
            raise ValueError("shingle must be at least 1")
        self.threshold, self.num_perm, self.shingle, self.seed = threshold, num_perm, shingle, seed
        a, b = affine32_permutations(num_perm, seed)
        self._a, self._b = a[:, None], b[:, None]
        self.bands, self.rows = _lsh_params(threshold, num_perm)
        self._bands = _BandIndex()
        self._ids = _Ids()                      # row -> id of the kept record
        self._sigs = _Signatures(num_perm)      # row -> its signature (on disk but the newest block)
        self._members: dict[int, list[str]] = {}  # row -> ids of its duplicates, in order
        self.seen = 0

    # signatures

    def signature(self, text: str) -> np.ndarray:
        """MinHash values (uint32, ``num_perm``) of the text's near-form shingles."""
        return self.signatures([text])[0]

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32: ``signature`` of each text, hashed as one batch."""
        forms = [near_form(t) for t in texts]
        out = np.full((len(forms), self.num_perm), np.uint32(0xFFFFFFFF), dtype=np.uint32)
        if not forms:
            return out
        hv, starts = _batch_shingle_hashes(forms, self.shingle)
        s1, m1, s2, m2 = _FMIX32
        hv ^= hv >> s1
        hv *= m1
        hv ^= hv >> s2
        hv *= m2
        hv ^= hv >> s1
        # Column chunks of all texts' shingles: a*h + b mod 2**32, then the minimum per text
        # (np.minimum.reduceat over the text boundaries inside the chunk).
        total = len(hv)
        for c0 in range(0, total, _CHUNK):
            c1 = min(c0 + _CHUNK, total)
            first = int(np.searchsorted(starts, c0, side="right")) - 1
            last = int(np.searchsorted(starts, c1, side="left"))  # texts first..last-1 overlap the chunk
            perm = self._a * hv[c0:c1]
            perm += self._b
            bounds = np.maximum(starts[first:last], c0) - c0
            low = np.minimum.reduceat(perm, bounds, axis=1).T
            np.minimum(out[first:last], low, out=out[first:last])
        return out

    def minhash(self, text: str) -> Any:
        """The text's signature as a datasketch ``LeanMinHash`` (scheme ``affine32``)."""
        from datasketch import LeanMinHash

        return LeanMinHash(seed=self.seed, hashvalues=self.signature(text), scheme=SCHEME)

    def _band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """(n, bands) uint64: a 64-bit hash of each band's rows, the band number mixed in."""
        n = len(sigs)
        v = sigs[:, : self.bands * self.rows].reshape(n, self.bands, self.rows).astype(np.uint64)
        h = np.broadcast_to(np.arange(1, self.bands + 1, dtype=np.uint64) * _M64, (n, self.bands)).copy()
        for j in range(self.rows):
            h *= _M64
            h += v[:, :, j]
        return _fmix64(h)

    def _best(self, sig: np.ndarray, candidates: Iterable[int]) -> int | None:
        """Row of the most similar candidate at or above the threshold (earliest on ties)."""
        best, best_sim = None, -1.0
        for row in sorted(set(candidates)):
            sim = np.count_nonzero(self._sigs[row] == sig) / self.num_perm
            if sim >= self.threshold and sim > best_sim:
                best, best_sim = row, sim
        return best

    def _store(self, record_id: str, sig: np.ndarray) -> int:
        row = len(self._ids)
        self._sigs.append(sig)
        self._ids.append(record_id)
        return row

    def close(self) -> None:
        """Deletes the signature file now (it goes anyway when the object is collected)."""
        self._sigs.close()

    def _match_batch(self, ids: list[str], sigs: np.ndarray, add: bool) -> list[int | None]:
        """Per record, the matched row or None; with ``add``, unmatched records are indexed in
        order, so a later record of the batch can match an earlier one (as one by one)."""
        keys = self._band_keys(sigs)
        outside = self._bands.lookup(keys)                # record -> rows indexed before the batch
        inside = _shared_keys(keys) if add else {}         # record -> earlier records of the batch
        batch_row: dict[int, int] = {}                     # batch position -> row, for kept records
        result: list[int | None] = []
        kept: list[int] = []
        for i, record_id in enumerate(ids):
            candidates = list(outside.get(i, ()))
            candidates += [batch_row[j] for j in inside.get(i, ()) if j in batch_row]
            row = self._best(sigs[i], candidates) if candidates else None
            result.append(row)
            if row is None and add:
                batch_row[i] = self._store(record_id, sigs[i])
                kept.append(i)
        if add and kept:
            self._bands.add(keys[kept], np.array([batch_row[i] for i in kept], dtype=np.uint32))
        return result

    # public API

    def check_and_add(self, record_id: str, text: str) -> str | None:
        """Id of the earlier kept record this text near-duplicates, else ``None`` (and index it)."""
        return self.check_and_add_many([record_id], [text])[0]

    def check_and_add_many(self, ids: list[str], texts: list[str]) -> list[str | None]:
        """``check_and_add`` for each (id, text) in order, hashed as one batch."""
        return self.check_and_add_signatures(ids, self.signatures(texts))

    def check_and_add_signatures(self, ids: list[str], sigs: np.ndarray) -> list[str | None]:
        """``check_and_add_many`` with the texts' ``signatures`` computed elsewhere (a worker process)."""
        rows = self._match_batch(ids, sigs, add=True)
        self.seen += len(ids)
        out: list[str | None] = []
        for record_id, row in zip(ids, rows):
            if row is not None:
                self._members.setdefault(row, []).append(record_id)
            out.append(None if row is None else self._ids[row])
        return out

    @property
    def removed(self) -> int:
        """Records reported as duplicates so far."""
        return self.seen - len(self._ids)

    def report(self, top: int = 10, max_ids: int = 20) -> dict[str, Any]:
        """Cluster summary with record ids only, never text.

        ``clusters`` counts groups of two or more records (a kept record and its
        duplicates); ``cluster_sizes`` is their size histogram (JSON-stable string
        keys, ascending); ``largest`` lists the ``top`` largest (ties: earliest kept
        record first), each ``{"size", "ids"}`` with the kept id first and at most
        ``max_ids`` ids.
        """
        sizes = Counter(len(dups) + 1 for dups in self._members.values())
        largest = sorted(self._members.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]
        return {
            "records": self.seen,
            "kept": len(self._ids),
            "removed": self.removed,
            "clusters": len(self._members),
            "cluster_sizes": {str(size): sizes[size] for size in sorted(sizes)},
            "largest": [{"size": len(dups) + 1, "ids": ([self._ids[row]] + dups)[:max_ids]}
                        for row, dups in largest],
            "threshold": self.threshold,
            "num_perm": self.num_perm,
            "shingle": self.shingle,
            "lsh_bands": self.bands,
            "lsh_rows": self.rows,
        }


def _batch_shingle_hashes(forms: list[str], shingle: int) -> tuple[np.ndarray, np.ndarray]:
    """All texts' ``shingle_hashes`` concatenated, and where each text's hashes start."""
    lengths = np.fromiter((len(f) for f in forms), dtype=np.int64, count=len(forms))
    counts = np.maximum(lengths - shingle + 1, 1)  # a text shorter than a shingle is one
    starts = np.zeros(len(forms), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    cps = np.frombuffer("".join(forms).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = len(cps) - shingle + 1
    if n > 0:  # the hash of every window of the joined text; windows inside one text are kept
        h = np.full(n, shingle, dtype=np.uint64)
        for j in range(shingle):
            h *= _M64
            h += cps[j:j + n]
        windows = (_fmix64(h) >> np.uint64(32)).astype(np.uint32)
    else:
        windows = np.empty(0, dtype=np.uint32)
    text_starts = np.zeros(len(forms), dtype=np.int64)
    np.cumsum(lengths[:-1], out=text_starts[1:])
    total = int(counts.sum())
    # Output position p of a text's k-th shingle is starts[i] + k; its window in the joined
    # text starts at text_starts[i] + k.
    source = np.arange(total, dtype=np.int64) + np.repeat(text_starts - starts, counts)
    long_enough = lengths >= shingle
    is_long = np.repeat(long_enough, counts)
    out = np.empty(total, dtype=np.uint32)
    out[is_long] = windows[source[is_long]]
    for i in np.flatnonzero(~long_enough):  # shorter than a shingle: one hash of the whole text
        out[starts[i]] = shingle_hashes(forms[i], shingle)[0]
    return out, starts


def _shared_keys(keys: np.ndarray) -> dict[int, list[int]]:
    """Record -> earlier records of the same batch that share a band key with it."""
    n, bands = keys.shape
    flat = keys.ravel()
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    pairs: dict[int, list[int]] = {}
    if len(same) == 0:
        return pairs
    records = order // bands
    # runs of equal keys: every later member pairs with every earlier one (runs are short)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(ordered)]
    for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        members = sorted(set(records[s:e].tolist()))
        for k, later in enumerate(members):
            if k:
                pairs.setdefault(later, []).extend(members[:k])
    return pairs


class SortedRuns:
    """Key -> values (uint32) as sorted numpy runs, merged LSM-style so that adding is cheap and a
    lookup searches a few runs. A run merges into the one before it while that one is at most twice
    its size, and never beyond ``max_run`` entries: no merge copies more than ``2 * max_run``
    entries, however large the index grows (``_merge``: no argsort). Equal keys keep the order
    they were added in. ``key_dtype`` bytes + 4 per entry."""

    def __init__(self, key_dtype: Any = np.uint64, max_run: int = 1 << 21) -> None:
        self.key_dtype, self.max_run = np.dtype(key_dtype), max_run
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(keys.nbytes + values.nbytes for keys, values in self._runs)

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=self.key_dtype).ravel()
        values = np.asarray(values, dtype=np.uint32).ravel()
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        self._runs.append((keys[order], values[order]))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]) \
                and len(self._runs[-2][0]) + len(self._runs[-1][0]) <= self.max_run:
            later, earlier = self._runs.pop(), self._runs.pop()
            self._runs.append(_merge(earlier, later))

    def find(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query positions, values) of every entry whose key equals a query, earliest added first
        for each query."""
        queries = np.asarray(queries, dtype=self.key_dtype).ravel()
        # The queries in key order: the binary searches then walk each run once, in order,
        # instead of jumping across it (several times faster on an index of millions of keys).
        order = np.argsort(queries, kind="stable")
        ordered = queries[order]
        found_q: list[np.ndarray] = []
        found_v: list[np.ndarray] = []
        for run_keys, run_values in self._runs:
            left = np.searchsorted(run_keys, ordered, side="left")
            right = np.searchsorted(run_keys, ordered, side="right")
            counts = right - left
            hits = np.flatnonzero(counts)
            if not len(hits):
                continue
            n = counts[hits]
            # every entry of each hit's range: its start repeated, plus 0..n-1
            idx = np.repeat(left[hits] - np.cumsum(np.r_[0, n[:-1]]), n) + np.arange(int(n.sum()))
            found_q.append(np.repeat(order[hits], n))
            found_v.append(run_values[idx])
        if not found_q:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.uint32)
        positions, values = np.concatenate(found_q), np.concatenate(found_v)
        by_query = np.argsort(positions, kind="stable")  # runs are oldest first: stays earliest first
        return positions[by_query], values[by_query]


def _merge(earlier: tuple[np.ndarray, np.ndarray], later: tuple[np.ndarray, np.ndarray]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted runs as one, the earlier run's entries first among equal keys."""
    (k1, v1), (k2, v2) = earlier, later
    at = np.searchsorted(k1, k2, side="right") + np.arange(len(k2))  # where the later entries go
    keys, values = np.empty(len(k1) + len(k2), k1.dtype), np.empty(len(k1) + len(k2), v1.dtype)
    rest = np.ones(len(keys), dtype=bool)
    rest[at] = False
    keys[at], values[at] = k2, v2
    keys[rest], values[rest] = k1, v1
    return keys, values


class _BandIndex:
    """LSH band key -> rows of the kept records: 32-bit keys (the top half of each band's 64-bit
    hash) in ``SortedRuns``, 8 bytes per band and record. A key shared by chance makes an extra
    candidate, which the signature comparison then rejects: it costs a lookup, never a wrong
    answer (about 4% of records get one at a million kept records)."""

    def __init__(self) -> None:
        self._runs = SortedRuns(np.uint32)

    @property
    def nbytes(self) -> int:
        return self._runs.nbytes

    @staticmethod
    def _short(keys: np.ndarray) -> np.ndarray:
        return (keys >> np.uint64(32)).astype(np.uint32)

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        self._runs.add(self._short(keys), np.repeat(rows, keys.shape[1]))

    def lookup(self, keys: np.ndarray) -> dict[int, list[int]]:
        """Record (row of ``keys``) -> indexed rows sharing one of its band keys."""
        positions, rows = self._runs.find(self._short(keys))
        found: dict[int, list[int]] = {}
        for record, row in zip((positions // keys.shape[1]).tolist(), rows.tolist()):
            found.setdefault(record, []).append(row)
        return found


class _Signatures:
    """The kept records' signatures by row: the newest block in memory, full blocks appended to an
    unlinked temporary file and read back a row at a time (``os.pread``, not mapped, so they count
    as disk and page cache, not as this process's memory). Only candidates are read back."""

    def __init__(self, num_perm: int) -> None:
        self._tail = np.empty((_BLOCK, num_perm), dtype=np.uint32)
        self._width = num_perm * 4
        self._count = 0
        self._on_disk = 0
        self._file: Any = None

    def __len__(self) -> int:
        return self._count

    def append(self, sig: np.ndarray) -> None:
        self._tail[self._count - self._on_disk] = sig
        self._count += 1
        if self._count - self._on_disk == _BLOCK:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="tuneline-minhash-")  # gone when closed
            data, offset = memoryview(self._tail).cast("B"), self._on_disk * self._width
            while data:  # a short write continues where it stopped
                written = os.pwrite(self._file.fileno(), data, offset)
                data, offset = data[written:], offset + written
            self._on_disk += _BLOCK

    def __getitem__(self, row: int) -> np.ndarray:
        if row >= self._on_disk:
            return self._tail[row - self._on_disk]
        data = os.pread(self._file.fileno(), self._width, row * self._width)
        return np.frombuffer(data, dtype=np.uint32)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _Ids:
    """Record ids by row: their UTF-8 bytes end to end and the end offsets (len(id) + 8 bytes each,
    against ~60 + len for a list of str)."""

    def __init__(self) -> None:
        self._bytes = bytearray()
        self._ends = array("Q")

    def __len__(self) -> int:
        return len(self._ends)

    def append(self, record_id: str) -> None:
        self._bytes += record_id.encode()
        self._ends.append(len(self._bytes))

    def __getitem__(self, row: int) -> str:
        return self._bytes[self._ends[row - 1] if row else 0:self._ends[row]].decode()


def leakage(train: Iterable[tuple[str, str]], eval: Iterable[tuple[str, str]],  # noqa: A002
            threshold: float = 0.85, *, num_perm: int = 128, shingle: int = 5,
            seed: int = 1, batch: int = 4096) -> list[tuple[str, str]]:
    """``(eval_id, train_id)`` for every eval record near-duplicating a train record.

    Every train record is indexed (train duplicates among themselves are not
    collapsed, so a match with any of them counts); each eval record is paired with
    its most similar train record at or above ``threshold`` (earliest on ties).
    Eval records are not compared with each other. Pairs come in eval order.
    """
    index = LeakageIndex(threshold, num_perm=num_perm, shingle=shingle, seed=seed)
    for part in batches(train, batch):
        index.add(part)
    pairs = []
    for part in batches(eval, batch):
        pairs += index.matches(part)
    return pairs


class LeakageIndex:
    """``leakage`` in two streaming halves: ``add`` train (id, text) batches, then ``matches``
    for eval batches. Memory: a signature and the band keys per train record, no text."""

    def __init__(self, threshold: float = 0.85, *, num_perm: int = 128, shingle: int = 5, seed: int = 1):
        self._index = NearDuplicates(threshold, num_perm=num_perm, shingle=shingle, seed=seed)

    def add(self, train: list[tuple[str, str]]) -> None:
        if train:
            self.add_signatures([i for i, _ in train], self._index.signatures([text for _, text in train]))

    def add_signatures(self, ids: list[str], sigs: np.ndarray) -> None:
        """``add`` with the texts' ``NearDuplicates.signatures`` computed elsewhere (a worker process)."""
        if not ids:
            return
        index = self._index
        rows = np.array([index._store(record_id, sig) for record_id, sig in zip(ids, sigs)], dtype=np.uint32)
        index._bands.add(index._band_keys(sigs), rows)

    def matches(self, eval: list[tuple[str, str]]) -> list[tuple[str, str]]:  # noqa: A002
        """``(eval_id, train_id)`` for the eval records of this batch that copy a train record."""
        if not eval:
            return []
        return self.matches_signatures([i for i, _ in eval], self._index.signatures([t for _, t in eval]))

    def matches_signatures(self, ids: list[str], sigs: np.ndarray) -> list[tuple[str, str]]:
        """``matches`` with the texts' signatures computed elsewhere (a worker process)."""
        if not ids:
            return []
        index = self._index
        matched = index._match_batch(ids, sigs, add=False)
        return [(record_id, index._ids[row]) for record_id, row in zip(ids, matched) if row is not None]


def record_text(record: dict[str, Any]) -> str:
    """The content of a record that duplicates are judged on: every message (chat), the text
    (text, classification, regression), prompt, chosen and rejected (preference) or input and target (seq2seq)."""
    if "messages" in record:
        return "\n".join(str(m.get("content") or "") + (json.dumps(m["tool_calls"], ensure_ascii=False)
                                                      if m.get("tool_calls") else "") for m in record["messages"])
    if "prompt" in record:
        return "\n".join(str(record.get(k, "")) for k in ("prompt", "chosen", "rejected", "answer") if k in record)
    if "target" in record:
        return f"{record.get('input', '')}\n{record['target']}"
    return str(record.get("text", ""))

