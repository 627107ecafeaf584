"""The synthesis output: an append-only JSONL of kept examples and its ``<output>.state.json`` sidecar."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from ..coverage import FeatureKey
from ..._io import (
    DamagedFileError, append_line, clean_leftovers, output_lock, read_json, truncate_to_last_line, write_json,
)

FORMAT = "qscope-synthesis"
VERSION = 1


def text_id(text: str) -> str:
    """Deduplication key: sha256 of the text, case-folded with whitespace collapsed."""
    return hashlib.sha256(" ".join(text.casefold().split()).encode("utf-8")).hexdigest()


def derive_seed(seed: int, *parts) -> int:
    """A stable 32-bit seed for one request (Python's ``hash`` is salted per process, so not that)."""
    return int.from_bytes(hashlib.sha256(repr((seed, *parts)).encode()).digest()[:4], "big")


def _digest(items) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def read_synthetic(path: str | Path) -> list[dict]:
    """The complete records of a synthesis output; an unterminated last line (a crash mid-write) is ignored."""
    data = Path(path).read_bytes()
    lines = data[: data.rfind(b"\n") + 1].splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DamagedFileError(path, f"line {i} is not a JSON record: {err}",
                                   "keep the records before that line, or start another output") from None
    return records


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _state_key(key: FeatureKey | None) -> str:
    return "random" if key is None else f"{key[0]}:{key[1]}"


class SynthesisStore:
    """Append-only JSONL of kept examples plus ``<output>.state.json`` (settings and finished rounds)."""

    def __init__(self, path: str | Path, config: dict, *, resume: bool) -> None:
        self.path = Path(path)
        self.state_path = self.path.with_name(self.path.name + ".state.json")
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(output_lock(self.path, what="synthesis output"))
        try:
            self._open(json.loads(json.dumps(config)), resume)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output's lock (the run is over)."""
        self._lock.close()

    def _open(self, config: dict, resume: bool) -> None:
        clean_leftovers(self.path.parent, prefix=self.state_path.name)
        if self.path.exists() or self.state_path.exists():
            if not resume:
                raise FileExistsError(f"{self.path} exists; resume it (resume=True, qscope synth --resume) "
                                      "or choose another output")
            if not self.state_path.exists():
                raise ValueError(f"{self.path} has no {self.state_path.name}: it was not written by this synthesis")
            self.state = read_json(self.state_path, f"delete {self.path} and {self.state_path.name} and run again "
                                   "without --resume (the records so far cannot be attributed to rounds)")
            if self.state.get("config") != config:
                old = self.state.get("config") or {}
                changed = sorted(k for k in {*old, *config} if old.get(k) != config.get(k))
                raise ValueError(f"{self.path} was written with other settings ({', '.join(changed)}); "
                                 "use the same settings to resume, or another output")
            self._cut_partial_line()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.state = {"format": FORMAT, "version": VERSION, "config": config, "rounds": {}}
            write_json(self.state_path, self.state)
        self.path.touch()
        records = read_synthetic(self.path)
        self.hashes = {r["id"] for r in records}
        self.counts = Counter(_state_key(None if r.get("layer") is None else (r["layer"], r["feature"]))
                              for r in records)
        self.total = len(records)
        self.last_round: dict[str, int] = {}
        for r in records:
            key = _state_key(None if r.get("layer") is None else (r["layer"], r["feature"]))
            self.last_round[key] = max(self.last_round.get(key, -1), int(r.get("round") or 0))

    def unfinished(self, key: FeatureKey | None, done: int) -> bool:
        """True when the file holds records of round ``done`` that the state does not count as finished
        (a kill came between the round's last append and its ``finish_round``): that round is redone,
        adding nothing twice, so the state ends as an uninterrupted run's."""
        return self.last_round.get(_state_key(key), -1) >= done

    def _cut_partial_line(self) -> None:
        truncate_to_last_line(self.path)

    def rounds_done(self, key: FeatureKey | None) -> int:
        return int(self.state["rounds"].get(_state_key(key), 0))

    def finish_round(self, key: FeatureKey | None, rounds: int) -> None:
        self.state["rounds"][_state_key(key)] = rounds
        write_json(self.state_path, self.state)

    def append(self, record: dict) -> None:
        """Write one whole line with ``O_APPEND`` and ``fsync`` it before counting it."""
        append_line(self.path, (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
        self.hashes.add(record["id"])
        key = _state_key(None if record["layer"] is None else (record["layer"], record["feature"]))
        self.counts[key] += 1
        self.last_round[key] = max(self.last_round.get(key, -1), int(record.get("round") or 0))
        self.total += 1
