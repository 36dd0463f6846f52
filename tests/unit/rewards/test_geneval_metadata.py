"""GenEval metadata: the official file parses as documented; bad files give line-numbered errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from flowrl.rewards.geneval import (
    COLORS,
    RELATIONS,
    TAGS,
    Clause,
    MetadataError,
    PromptRecord,
    load_metadata,
    parse_record,
    write_metadata,
)


@pytest.fixture(scope="module")
def object_names(shared_dir: Path) -> list[str]:
    return (shared_dir / "data" / "geneval" / "object_names.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def official(geneval_metadata_path: Path) -> list[PromptRecord]:
    return load_metadata(geneval_metadata_path)


def test_vocabularies() -> None:
    assert TAGS == ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    assert len(COLORS) == 10 and {"red", "purple", "brown", "white"} <= set(COLORS)
    assert RELATIONS == ("left of", "right of", "above", "below")


# ---------------------------------------------------------------- the official file


def test_official_file_counts(official: list[PromptRecord]) -> None:
    assert len(official) == 553
    assert Counter(r.tag for r in official) == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }


def test_official_classes_are_detector_names(
    official: list[PromptRecord], object_names: list[str], geneval_metadata_path: Path
) -> None:
    assert len(object_names) == 80 and "computer mouse" in object_names
    used = {c.cls for r in official for c in r.include + r.exclude}
    assert used <= set(object_names)
    # The same check through the loader's own `classes` argument.
    assert load_metadata(geneval_metadata_path, classes=object_names) == official


def test_official_counting_records_exclude_one_more(official: list[PromptRecord]) -> None:
    for r in official:
        if r.tag == "counting":
            assert len(r.include) == 1 and len(r.exclude) == 1, r.prompt
            assert r.exclude[0].cls == r.include[0].cls
            assert r.exclude[0].count == r.include[0].count + 1
            assert 2 <= r.include[0].count <= 4
        else:
            assert r.exclude == ()


def test_official_position_and_colour_records(official: list[PromptRecord]) -> None:
    for r in official:
        if r.tag == "position":
            assert r.include[0].position is None
            assert r.include[1].position is not None and r.include[1].position[1] == 0
            assert r.include[1].position[0] in RELATIONS
        if r.tag in ("colors", "color_attr"):
            assert all(c.color in COLORS for c in r.include)


def test_official_round_trip_is_byte_identical(
    official: list[PromptRecord], geneval_metadata_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "roundtrip.jsonl"
    write_metadata(official, out)
    assert load_metadata(out) == official
    # GenEval's own key order and separators, so tools reading the official file read ours too.
    assert out.read_text() == geneval_metadata_path.read_text()


# ---------------------------------------------------------------- records and layout


def test_to_json_layout() -> None:
    record = PromptRecord(
        "position",
        "a photo of a red dog left of a cat",
        (Clause("cat", 1), Clause("dog", 1, color="red", position=("left of", 0))),
    )
    d = record.to_json()
    assert list(d) == ["tag", "include", "prompt"]  # no exclude key when there is none
    assert d["include"] == [
        {"class": "cat", "count": 1},
        {"class": "dog", "count": 1, "color": "red", "position": ["left of", 0]},
    ]
    counting = PromptRecord("counting", "two dogs", (Clause("dog", 2),), (Clause("dog", 3),))
    assert list(counting.to_json()) == ["tag", "include", "exclude", "prompt"]
    assert parse_record(json.loads(json.dumps(counting.to_json()))) == counting


def test_parse_record_accepts_exclude_on_any_tag() -> None:
    obj = {
        "tag": "single_object",
        "prompt": "a dog and no cat",
        "include": [{"class": "dog", "count": 1}],
        "exclude": [{"class": "cat", "count": 1}],
    }
    assert parse_record(obj).exclude == (Clause("cat", 1),)


def test_parse_record_reports_all_problems_with_location() -> None:
    obj = {"tag": "colours", "prompt": "x", "include": [{"class": "dog", "count": True, "color": "violet"}]}
    with pytest.raises(MetadataError) as info:
        parse_record(obj, where="here.jsonl:7")
    problems = info.value.problems
    assert len(problems) == 3
    assert all(p.startswith("here.jsonl:7: ") for p in problems)
    assert "did you mean 'colors'?" in problems[0]
    assert any("count must be a positive integer, got True" in p for p in problems)
    assert any("unknown color 'violet'" in p for p in problems)


@pytest.mark.parametrize(
    ("typo", "nearest"),
    [
        ("mouse", "computer mouse"),  # GenEval's renamed COCO classes: not "horse"
        ("remote", "tv remote"),
        ("keyboard", "computer keyboard"),  # not "skateboard"
        ("giraf", "giraffe"),
    ],
)
def test_parse_record_checks_class_names(typo: str, nearest: str, object_names: list[str]) -> None:
    obj = {"tag": "single_object", "prompt": "a thing", "include": [{"class": typo, "count": 1}]}
    with pytest.raises(MetadataError, match=f"class '{typo}' is not one of.*did you mean '{nearest}'"):
        parse_record(obj, classes=object_names)


def test_direct_construction_validates() -> None:
    with pytest.raises(ValueError, match="positive integer"):
        Clause("dog", 0)
    with pytest.raises(ValueError, match="unknown color 'redd'.*did you mean 'red'"):
        Clause("dog", 1, color="redd")
    with pytest.raises(ValueError, match="earlier include clause"):
        PromptRecord("position", "p", (Clause("dog", 1), Clause("cat", 1, position=("above", 1))))
    with pytest.raises(ValueError, match="unknown tag 'two_objects'.*did you mean 'two_object'"):
        PromptRecord("two_objects", "p", (Clause("dog", 1),))
    with pytest.raises(TypeError, match="parse_record"):
        PromptRecord("single_object", "p", ({"class": "dog", "count": 1},))  # type: ignore[arg-type]
    # A list position (as JSON gives it) is stored as a tuple, keeping records hashable.
    from_list = Clause("dog", 1, position=["above", 0])  # type: ignore[arg-type]
    assert from_list.position == ("above", 0)
    assert hash(from_list) == hash(Clause("dog", 1, position=("above", 0)))


# ---------------------------------------------------------------- bad files


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_file_reports_every_problem_with_line_numbers(tmp_path: Path) -> None:
    good = {"tag": "single_object", "prompt": "a dog", "include": [{"class": "dog", "count": 1}]}
    lines = [
        json.dumps(good),  # 1: fine
        "",  # 2: blank lines are allowed
        '{"tag": "single_object", "prompt": "a cat" "include": []}',  # 3: bad JSON
        json.dumps({**good, "tag": "countng"}),  # 4: misspelled tag
        json.dumps({**good, "include": [{"class": "dog", "count": 1, "color": "purpel"}]}),  # 5
        json.dumps({**good, "include": [{"class": "dog", "count": 0}]}),  # 6: count not positive
        json.dumps(  # 7: bad relation and an index that is not earlier
            {
                **good,
                "include": [
                    {"class": "dog", "count": 1},
                    {"class": "cat", "count": 1, "position": ["leftof", 1]},
                ],
            }
        ),
        json.dumps({"tag": "single_object", "promt": "a dog", "include": good["include"]}),  # 8
        json.dumps({**good, "include": [{"class": "dgo", "count": 1}]}),  # 9: class not known
    ]
    path = _write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(MetadataError) as info:
        load_metadata(path, classes=["dog", "cat"])
    problems = info.value.problems
    by_line: dict[int, list[str]] = {}
    for p in problems:
        assert p.startswith(f"{path}:")
        by_line.setdefault(int(p[len(str(path)) + 1 :].split(":")[0]), []).append(p)
    assert sorted(by_line) == [3, 4, 5, 6, 7, 8, 9]
    assert "not valid JSON" in by_line[3][0]
    assert "unknown tag 'countng'" in by_line[4][0] and "did you mean 'counting'?" in by_line[4][0]
    assert "did you mean 'purple'?" in by_line[5][0]
    assert "count must be a positive integer, got 0" in by_line[6][0]
    line7 = " ".join(by_line[7])
    assert "unknown position relation 'leftof'" in line7 and "did you mean 'left of'?" in line7
    assert "does not point to an earlier include clause" in line7
    line8 = " ".join(by_line[8])
    assert "unknown field 'promt'" in line8 and "did you mean 'prompt'?" in line8
    assert "missing required field 'prompt'" in line8
    assert "class 'dgo'" in by_line[9][0] and "did you mean 'dog'?" in by_line[9][0]
    # One error, whose message lists them all.
    message = str(info.value)
    assert message.startswith(f"{len(problems)} problems in GenEval metadata {path}")
    assert all(p in message for p in problems)


def test_structural_problems(tmp_path: Path) -> None:
    lines = [
        "[1, 2]",  # 1: not an object
        json.dumps({"tag": "single_object", "prompt": "a dog", "include": []}),  # 2: empty include
        json.dumps({"tag": "single_object", "prompt": "a dog", "include": ["dog"]}),  # 3: clause not object
        json.dumps(  # 4: position on the first clause
            {
                "tag": "position",
                "prompt": "p",
                "include": [{"class": "dog", "count": 1, "position": ["above", 0]}],
            }
        ),
        json.dumps(  # 5: position is not a 2-list; unknown clause field
            {
                "tag": "position",
                "prompt": "p",
                "include": [{"class": "dog", "count": 1, "position": "above", "colour": "red"}],
            }
        ),
    ]
    path = _write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(MetadataError) as info:
        load_metadata(path)
    text = "\n".join(info.value.problems)
    assert f"{path}:1: expected a JSON object" in text
    assert f"{path}:2: include is empty" in text
    assert f"{path}:3: include[0] must be a JSON object" in text
    assert f"{path}:4: include[0]: position index 0 does not point to an earlier include clause" in text
    assert f"{path}:5: include[0]: position must be a 2-list" in text
    assert "unknown field 'colour'" in text and "did you mean 'color'?" in text


def test_missing_file_says_where_it_looked(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "evaluation_metadata.jsonl"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_metadata(missing)
    assert str(missing.resolve()) in str(info.value)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(MetadataError, match="no records"):
        load_metadata(path)


def test_write_then_load_round_trip(tmp_path: Path) -> None:
    records = [
        PromptRecord("colors", "a photo of a pink car", (Clause("car", 1, color="pink"),)),
        PromptRecord("counting", "a photo of three cups", (Clause("cup", 3),), (Clause("cup", 4),)),
        PromptRecord(
            "position", "a cat below a kite", (Clause("kite", 1), Clause("cat", 1, position=("below", 0)))
        ),
    ]
    path = tmp_path / "meta.jsonl"
    write_metadata(records, path)
    assert load_metadata(path) == records
