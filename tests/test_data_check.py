"""preftune.data.check: validation without a tokenizer (schema, shapes, every bad row, character lengths)."""

from __future__ import annotations

import csv

import pyarrow as pa
import pyarrow.parquet as pq
from _data_helpers import STANDARD, DataCfg, conversational, write_jsonl

from preftune.config import SourceConfig
from preftune.data.check import check_records


def cfg(tmp_path, files=(), **kw) -> DataCfg:
    sources = kw.pop("sources", [])
    data = DataCfg(train_files=[str(f) for f in files], **kw)
    data.sources, data.eval_sources = sources, []
    return data


def test_every_bad_row_is_reported_with_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [*STANDARD, {"prompt": "x", "chosen": 3, "rejected": "y"}])
    with path.open("a") as f:
        f.write("not json\n")
        f.write('{"prompt": "p", "chosen": "a"}\n')
        f.write('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    d = check_records(cfg(tmp_path, [path]))
    (report,) = d["files"]
    assert (report["format"], report["shape"], report["error"]) == ("jsonl", "standard", None)
    assert (report["records"], report["valid"], report["bad"]) == (7, 4, 3)
    assert report["types"] == {"prompt": "str", "chosen": "int|str", "rejected": "str"}
    assert d["bad_rows"] == [
        f"{path}, line 4: field 'chosen' must be a string, got int",
        f"{path}, line 5: malformed JSON (Expecting value at column 1); expected one JSON object per line",
        f"{path}, line 6: column 'rejected' not found; available columns: 'prompt', 'chosen'. Set the "
        "column names in the data config (prompt_column / chosen_column / rejected_column / weight_column).",
    ]
    # chosen of the valid rows: " Paris.", " eight", " blue", "a"
    assert d["lengths"]["chosen"] == {"p50": 5, "p90": 7, "p99": 7, "max": 7}
    assert (d["valid"], d["bad"], d["errors"]) == (4, 3, 0)


def test_files_that_cannot_be_read_are_that_files_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "q.jsonl", [{"question": "p", "chosen": "a", "rejected": "b"}])
    write_jsonl(tmp_path / "good.jsonl", STANDARD)
    files = [tmp_path / "empty.jsonl", tmp_path / "q.jsonl", tmp_path / "good.jsonl"]
    d = check_records(cfg(tmp_path, files, shape="standard"))
    errors = [f["error"] for f in d["files"]]
    assert errors[0] == f"{files[0]}: the file is empty; expected preference records"
    assert errors[1].startswith(f"{files[1]}: column 'prompt' not found")
    assert errors[2] is None and d["files"][2]["valid"] == 3
    assert d["errors"] == 2


def test_columnar_schema_shapes_and_the_mixture(tmp_path):
    pq.write_table(pa.Table.from_pylist(conversational(6)), tmp_path / "c.parquet")
    with open(tmp_path / "s.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows(
            [["prompt", "chosen", "rejected"], ["p", "a", "b"], ["p", "a"], ["q", "c", "d"]]
        )
    source = SourceConfig(path=str(tmp_path / "c.parquet"), max_rows=2)
    d = check_records(cfg(tmp_path, [tmp_path / "s.csv"], sources=[source]), seed=5)
    csv_report, parquet_report = d["files"]
    assert csv_report["bad"] == 1 and "line 3: expected 3 fields" in d["bad_rows"][0]
    assert csv_report["records"] == 3 and csv_report["valid"] == 2
    assert (
        parquet_report["shape"] == "conversational" and parquet_report["types"]["prompt"] == "list"
    )
    assert (parquet_report["records"], parquet_report["selected"], parquet_report["valid"]) == (
        6,
        2,
        2,
    )
    assert [(s["records"], s["selected"]) for s in d["sources"]] == [(3, 3), (6, 2)]
    # message lengths: the content of the prompt's messages, summed ("be brief" + "question 0?")
    assert d["lengths"]["prompt"]["max"] == len("be brief") + len("question 0?")
