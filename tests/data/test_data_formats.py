"""Record formats, field mapping, containers and the template."""

from __future__ import annotations

import pytest

from data_fixtures import write_json, write_jsonl
from megatron_desmoe.data.errors import DataError, RecordError
from megatron_desmoe.data.formats import (
    RecordFormat, Segment, detect_container, detect_format, first_answer, iter_raw_records,
    parse_field_map, record_segments,
)
from megatron_desmoe.data.templates import render_pieces, render_prompt, render_text
from megatron_desmoe.errors import ConfigError


@pytest.mark.parametrize("record, expected", [
    ({"text": "x"}, "plain"),
    ({"question": "q", "answer": "a"}, "qa"),
    ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
    ({"instruction": "i", "response": "o"}, "alpaca"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}, "chat"),
    ({"prompt": "p", "answers": "['a']"}, "prompt_answers"),
])
def test_detect_format(record, expected):
    assert detect_format(record, {}, "f:1") == expected


def test_field_mapping_makes_a_new_dataset_readable():
    record = {"problem": "2+2?", "solution": "4"}
    with pytest.raises(DataError, match="problem"):
        detect_format(record, {}, "f:1")
    fields = parse_field_map("question=problem,answer=solution")
    assert detect_format(record, fields, "f:1") == "qa"
    assert record_segments(record, RecordFormat("qa", fields), "f:1") == [Segment("2+2?", "4")]


def test_sharegpt_mapping_reads_conversations():
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                {"from": "human", "value": "bye"}, {"from": "gpt", "value": "ciao"}]}
    fields = parse_field_map({"messages": "conversations", "role": "from", "content": "value",
                              "assistant": "gpt"})
    assert detect_format(record, fields, "f:1") == "chat"
    assert record_segments(record, RecordFormat("chat", fields), "f:1") == [
        Segment("hi", "hello"), Segment("bye", "ciao")]


def test_chat_every_assistant_turn_is_an_answer_and_earlier_turns_its_prompt():
    record = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a?"},
                           {"role": "assistant", "content": "A"}, {"role": "user", "content": "b?"},
                           {"role": "assistant", "content": "B"}]}
    segments = record_segments(record, RecordFormat("chat"), "f:3")
    assert segments == [Segment("be brief\na?", "A"), Segment("b?", "B")]
    assert render_pieces(segments) == [("User: be brief\na?\nAssistant: ", False), ("A", True),
                                       ("\nUser: b?\nAssistant: ", False), ("B", True)]


def test_chat_without_assistant_turn_is_a_record_error():
    with pytest.raises(RecordError, match="f:7.*assistant"):
        record_segments({"messages": [{"role": "user", "content": "u"}]}, RecordFormat("chat"), "f:7")


def test_alpaca_joins_input_and_reads_response():
    record = {"instruction": "Sort", "input": "[3, 1]", "response": "[1, 3]"}
    assert record_segments(record, RecordFormat("alpaca"), "f") == [Segment("Sort\n\n[3, 1]", "[1, 3]")]
    assert record_segments({"instruction": "Hi", "input": "", "output": "Yo"}, RecordFormat("alpaca"),
                           "f") == [Segment("Hi", "Yo")]


@pytest.mark.parametrize("answers, expected", [
    (["first", "second"], "first"),
    ("['第一', 'second']", "第一"),
    ('["quoted \\"x\\""]', 'quoted "x"'),
    ("not a list [", "not a list ["),
    ("plain answer", "plain answer"),
])
def test_prompt_answers_first_answer(answers, expected):
    assert first_answer(answers, "f:1") == expected


def test_prompt_answers_empty_list_is_an_error():
    with pytest.raises(RecordError, match="empty"):
        first_answer("[]", "f:2")


def test_missing_field_names_field_and_record():
    with pytest.raises(RecordError) as caught:
        record_segments({"question": "q", "solution": "s"}, RecordFormat("qa"), "data.jsonl:12")
    message = str(caught.value)
    assert "'answer'" in message and "data.jsonl:12" in message and "solution" in message


def test_non_text_field_is_an_error():
    with pytest.raises(RecordError, match="must be text"):
        record_segments({"question": ["q"], "answer": "a"}, RecordFormat("qa"), "f:1")


def test_unknown_canonical_field_in_mapping():
    with pytest.raises(ConfigError, match="questoin"):
        parse_field_map("questoin=problem")
    with pytest.raises(ConfigError, match="canonical=source"):
        parse_field_map("question")


def test_template_is_applied_once_to_already_templated_prompts():
    templated = "User: Translate Cherokee to English: ᎠᏴ\nTranslation:\n\nAssistant:"
    assert render_prompt(templated) == "User: Translate Cherokee to English: ᎠᏴ\nTranslation:\nAssistant: "
    assert render_prompt("Useful prompt") == "User: Useful prompt\nAssistant: "
    assert render_text([Segment(None, "raw text")]) == "raw text"


def test_containers(tmp_path):
    array = write_json(tmp_path / "a.json", [{"text": "x"}, {"text": "y"}])
    lines = write_jsonl(tmp_path / "b.json", [{"text": "x"}])  # JSONL despite the .json suffix
    text = tmp_path / "c.txt"
    text.write_text(" first line \n\n  \nsecond\n", encoding="utf-8")
    assert [detect_container(p) for p in (array, lines, text)] == ["json_array", "jsonl", "text"]
    assert [(o, pos, r) for o, pos, r in iter_raw_records(text, "text")] == [
        (0, 1, {"text": "first line"}), (1, 4, {"text": "second"})]
    assert [pos for _, pos, _ in iter_raw_records(array, "json_array")] == [0, 1]


def test_malformed_json_array_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": b}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:3"):
        list(iter_raw_records(path, "json_array"))
