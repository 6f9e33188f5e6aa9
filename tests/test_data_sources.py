"""preftune.data.sources: formats, globs, encodings, and where each record came from."""

import csv
import gzip
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _data_helpers import STANDARD, write_jsonl

from preftune.data import DataError
from preftune.data.sources import SourceFile, read_records, resolve_files, source_columns


def _read(path, fmt="auto", role="train"):
    (src,) = resolve_files([str(path)], fmt, role=role)
    return [(rec, str(loc)) for rec, loc in read_records(src, ["prompt", "chosen", "rejected"])]


def _only_fields(rows):
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r, _ in rows]


def test_jsonl_with_line_numbers_bom_crlf_and_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD, newline="\r\n", bom=True)
    path.write_bytes(path.read_bytes() + b"\r\n   \r\n")  # trailing blank lines are skipped
    rows = _read(path)
    assert _only_fields(rows) == STANDARD
    assert [loc for _, loc in rows] == [f"{path}, line {i}" for i in (1, 2, 3)]


def test_json_list_dict_and_jsonl_in_json(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(STANDARD, indent=2), encoding="utf-8-sig")
    (tmp_path / "dict.json").write_text(json.dumps({"data": STANDARD}))
    (tmp_path / "train.json").write_text(json.dumps({"train": STANDARD, "version": 1}))
    write_jsonl(tmp_path / "lines.json", STANDARD)  # one object per line in a .json file
    for name in ("list.json", "dict.json", "train.json", "lines.json"):
        assert _only_fields(_read(tmp_path / name)) == STANDARD, name
    assert _read(tmp_path / "list.json")[2][1].endswith("list.json, row 2 (0-based)")
    (tmp_path / "bad.json").write_text(json.dumps({"rows": STANDARD}))
    with pytest.raises(DataError, match="'data' or 'train'"):
        _read(tmp_path / "bad.json")


def test_csv_tsv_quoted_multiline_crlf(tmp_path):
    records = [*STANDARD, {"prompt": 'say "hi",\r\nthen stop', "chosen": "hi", "rejected": "no"}]
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"], lineterminator="\r\n")
        w.writeheader()
        w.writerows(records)
    rows = _read(path)
    assert _only_fields(rows) == records
    # line numbers: header is line 1; each standard prompt holds one newline (2 lines per record)
    assert [loc.rsplit(" ", 1)[1] for _, loc in rows] == ["2", "4", "6", "8"]
    assert source_columns(resolve_files([str(path)])[0]) == ["prompt", "chosen", "rejected"]

    tsv = tmp_path / "d.tsv"
    tsv.write_text("prompt\tchosen\trejected\nQ\ta\tb\n")
    assert _only_fields(_read(tsv)) == [{"prompt": "Q", "chosen": "a", "rejected": "b"}]


def test_csv_wrong_field_count_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nQ,a,b\nQ,a,b,extra\n")
    with pytest.raises(DataError, match=r"d\.csv, line 3: expected 3 fields"):
        _read(path)


def test_parquet_and_saved_dataset_folders(tmp_path):
    table = pa.Table.from_pylist([{**r, "extra": 1} for r in STANDARD])
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    rows = _read(tmp_path / "d.parquet")
    assert _only_fields(rows) == STANDARD
    assert set(rows[0][0]) == {"prompt", "chosen", "rejected"}  # only the needed columns are read
    assert rows[1][1].endswith("d.parquet, row 1 (0-based)")

    ds = datasets.Dataset.from_list(STANDARD)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert _only_fields(_read(tmp_path / "saved")) == STANDARD
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert _only_fields(_read(tmp_path / "dd")) == STANDARD
    assert _only_fields(_read(tmp_path / "dd", role="eval")) == STANDARD[:1]


def test_gzip_and_globs_sorted_and_deduplicated(tmp_path):
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in STANDARD[1:]))
    write_jsonl(tmp_path / "a.jsonl", STANDARD[:1])
    srcs = resolve_files([str(tmp_path / "*.jsonl*"), str(tmp_path / "a.jsonl")])
    assert [s.path.rsplit("/", 1)[1] for s in srcs] == ["a.jsonl", "b.jsonl.gz"]
    assert [s.format for s in srcs] == ["jsonl", "jsonl"]
    records = [r for s in srcs for r, _ in read_records(s)]
    assert records == STANDARD


def test_resolution_errors(tmp_path):
    with pytest.raises(DataError, match="no file matches"):
        resolve_files([str(tmp_path / "*.jsonl")])
    with pytest.raises(DataError, match="does not exist"):
        resolve_files([str(tmp_path / "missing.jsonl")])
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        resolve_files([str(tmp_path / "d.txt")])
    assert resolve_files([str(tmp_path / "d.txt")], "jsonl")[0].format == "jsonl"
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        resolve_files([str(tmp_path / "folder")])


def test_malformed_json_line_names_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(STANDARD[0]) + "\n" + '{"prompt": "x", "chosen": }\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: malformed JSON .*column 27"):
        _read(path)
    path.write_text('["not", "an", "object"]\n')
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        _read(path)


def test_non_utf8_names_line_and_byte_offset(tmp_path):
    good = (json.dumps(STANDARD[0]) + "\n").encode()
    bad = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + bad)
    offset = len(good) + bad.index(b"\xe9")
    with pytest.raises(
        DataError, match=rf"line 2: invalid UTF-8 byte 0xe9 at byte offset {offset}"
    ):
        _read(path)
    (tmp_path / "d.json").write_bytes(b"[\n" + bad.rstrip() + b"\n]")
    with pytest.raises(
        DataError, match=r"d\.json, line 2: invalid UTF-8 byte 0xe9 at byte offset 17"
    ):
        _read(tmp_path / "d.json")
    (tmp_path / "d.csv").write_bytes(b"prompt,chosen,rejected\nQ,a,b\nQ,caf\xe9,b\n")
    with pytest.raises(DataError, match=r"d\.csv, line 3: invalid UTF-8"):
        _read(tmp_path / "d.csv")


def test_very_long_lines(tmp_path):
    long = "word " * 400_000  # 2 MB in one JSONL line and one CSV cell
    write_jsonl(tmp_path / "d.jsonl", [{"prompt": long, "chosen": "a", "rejected": "b"}])
    assert _read(tmp_path / "d.jsonl")[0][0]["prompt"] == long
    with open(tmp_path / "d.csv", "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "chosen", "rejected"], [long, "a", "b"]])
    assert _read(tmp_path / "d.csv")[0][0]["prompt"] == long


def test_a_file_that_cannot_be_opened_is_a_data_error(tmp_path):
    folder = tmp_path / "d.jsonl"
    folder.mkdir()
    with pytest.raises(DataError, match=r"d\.jsonl: cannot read the file \(Is a directory\)"):
        list(read_records(SourceFile(str(folder), "jsonl")))
