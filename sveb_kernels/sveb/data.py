"""The SVEB data format: prompts, their rollouts, and states with ground-truth values.

A dataset is a directory holding

    meta.json          what built it: {"format": "sveb-1", "model": ..., "value_kind": ..., ...}
    groups.jsonl       one JSON object per prompt (or groups.parquet: the same records as rows)

and each record (a *group*: one prompt and its G rollouts) is

    {"prompt_id": "arith-000012",        unique string
     "split": "eval",                    "train" (estimators may fit on it) or "eval" (scored)
     "prompt": "Compute: 12 + 7\\n",     optional text
     "answer": "19",                     optional reference answer (what the reward compares to)
     "prompt_ids": [364, 25, ...],       the prompt's token ids
     "rollouts": [
        {"response_ids": [...],          the sampled response's token ids (the EOS token included if sampled)
         "reward": 1.0,                  the rollout's return
         "text": "...",                  optional decoded response
         "states": {"position": [0, 5, ...],   index t into response_ids: the state after token t
                    "value": [0.62, ...],      ground-truth value of that state
                    "samples": [16, ...]}},    Monte-Carlo continuations behind `value`; 0 = exact
        ...]}

A state (rollout, t) is the prefix prompt_ids + response_ids[: t + 1], the context a per-token value
estimate at token t sees (as in docs/CONTRACT.md §2c: the value at token t includes token t). docs/SVEB.md has
the long version. `meta.json` is optional when reading; a single .jsonl/.parquet file is accepted too.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

FORMAT = "sveb-1"
SPLITS = ("train", "eval")
META_FILE = "meta.json"
GROUPS_JSONL = "groups.jsonl"
GROUPS_PARQUET = "groups.parquet"


@dataclass
class States:
    position: list[int] = field(default_factory=list)
    value: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)


@dataclass
class Rollout:
    response_ids: list[int]
    reward: float
    states: States = field(default_factory=States)
    text: Optional[str] = None


@dataclass
class Group:
    prompt_id: str
    prompt_ids: list[int]
    rollouts: list[Rollout]
    split: str = "eval"
    prompt: Optional[str] = None
    answer: Optional[str] = None


@dataclass
class Dataset:
    groups: list[Group]
    meta: dict = field(default_factory=dict)
    path: Optional[Path] = None  # the directory it was read from, for paths in meta relative to it

    def split(self, name: str) -> list[Group]:
        return [g for g in self.groups if g.split == name]

    def resolve(self, key: str) -> Optional[str]:
        """meta[key] as a path, relative paths taken from the dataset directory."""
        value = self.meta.get(key)
        if value is None or self.path is None or os.path.isabs(value):
            return value
        candidate = self.path / value
        return str(candidate) if candidate.exists() else value


def group_to_record(group: Group) -> dict:
    record = {"prompt_id": group.prompt_id, "split": group.split, "prompt": group.prompt,
              "answer": group.answer, "prompt_ids": list(group.prompt_ids), "rollouts": []}
    for r in group.rollouts:
        record["rollouts"].append({
            "response_ids": list(r.response_ids), "reward": float(r.reward), "text": r.text,
            "states": {"position": list(r.states.position), "value": list(r.states.value),
                       "samples": list(r.states.samples)},
        })
    return record


def _where(prompt_id, i=None) -> str:
    return f"group {prompt_id!r}" + ("" if i is None else f", rollout {i}")


def record_to_group(record: dict) -> Group:
    """Parses and checks one record; ValueError says which group and field is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a group record must be a JSON object, got {type(record).__name__}")
    for key in ("prompt_id", "prompt_ids", "rollouts"):
        if key not in record:
            raise ValueError(f"group record is missing {key!r}: {str(record)[:120]}")
    pid = str(record["prompt_id"])
    split = record.get("split") or "eval"
    if split not in SPLITS:
        raise ValueError(f"{_where(pid)}: split must be one of {SPLITS}, got {split!r}")
    rollouts = []
    for i, r in enumerate(record["rollouts"]):
        response = [int(t) for t in r["response_ids"]]
        reward = float(r["reward"])
        if not math.isfinite(reward):
            raise ValueError(f"{_where(pid, i)}: reward must be finite, got {reward}")
        raw = r.get("states") or {}
        states = States([int(p) for p in raw.get("position", [])], [float(v) for v in raw.get("value", [])],
                        [int(s) for s in raw.get("samples", [])])
        if not len(states.position) == len(states.value) == len(states.samples):
            raise ValueError(f"{_where(pid, i)}: states.position, .value and .samples must have equal lengths")
        for p, v, s in zip(states.position, states.value, states.samples):
            if not 0 <= p < len(response):
                raise ValueError(f"{_where(pid, i)}: state position {p} outside the response (length {len(response)})")
            if not math.isfinite(v) or s < 0:
                raise ValueError(f"{_where(pid, i)}: state at {p} has value {v}, samples {s} (finite, >= 0 expected)")
        if len(set(states.position)) != len(states.position):
            raise ValueError(f"{_where(pid, i)}: state positions repeat")
        rollouts.append(Rollout(response, reward, states, r.get("text")))
    return Group(pid, [int(t) for t in record["prompt_ids"]], rollouts, split, record.get("prompt"),
                 None if record.get("answer") is None else str(record["answer"]))


def iter_jsonl(path: Union[str, Path], *, tolerate_torn_tail: bool = False) -> Iterator[dict]:
    """Records of a JSONL file; with tolerate_torn_tail an unparsable *last* line (a write cut short
    by a crash) is skipped instead of raising."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_torn_tail and n == len(lines) - 1:
                return
            raise ValueError(f"{path}:{n + 1}: not valid JSON ({e})") from None


def _groups_file(path: Path) -> Path:
    if path.is_dir():
        for name in (GROUPS_JSONL, GROUPS_PARQUET):
            if (path / name).exists():
                return path / name
        raise FileNotFoundError(f"{path} holds neither {GROUPS_JSONL} nor {GROUPS_PARQUET}")
    return path


def load_dataset(path: Union[str, Path]) -> Dataset:
    """Reads a dataset directory (or a single groups .jsonl/.parquet file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no SVEB dataset at {path}")
    groups_file = _groups_file(path)
    if groups_file.suffix == ".parquet":
        records: Iterable[dict] = _read_parquet(groups_file)
    else:
        records = iter_jsonl(groups_file)
    groups = [record_to_group(r) for r in records]
    seen: set[str] = set()
    for g in groups:
        if g.prompt_id in seen:
            raise ValueError(f"prompt_id {g.prompt_id!r} appears twice in {groups_file}")
        seen.add(g.prompt_id)
    meta = {}
    meta_path = (path if path.is_dir() else path.parent) / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return Dataset(groups, meta, path if path.is_dir() else path.parent)


def save_dataset(dataset: Dataset, path: Union[str, Path], *, fmt: str = "jsonl") -> Path:
    """Writes `dataset` as a directory (meta.json + groups.jsonl or groups.parquet)."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"fmt must be 'jsonl' or 'parquet', got {fmt!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_meta(path, dataset.meta)
    records = [group_to_record(g) for g in dataset.groups]
    if fmt == "parquet":
        _write_parquet(records, path / GROUPS_PARQUET)
    else:
        with open(path / GROUPS_JSONL, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return path


def write_meta(path: Path, meta: dict) -> None:
    (path / META_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=2) + "\n", encoding="utf-8")


def append_groups(path: Path, groups: Iterable[Group]) -> None:
    """Appends records to groups.jsonl and flushes them to disk (the unit of resumption)."""
    with open(path / GROUPS_JSONL, "a", encoding="utf-8") as f:
        for g in groups:
            f.write(json.dumps(group_to_record(g)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError("Parquet needs pyarrow: pip install pyarrow (or use the JSONL format)") from None
    return pyarrow


def _write_parquet(records: list[dict], path: Path) -> None:
    pa = _pyarrow()
    pa.parquet.write_table(pa.Table.from_pylist(records), path)


def _read_parquet(path: Path) -> list[dict]:
    pa = _pyarrow()
    return pa.parquet.read_table(path).to_pylist()
