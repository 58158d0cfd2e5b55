"""Prompt data: reading .jsonl/.parquet rows, rendering prompts, epoch order, read position.

A malformed row is an error naming the file and line; nothing is dropped silently
(prompts over --rollout-max-prompt-len are dropped, counted and reported).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

_SLICE = re.compile(r"^(?P<path>.+)@\[(?P<start>-?\d*):(?P<end>-?\d*)\]$")


class DataError(ValueError):
    """A problem in a data file; the message starts with 'FILE:LINE:'."""


@dataclass(frozen=True)
class DataKeys:
    input_key: str = "input"
    label_key: str | None = None
    metadata_key: str = "metadata"
    tool_key: str = "tools"


@dataclass(frozen=True)
class PromptRow:
    """One prompt as read from the file, with its token ids."""
    prompt: str | list
    prompt_ids: tuple[int, ...]
    label: Any
    metadata: dict
    where: str  # "FILE:LINE", for messages about this row
    tools: list | None = None  # the --tool-key column, given to the chat template


def parse_path_spec(spec: str) -> tuple[str, int | None, int | None]:
    """`PATH@[start:end]` -> (PATH, start, end); plain PATH -> (PATH, None, None)."""
    match = _SLICE.match(spec)
    if not match:
        return spec, None, None
    to_int = lambda text: int(text) if text else None  # noqa: E731
    return match["path"], to_int(match["start"]), to_int(match["end"])


def read_records(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for every row of a .jsonl or .parquet file."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: no such file")
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(file)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{path}: not a readable parquet file ({error})") from None
        for number, record in enumerate(table.to_pylist(), start=1):
            yield number, record
        return
    if file.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: unsupported format {file.suffix!r}; use .jsonl or .parquet")
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{number}: not UTF-8 ({error.reason} at byte "
                                f"{error.start} of the line)") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: bad JSON ({error.msg} at column "
                                f"{error.colno})") from None


def check_record(record: Any, where: str, keys: DataKeys) -> None:
    """Raise DataError if a record lacks the input key or has values of the wrong type."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if keys.input_key not in record:
        raise DataError(f"{where}: no key {keys.input_key!r} (keys: {sorted(record)}); set "
                        "--input-key to the prompt column")
    prompt = record[keys.input_key]
    if isinstance(prompt, list):
        for message in prompt:
            if not (isinstance(message, dict) and "role" in message and "content" in message):
                raise DataError(f"{where}: {keys.input_key!r} is a list, so each item must be a "
                                "chat message {\"role\": ..., \"content\": ...}")
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: {keys.input_key!r} must be a string or a list of chat "
                        f"messages, got {type(prompt).__name__}")
    if keys.label_key is not None and keys.label_key not in record:
        raise DataError(f"{where}: no key {keys.label_key!r} (keys: {sorted(record)}); set "
                        "--label-key to the label column")
    if keys.label_key is not None and record[keys.label_key] is None:
        raise DataError(f"{where}: {keys.label_key!r} is null; every prompt needs its answer")
    _metadata(record.get(keys.metadata_key), where, keys.metadata_key)


def _json_column(value: Any, where: str, key: str, kind: type) -> Any:
    """A column holding a JSON object or list, given as itself or as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: {key!r} is a string but not JSON ({error.msg})") from None
    if not isinstance(value, kind):
        name = "a JSON object" if kind is dict else "a JSON list"
        raise DataError(f"{where}: {key!r} must be {name}, got {type(value).__name__}")
    return value


def _metadata(value: Any, where: str, key: str) -> dict:
    return {} if value is None else dict(_json_column(value, where, key, dict))


def read_tools(value: Any, where: str, key: str) -> list | None:
    """The --tool-key column: a list of tool specs (or its JSON text), as Miles reads it."""
    return None if value is None else list(_json_column(value, where, key, list))


def load_records(spec: str, keys: DataKeys, limit: int | None = None) -> list[tuple[str, dict]]:
    """Checked records of `PATH[@[a:b]]` as (where, record); `limit`: only the first rows
    of the slice (read from the file's start when the slice counts from there)."""
    path, start, end = parse_path_spec(spec)
    from_start = (start or 0) >= 0 and (end or 0) >= 0
    records = []
    for number, record in read_records(path):
        records.append((f"{path}:{number}", record))
        if limit is not None and from_start and len(records) >= (start or 0) + limit:
            break
    records = records[start:end][:limit]
    for where, record in records:
        check_record(record, where, keys)
    if not records:
        raise DataError(f"{spec}: no rows (check the file and the @[start:end] slice)")
    return records


class PromptEncoder:
    """Prompt (string or chat messages) -> token ids, as the engine will see it."""

    def __init__(self, tokenizer, apply_chat_template: bool, template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.apply_chat_template = apply_chat_template
        self.template_kwargs = template_kwargs or {}

    def render(self, prompt: str | list, tools: list | None = None) -> str | list:
        """The prompt as Miles' data source hands it to hooks: with --apply-chat-template
        the chat template's text (a string prompt as one user message); without, the row's
        own value, a string or chat messages (which a custom generate function or agent
        sends to a chat API)."""
        return self._template(prompt, tools) if self.apply_chat_template else prompt

    def encode(self, prompt: str | list, tools: list | None = None) -> list[int]:
        """Token ids of the prompt as the engine sees it. Chat messages become tokens
        through the chat template, --apply-chat-template or not."""
        text = prompt if isinstance(prompt, str) and not self.apply_chat_template \
            else self._template(prompt, tools)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _template(self, prompt: str | list, tools: list | None) -> str:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True,
            **self.template_kwargs)


class PromptDataset:
    """Rows of --prompt-data in epoch order, with a read position that checkpoints.

    Epoch e is the rows in file order, or shuffled with seed `seed + e` under
    --rollout-shuffle, so the order is a pure function of (seed, epoch) and the
    position (epoch, offset) is all a resumed run needs.
    """

    def __init__(self, spec: str, keys: DataKeys, encoder: PromptEncoder,
                 max_prompt_len: int | None = None, shuffle: bool = False, seed: int = 42,
                 max_prompt_len_flag: str = "--rollout-max-prompt-len"):
        """Prompts longer than `max_prompt_len` tokens are dropped (counted in
        `num_too_long`); `max_prompt_len_flag` names the limit in the error when none is
        left."""
        self.spec = spec
        self.shuffle = shuffle
        self.seed = seed
        self.rows: list[PromptRow] = []
        self.num_too_long = 0
        for where, record in load_records(spec, keys):
            tools = read_tools(record.get(keys.tool_key), where, keys.tool_key)
            try:
                ids = encoder.encode(record[keys.input_key], tools)
            except ValueError as error:
                raise DataError(f"{where}: {error}") from None
            if max_prompt_len is not None and len(ids) > max_prompt_len:
                self.num_too_long += 1
                continue
            label = record.get(keys.label_key) if keys.label_key else None
            metadata = _metadata(record.get(keys.metadata_key), where, keys.metadata_key)
            self.rows.append(PromptRow(record[keys.input_key], tuple(ids), label, metadata, where,
                                       tools))
        if not self.rows:
            raise DataError(f"{spec}: all {self.num_too_long} prompts are longer than "
                            f"{max_prompt_len_flag} {max_prompt_len}")
        self.fingerprint = _fingerprint(self.rows)
        self.epoch = 0
        self.offset = 0
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self.rows)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_rows(self, count: int) -> list[PromptRow]:
        """The next `count` rows, moving into the next epoch when this one runs out."""
        rows = []
        while len(rows) < count:
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = min(count - len(rows), len(self._order) - self.offset)
            rows += [self.rows[i] for i in self._order[self.offset:self.offset + take]]
            self.offset += take
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "num_rows": len(self.rows),
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != len(self.rows):
            raise DataError(f"{self.spec}: the checkpoint was taken with {state['num_rows']} "
                            f"prompts, this data has {len(self.rows)}; resume with the same "
                            "--prompt-data and --rollout-max-prompt-len")
        if state.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise DataError(f"{self.spec}: the checkpoint was taken with different prompts (same "
                            f"count, {len(self.rows)}, different content); resume with the same "
                            "--prompt-data, or start a new --save directory")
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._epoch_order(self.epoch)


def _fingerprint(rows: list[PromptRow]) -> str:
    """Hash of the prompts and labels in file order: a resumed run checks it is reading the
    same data (the row count alone misses an edited or swapped file of the same size)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row.prompt, row.label], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]
