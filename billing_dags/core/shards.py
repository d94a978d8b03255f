"""Shards by customer: the one place that decides which shard a customer, a series or an event is in.

With ``BILLING_SHARDS=N`` (N > 1) a day's raw samples, series, carry-in and events, and the daily models
computed from them, are split into N shards. A series goes to the shard of its customer's label value
(the value of the customer label of the meter its metric belongs to, ``seeds/meters.csv``); a series
that no meter maps, or that lacks that label, goes to a shard by its series id; an event goes to the
shard of its ``customer_key`` (the same label value). So every customer's series and events are in one
shard and per-customer results (counter sums, gauge integrals, the peak of the customer's sum) need
no merge across shards: the shards of a day concatenate to the day.

The hash is stable across processes, machines and versions (BLAKE2b of the UTF-8 value, not
Python's ``hash``), so any writer (simulation, Prometheus pull, remote-write compaction, events)
puts a customer in the same shard. N = 1 (the default) is the unsharded layout, unchanged.

Layout with N > 1 (``shard=<key>-of-<N>`` below each day folder; the N in the name keeps files
written with another N out of every read):

    raw/samples/date=D/shard=3-of-8/part-<source>.parquet   (and raw/series, raw/carry_in, raw/events)
    models/<daily model>/day=D/shard=3-of-8/data.parquet      (monthly models are not sharded)
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

_SHARD_DIR_RE = re.compile(r"^shard=(\d+)-of-(\d+)$")


@dataclass(frozen=True, order=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    @property
    def key(self) -> str:
        """The shard's Dagster partition key: its index, zero-padded to the width of the largest."""
        return str(self.index).zfill(len(str(self.count - 1)))

    @property
    def dirname(self) -> str:
        """The folder of the shard under a day's folder."""
        return f"shard={self.key}-of-{self.count}"

    def __str__(self) -> str:
        return f"shard {self.key} of {self.count}"


def all_shards(count: int) -> list[Shard]:
    return [Shard(i, count) for i in range(count)]


def shard_keys(count: int) -> list[str]:
    """The partition keys of the shard dimension, in order."""
    return [s.key for s in all_shards(count)]


def shard_from_key(key: str, count: int) -> Shard:
    index = int(key)
    if not 0 <= index < count or Shard(index, count).key != key:
        raise ValueError(f"shard key {key!r} is not one of the {count} shards ({', '.join(shard_keys(count)[:3])}, ...)")
    return Shard(index, count)


def shard_of_dir(name: str) -> Shard | None:
    """The shard a folder name ``shard=K-of-N`` is, else None."""
    m = _SHARD_DIR_RE.match(name)
    return Shard(int(m.group(1)), int(m.group(2))) if m else None


def label_hash(value: str) -> int:
    """A stable 64-bit (unsigned) hash of a customer's label value."""
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")


def shard_of(label_value: str, count: int) -> int:
    """The shard index of a customer, by its label value (seeds/customers.csv ``label_value``)."""
    return label_hash(label_value) % count if count > 1 else 0


def shard_of_series_id(series_id: int, count: int) -> int:
    """The shard index of a series that no meter maps to a customer label: by its series id."""
    return int(series_id) % count if count > 1 else 0


def series_shard(metric: str, labels, series_id: int, customer_label_of: dict[str, str], count: int, cache: dict[str, int] | None = None) -> int:
    """The shard index of one series (metric, labels as a mapping or pairs, series id): its customer label
    value's shard when ``customer_label_of`` (metric -> the customer label of its meter) maps its metric and
    the series has that label, else its series id's shard. ``cache`` keeps label values' shards."""
    if count <= 1:
        return 0
    name = customer_label_of.get(metric)
    value = None if name is None else (labels if isinstance(labels, dict) else dict(labels)).get(name)
    if value is None:
        return shard_of_series_id(series_id, count)
    if cache is None:
        return shard_of(value, count)
    s = cache.get(value)
    if s is None:
        s = cache[value] = shard_of(value, count)
    return s


def series_shards(metrics, labels, series_ids, customer_label_of: dict[str, str], count: int) -> np.ndarray:
    """The shard index of each series (``series_shard`` of each)."""
    out = np.zeros(len(series_ids), dtype=np.int64)
    if count <= 1:
        return out
    cache: dict[str, int] = {}
    for i, (metric, labs, sid) in enumerate(zip(metrics, labels, series_ids)):
        out[i] = series_shard(metric, labs, sid, customer_label_of, count, cache)
    return out
