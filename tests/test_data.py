"""Prompt data: .jsonl and .parquet rows, keys, slicing, chat templates, epoch order,
prompt-length filtering, malformed rows, and the resumable read position."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from furlong.data import (DataError, DataKeys, PromptDataset, PromptEncoder, load_records,
                          parse_path_spec)

KEYS = DataKeys(input_key="prompt", label_key="label")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return AutoTokenizer.from_pretrained(tiny / "model")


@pytest.fixture
def plain(tokenizer) -> PromptEncoder:
    return PromptEncoder(tokenizer, apply_chat_template=False)


@pytest.fixture
def chat(tokenizer) -> PromptEncoder:
    return PromptEncoder(tokenizer, apply_chat_template=True)


def addition_rows(count: int) -> list[dict]:
    return [{"prompt": f"{i}+{i + 1}=", "label": str(2 * i + 1), "metadata": {"i": i}}
            for i in range(count)]


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_parquet(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def suffix(write) -> str:
    return ".jsonl" if write is write_jsonl else ".parquet"


def read_all(dataset: PromptDataset, count: int) -> list[str]:
    return [row.prompt for row in dataset.next_rows(count)]


# ---------------------------------------------------------------- formats and keys

def test_jsonl_and_parquet_give_the_same_rows(tmp_path, plain):
    rows = addition_rows(6)
    from_jsonl = PromptDataset(write_jsonl(tmp_path / "a.jsonl", rows), KEYS, plain)
    from_parquet = PromptDataset(write_parquet(tmp_path / "a.parquet", rows), KEYS, plain)
    for dataset, name in ((from_jsonl, "a.jsonl"), (from_parquet, "a.parquet")):
        assert [(r.prompt, r.label, r.metadata) for r in dataset.rows] == [
            (row["prompt"], row["label"], row["metadata"]) for row in rows]
        assert dataset.rows[2].where == f"{tmp_path / name}:3"
    assert [r.prompt_ids for r in from_jsonl.rows] == [r.prompt_ids for r in from_parquet.rows]


def test_prompt_ids_are_the_tokenized_prompt(tmp_path, plain, chat, tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", addition_rows(2))
    row = PromptDataset(path, KEYS, plain).rows[1]
    assert tokenizer.decode(row.prompt_ids) == "1+2="
    row = PromptDataset(path, KEYS, chat).rows[1]
    assert tokenizer.decode(row.prompt_ids) == (
        "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("write", [write_jsonl, write_parquet])
def test_chat_message_prompts(tmp_path, chat, tokenizer, write):
    messages = [{"role": "system", "content": "+"}, {"role": "user", "content": "3+4="}]
    path = write(tmp_path / f"m{suffix(write)}", [{"messages": messages, "answer": "7"}])
    row = PromptDataset(path, DataKeys("messages", "answer"), chat).rows[0]
    assert row.prompt == messages and row.label == "7"
    assert tokenizer.decode(row.prompt_ids) == (
        "<|im_start|>system\n+<|im_end|>\n<|im_start|>user\n3+4=<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_custom_keys_and_metadata_json_string(tmp_path, plain):
    rows = [{"q": "1+1=", "a": 2, "meta": json.dumps({"source": "x"})},
            {"q": "2+2=", "a": 4}]
    dataset = PromptDataset(write_jsonl(tmp_path / "k.jsonl", rows),
                            DataKeys("q", "a", "meta"), plain)
    assert [(r.prompt, r.label, r.metadata) for r in dataset.rows] == [
        ("1+1=", 2, {"source": "x"}), ("2+2=", 4, {})]


def test_no_label_key_means_no_label(tmp_path, plain):
    dataset = PromptDataset(write_jsonl(tmp_path / "a.jsonl", addition_rows(2)),
                            DataKeys("prompt"), plain)
    assert [r.label for r in dataset.rows] == [None, None]


def test_apply_chat_template_kwargs_and_tools_reach_the_template(tokenizer, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = ("{% if greet %}hi {% endif %}{{ tools | tojson }} "
                               "{{ messages[0]['content'] }}")
    rows = [{"prompt": "1+1=", "tools": [{"name": "calc"}]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    encoder = PromptEncoder(tokenizer, True, {"greet": True})
    assert encoder.render("1+1=", rows[0]["tools"]) == 'hi [{"name": "calc"}] 1+1='
    assert PromptEncoder(tokenizer, True).render("1+1=") == "null 1+1="
    # the dataset passes the --tool-key column through
    row = PromptDataset(path, DataKeys("prompt"), encoder).rows[0]
    assert tokenizer.decode(row.prompt_ids) == tokenizer.decode(
        tokenizer('hi [{"name": "calc"}] 1+1=', add_special_tokens=False)["input_ids"])


def test_chat_messages_without_chat_template_stay_messages_with_the_templates_ids(
        tmp_path, plain, chat, tokenizer):
    """Miles' data source: without --apply-chat-template hooks get a row's messages as they
    are (a custom generate function or agent sends them to a chat API); their token ids are
    the chat template's either way, and a string stays the string it is."""
    messages = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1="}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "1+1="}, {"prompt": messages}])
    text, listed = PromptDataset(path, DataKeys("prompt"), plain).rows
    assert plain.render(messages) == messages and plain.render("1+1=") == "1+1="
    templated = tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True)
    assert chat.render(messages) == templated and "<|im_start|>system" in templated
    ids = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert (listed.prompt, listed.prompt_ids) == (messages, ids(templated))
    assert (text.prompt, text.prompt_ids) == ("1+1=", ids("1+1="))


def test_a_tool_column_may_be_json_text_and_must_be_a_list(tmp_path, chat):
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {}}}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "1", "tools": json.dumps(tools)},
                                              {"prompt": "2", "tools": {"name": "calc"}}])
    with pytest.raises(DataError,
                       match=rf"^{tmp_path / 't.jsonl'}:2: 'tools' must be a JSON list, got dict"):
        PromptDataset(path, DataKeys("prompt"), chat)
    (row,) = PromptDataset(f"{path}@[0:1]", DataKeys("prompt"), chat).rows
    assert row.tools == tools


# ---------------------------------------------------------------- slicing

@pytest.mark.parametrize("spec,expected", [
    ("a.jsonl", ("a.jsonl", None, None)),
    ("a.jsonl@[2:5]", ("a.jsonl", 2, 5)),
    ("a.jsonl@[:3]", ("a.jsonl", None, 3)),
    ("a.jsonl@[-2:]", ("a.jsonl", -2, None)),
    ("dir@x/a.parquet@[10:20]", ("dir@x/a.parquet", 10, 20)),
])
def test_parse_path_spec(spec, expected):
    assert parse_path_spec(spec) == expected


@pytest.mark.parametrize("write", [write_jsonl, write_parquet])
@pytest.mark.parametrize("slice_,indices", [("[2:5]", [2, 3, 4]), ("[:2]", [0, 1]),
                                            ("[-2:]", [8, 9]), ("[7:100]", [7, 8, 9])])
def test_slices_take_rows_start_to_end(tmp_path, plain, write, slice_, indices):
    rows = addition_rows(10)
    path = write(tmp_path / f"s{suffix(write)}", rows)
    dataset = PromptDataset(f"{path}@{slice_}", KEYS, plain)
    assert [r.prompt for r in dataset.rows] == [rows[i]["prompt"] for i in indices]
    assert [r.where for r in dataset.rows] == [f"{path}:{i + 1}" for i in indices]


def test_empty_slice_is_an_error(tmp_path, plain):
    path = write_jsonl(tmp_path / "a.jsonl", addition_rows(3))
    with pytest.raises(DataError, match="no rows"):
        PromptDataset(f"{path}@[5:9]", KEYS, plain)


# ---------------------------------------------------------------- epoch order

def test_shuffle_is_a_function_of_seed_and_epoch(tmp_path, plain):
    path = write_jsonl(tmp_path / "a.jsonl", addition_rows(20))
    make = lambda seed: PromptDataset(path, KEYS, plain, shuffle=True, seed=seed)  # noqa: E731
    first, again, other = make(3), make(3), make(4)
    epochs = [read_all(first, 20) for _ in range(3)]
    assert [read_all(again, 20) for _ in range(3)] == epochs
    assert read_all(other, 20) != epochs[0]
    assert len({tuple(e) for e in epochs}) == 3  # each epoch reshuffled
    assert all(sorted(e) == sorted(r["prompt"] for r in addition_rows(20)) for e in epochs)
    assert epochs[0] != [r["prompt"] for r in addition_rows(20)]


def test_shuffle_epochs_straddle_batches(tmp_path, plain):
    """Batches that do not divide the epoch still see every row exactly once per epoch."""
    path = write_jsonl(tmp_path / "a.jsonl", addition_rows(10))
    dataset = PromptDataset(path, KEYS, plain, shuffle=True, seed=0)
    stream = [p for _ in range(10) for p in read_all(dataset, 3)]  # 30 rows = 3 epochs
    for epoch in range(3):
        assert sorted(stream[10 * epoch:10 * (epoch + 1)]) == sorted(
            r["prompt"] for r in addition_rows(10))
    assert dataset.epoch == 2 and dataset.offset == 10


def test_without_shuffle_every_epoch_is_file_order(tmp_path, plain):
    rows = addition_rows(4)
    dataset = PromptDataset(write_jsonl(tmp_path / "a.jsonl", rows), KEYS, plain, seed=5)
    assert read_all(dataset, 10) == [rows[i % 4]["prompt"] for i in range(10)]


# ---------------------------------------------------------------- prompt length filter

def test_max_prompt_len_drops_and_counts(tmp_path, plain, tokenizer):
    rows = [{"prompt": "1+1="}, {"prompt": "11+11="}, {"prompt": "111+111="}, {"prompt": "2+2="}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    dataset = PromptDataset(path, DataKeys("prompt"), plain, max_prompt_len=6)
    assert [r.prompt for r in dataset.rows] == ["1+1=", "11+11=", "2+2="]
    assert dataset.num_too_long == 1 and len(dataset) == 3
    assert all(len(r.prompt_ids) <= 6 for r in dataset.rows)


def test_max_prompt_len_counts_chat_template_tokens(tmp_path, chat):
    """The limit applies to the rendered prompt: "0+1=" is 4 tokens, 12 with the template."""
    path = write_jsonl(tmp_path / "a.jsonl", addition_rows(12))
    dataset = PromptDataset(path, KEYS, chat, max_prompt_len=12)
    assert [r.prompt for r in dataset.rows] == [f"{i}+{i + 1}=" for i in range(9)]
    assert dataset.num_too_long == 3  # "9+10=", "10+11=", "11+12="
    with pytest.raises(DataError, match="all 12 prompts are longer than --rollout-max-prompt-len"):
        PromptDataset(path, KEYS, chat, max_prompt_len=11)


# ---------------------------------------------------------------- malformed rows

GOOD = '{"prompt": "1+1=", "label": "2"}'


@pytest.mark.parametrize("bad,words", [
    ('{"prompt": "1+1=", "label": "2"', ["bad JSON"]),
    ('{"label": "2"}', ["no key 'prompt'", "--input-key"]),
    ('{"prompt": "1+1="}', ["no key 'label'", "--label-key"]),
    ('{"prompt": "1+1=", "label": null}', ["'label' is null"]),
    ('{"prompt": 5, "label": "2"}', ["'prompt' must be a string or a list", "int"]),
    ('{"prompt": ["1+1="], "label": "2"}', ["chat message"]),
    ('["1+1=", "2"]', ["expected a JSON object", "list"]),
    ('{"prompt": "1+1=", "label": "2", "metadata": 3}', ["'metadata'", "int"]),
    ('{"prompt": "1+1=", "label": "2", "metadata": "{oops"}', ["'metadata'", "not JSON"]),
    ('{"prompt": "1+1=", "label": "2", "metadata": "[1, 2]"}', ["'metadata'", "list"]),
])
def test_malformed_row_names_file_and_line(tmp_path, plain, bad, words):
    """A bad row is an error at FILE:LINE. Also guards the metadata column: a string that
    is not JSON used to escape as a bare JSONDecodeError, and a JSON list was kept as
    'metadata' silently."""
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{GOOD}\n{bad}\n{GOOD}\n")
    for read in (lambda: PromptDataset(str(path), KEYS, plain),
                 lambda: load_records(str(path), KEYS)):
        with pytest.raises(DataError) as info:
            read()
        message = str(info.value)
        assert message.startswith(f"{path}:4: "), message
        assert all(word in message for word in words), message


def test_malformed_parquet_row_names_the_row(tmp_path, plain):
    path = write_parquet(tmp_path / "bad.parquet", [{"prompt": "1+1=", "label": "2"},
                                                     {"prompt": None, "label": "3"}])
    with pytest.raises(DataError, match=rf"^{path}:2: 'prompt' must be a string"):
        PromptDataset(path, KEYS, plain)


def test_blank_lines_are_the_only_rows_skipped(tmp_path, plain):
    path = tmp_path / "a.jsonl"
    path.write_text(f"\n{GOOD}\n   \n{GOOD}\n{GOOD}")  # no newline at the end
    dataset = PromptDataset(str(path), KEYS, plain)
    assert [r.where for r in dataset.rows] == [f"{path}:2", f"{path}:4", f"{path}:5"]


@pytest.mark.parametrize("name,content,words", [
    ("missing.jsonl", None, "no such file"),
    ("data.csv", b"prompt,label\n", "unsupported format '.csv'"),
    ("latin1.jsonl", GOOD.encode() + b'\n{"prompt": "caf\xe9", "label": "1"}\n',
     "latin1.jsonl:2: not UTF-8"),
    ("broken.parquet", b"PAR1 this is not parquet", "not a readable parquet file"),
])
def test_unreadable_files(tmp_path, plain, name, content, words):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=words):
        PromptDataset(str(tmp_path / name), KEYS, plain)


def test_load_records_limit_reads_only_the_first_rows(tmp_path):
    """--dry-run peeks at the first rows: a row beyond the limit is not read."""
    path = tmp_path / "a.jsonl"
    path.write_text(f"{GOOD}\n{GOOD}\nnot json\n")
    assert [where for where, _ in load_records(str(path), KEYS, limit=2)] == [
        f"{path}:1", f"{path}:2"]
    with pytest.raises(DataError, match=":3: bad JSON"):
        load_records(str(path), KEYS)


@pytest.mark.parametrize("slice_, rows", [("@[-3:]", [3, 4]), ("@[:-4]", [1]),
                                          ("@[1:]", [2, 3]), ("@[-4:-1]", [2, 3])])
def test_load_records_limit_takes_the_first_rows_of_the_slice(tmp_path, slice_, rows):
    """Regression: --dry-run read `limit` rows and then sliced, so a slice from the end
    had no rows."""
    path = write_jsonl(tmp_path / "a.jsonl", addition_rows(5))
    got = load_records(path + slice_, KEYS, limit=2)
    assert [where for where, _ in got] == [f"{path}:{n}" for n in rows]


# ---------------------------------------------------------------- read position

@pytest.mark.parametrize("consumed", [0, 3, 7, 10, 13, 20, 24])
def test_resume_continues_with_the_next_unseen_prompt(tmp_path, plain, consumed):
    """The stream after a save/load equals the uninterrupted stream, at positions inside
    an epoch, exactly at its end (10, 20), and after an epoch boundary."""
    path = write_jsonl(tmp_path / "a.jsonl", addition_rows(10))
    make = lambda: PromptDataset(path, KEYS, plain, shuffle=True, seed=11)  # noqa: E731
    reference = read_all(make(), 40)
    first = make()
    assert read_all(first, consumed) == reference[:consumed]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    resumed = make()
    resumed.load_state_dict(state)
    assert read_all(resumed, 40 - consumed) == reference[consumed:]


def test_resume_with_different_row_count_is_an_error(tmp_path, plain):
    path = write_jsonl(tmp_path / "a.jsonl", addition_rows(10))
    state = PromptDataset(path, KEYS, plain).state_dict()
    other = PromptDataset(f"{path}@[:9]", KEYS, plain)
    with pytest.raises(DataError, match="taken with 10 prompts, this data has 9"):
        other.load_state_dict(state)


def test_resume_with_different_content_same_count_is_an_error(tmp_path, plain):
    """Guards against resuming on another file of the same size: the read position would
    silently point into different data (only the row count used to be compared)."""
    dataset = PromptDataset(write_jsonl(tmp_path / "a.jsonl", addition_rows(10)), KEYS, plain)
    dataset.next_rows(4)
    state = dataset.state_dict()
    changed = addition_rows(10)
    changed[5]["label"] = "wrong"
    other = PromptDataset(write_jsonl(tmp_path / "b.jsonl", changed), KEYS, plain)
    with pytest.raises(DataError, match="different prompts"):
        other.load_state_dict(state)
    same = PromptDataset(write_jsonl(tmp_path / "c.jsonl", addition_rows(10)), KEYS, plain)
    same.load_state_dict(state)  # a copy of the same data at another path resumes
    assert (same.epoch, same.offset) == (0, 4)
