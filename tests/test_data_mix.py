"""Hub datasets (offline, from a Hub cache laid out here) and mixtures of sources."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _data_helpers import DataCfg, char_tokenizer, write_jsonl

from preftune.config import SourceConfig
from preftune.data import DataError, load_preference_data
from preftune.data.mix import sample_positions

TOK = char_tokenizer()
MAIN = "0123456789abcdef0123456789abcdef01234567"
V2 = "fedcba9876543210fedcba9876543210fedcba98"


@dataclass
class MixCfg(DataCfg):
    sources: list = field(default_factory=list)
    eval_sources: list = field(default_factory=list)
    system_column: str | None = "system"
    tools_column: str | None = "tools"


def pairs(tag: str, n: int) -> list[dict]:
    return [
        {"prompt": f"{tag} q{i}?", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(n)
    ]


def hub_repo(root, repo, splits, revision=MAIN, ref="main", readme=None, subdir="data"):
    """``root/datasets--org--name/snapshots/<revision>/<subdir>/<split>-00000-of-00001.parquet`` and
    ``refs/<ref>``: the layout huggingface_hub writes."""
    repo_dir = root / ("datasets--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    for split, rows in splits.items():
        (snapshot / subdir).mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist(rows), snapshot / subdir / f"{split}-00000-of-00001.parquet"
        )
    if readme:
        (snapshot / "README.md").write_text(readme)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(revision)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hub cache and no network at all: any connection attempt fails the test."""
    import datasets.config
    import huggingface_hub.constants

    from preftune.data import hub as hub_module

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_module, "_loaded", {})
    root = tmp_path / "hub"
    hub_repo(root, "acme/prefs", {"train": pairs("hub", 6), "test": pairs("held", 2)})
    return root


def cfg(tmp_path, files=(), **kw) -> MixCfg:
    return MixCfg(train_files=[str(f) for f in files], cache_dir=str(tmp_path / "cache"), **kw)


def prompts(data, split="train") -> list[str]:
    ds = data.train if split == "train" else data.eval
    return [TOK.decode(r["prompt_ids"], skip_special_tokens=True) for r in ds]


# ---------------------------------------------------------------------------------------------------
# Hub datasets


def test_a_hub_id_loads_offline_from_the_hub_cache(tmp_path, hub):
    data = load_preference_data(cfg(tmp_path, ["acme/prefs"], eval_files=["acme/prefs"]), TOK)
    assert prompts(data) == [f"hub q{i}?" for i in range(6)]
    assert prompts(data, "eval") == ["held q0?", "held q1?"]  # eval files: the test split
    assert data.shapes == {
        "acme/prefs [split train]": "standard",
        "acme/prefs [split test]": "standard",
    }
    again = load_preference_data(cfg(tmp_path, ["acme/prefs"], eval_files=["acme/prefs"]), TOK)
    assert again.cache_hit and again.fingerprint == data.fingerprint


def test_hub_split_config_and_revision(tmp_path, hub):
    readme = (
        "---\nconfigs:\n- config_name: small\n  data_files:\n  - split: train_prefs\n"
        "    path: small/train_prefs-*.parquet\n---\n"
    )
    hub_repo(hub, "acme/multi", {"train_prefs": pairs("small", 3)}, readme=readme, subdir="small")
    hub_repo(hub, "acme/prefs", {"train": pairs("v2", 2)}, revision=V2, ref="v2")
    sources = [
        SourceConfig(path="acme/multi", config="small", split="train_prefs"),
        SourceConfig(path="acme/prefs", revision="v2"),
        SourceConfig(path="acme/prefs", revision=MAIN, max_rows=1),
    ]
    data = load_preference_data(cfg(tmp_path, sources=sources), TOK)
    assert prompts(data)[:5] == ["small q0?", "small q1?", "small q2?", "v2 q0?", "v2 q1?"]
    assert len(prompts(data)) == 6 and prompts(data)[5].startswith("hub q")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            SourceConfig(path="acme/prefs", split="validation"),
            "acme/prefs: no split 'validation'; it has",
        ),
        (
            SourceConfig(path="acme/missing"),
            "acme/missing: no such local path, and offline mode is on",
        ),
        (SourceConfig(path="acme/prefs", revision="nope"), "at revision nope is not in the local"),
        (SourceConfig(path="acme/prefs", config="other"), "acme/prefs:other: cannot load it"),
        (SourceConfig(path="data/missing.jsonl"), "'data/missing.jsonl' does not exist"),
    ],
)
def test_hub_errors_are_one_line_naming_the_source(tmp_path, hub, source, expected):
    with pytest.raises(DataError) as info:
        load_preference_data(cfg(tmp_path, sources=[source]), TOK)
    message = str(info.value)
    assert message.startswith("data.sources[0]: ") and expected in message, message
    assert "\n" not in message


def test_a_missing_local_path_is_never_a_hub_lookup(tmp_path, monkeypatch):
    from preftune.data import hub as hub_module

    monkeypatch.setattr(hub_module, "split_names", lambda *a: pytest.fail("looked up on the Hub"))
    for name in ("data/train.jsonl", "./acme/prefs", "a/b/c", "pairs.jsonl", "~/x/y"):
        with pytest.raises(DataError, match="does not exist"):
            load_preference_data(cfg(tmp_path, [name]), TOK)
    (tmp_path / "acme").mkdir()
    write_jsonl(tmp_path / "acme" / "prefs", pairs("local", 2))  # an existing path wins
    monkeypatch.chdir(tmp_path)
    data = load_preference_data(cfg(tmp_path, ["acme/prefs"], format="jsonl"), TOK)
    assert prompts(data) == ["local q0?", "local q1?"]


# ---------------------------------------------------------------------------------------------------
# Mixtures


def test_sample_positions_fraction_max_rows_and_seed():
    assert sample_positions(10, None, None, 0, "a") is None
    assert sample_positions(10, 1.0, 10, 0, "a") is None
    picked = sample_positions(10, 0.5, None, 0, "a")
    assert len(picked) == 5 and list(picked) == sorted(set(picked.tolist()))
    assert list(picked) == list(sample_positions(10, 0.5, None, 0, "a"))  # deterministic
    assert list(picked) != list(sample_positions(10, 0.5, None, 1, "a"))  # the seed matters
    assert len(sample_positions(10, 0.5, 3, 0, "a")) == 3  # both: the smaller
    assert len(sample_positions(10, 0.01, None, 0, "a")) == 1  # at least one


def test_a_mixture_is_seeded_per_source_with_its_own_columns(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", pairs("a", 10))
    other = [{"question": f"b q{i}?", "good": f" fine {i}", "bad": f" poor {i}"} for i in range(8)]
    write_jsonl(tmp_path / "b.jsonl", other)
    a = SourceConfig(path=str(tmp_path / "a.jsonl"), fraction=0.5)
    b = SourceConfig(
        path=str(tmp_path / "b.jsonl"),
        max_rows=3,
        prompt_column="question",
        chosen_column="good",
        rejected_column="bad",
    )
    data = load_preference_data(cfg(tmp_path, sources=[a, b]), TOK, seed=7)
    got = prompts(data)
    assert len(got) == 8 and data.rows_read == 8
    from_a, from_b = got[:5], got[5:]
    assert all(p.startswith("a q") for p in from_a) and all(p.startswith("b q") for p in from_b)
    assert from_a == sorted(from_a, key=lambda p: int(p[3:-1]))  # file order kept
    assert [(s["name"], s["records"], s["selected"], s["train"]) for s in data.sources] == [
        (a.path, 10, 5, 5),
        (b.path, 8, 3, 3),
    ]
    assert f"sources {a.path} 5/10, {b.path} 3/8;" in data.summary()
    swapped = load_preference_data(cfg(tmp_path, sources=[b, a]), TOK, seed=7)
    assert set(prompts(swapped)) == set(got)  # each source's sample is its own
    reseeded = load_preference_data(cfg(tmp_path, sources=[a, b]), TOK, seed=8)
    assert prompts(reseeded) != got and reseeded.fingerprint != data.fingerprint


def test_train_files_and_sources_together_with_an_eval_fraction(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", pairs("a", 6))
    write_jsonl(tmp_path / "b.jsonl", [*pairs("b", 10), pairs("b", 1)[0]])  # a duplicate row
    b = SourceConfig(path=str(tmp_path / "b.jsonl"), shape="standard", max_rows=11)
    data = load_preference_data(
        cfg(tmp_path, [tmp_path / "a.jsonl"], sources=[b], eval_fraction=0.25), TOK, seed=3
    )
    table = {s["name"]: s for s in data.sources}
    assert [s["role"] for s in data.sources] == ["train", "train"]
    assert table[str(tmp_path / "a.jsonl")]["records"] == 6
    assert table[b.path]["records"] == 11 and table[b.path]["selected"] == 11
    assert sum(s["train"] for s in data.sources) == len(data.train)
    assert sum(s["eval"] for s in data.sources) == len(data.eval) == 4  # round(0.25 * 17)
    assert sum(s["dropped"] for s in data.sources) == 0
    unseeded = load_preference_data(cfg(tmp_path, [tmp_path / "a.jsonl"]), TOK, seed=1)
    assert load_preference_data(cfg(tmp_path, [tmp_path / "a.jsonl"]), TOK, seed=2).cache_hit
    assert unseeded.sources == [
        {"name": str(tmp_path / "a.jsonl"), "role": "train", "records": 6, "selected": 6,
         "train": 6, "eval": 0, "dropped": 0}
    ]  # fmt: skip


def test_source_errors_name_the_entry(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", pairs("a", 2))
    bad = SourceConfig(path=str(tmp_path / "a.jsonl"), split="train")
    with pytest.raises(DataError, match=r"^data.sources\[0\]: .*a split applies to Hub datasets"):
        load_preference_data(cfg(tmp_path, sources=[bad]), TOK)
    with pytest.raises(DataError, match=r"^data.eval_sources\[0\]: eval files: .*does not exist"):
        load_preference_data(
            cfg(tmp_path, [tmp_path / "a.jsonl"], eval_sources=[SourceConfig(path="x.jsonl")]), TOK
        )
    with pytest.raises(DataError, match="none given"):
        load_preference_data(cfg(tmp_path), TOK)


def test_online_a_hub_that_cannot_be_reached_falls_back_to_the_cache(tmp_path, hub, monkeypatch):
    from preftune.data import hub as hub_module

    monkeypatch.setattr(hub_module, "_offline", lambda: False)
    seen = []

    def fake(where, **kwargs):
        seen.append(where)
        if where.startswith("acme/"):
            raise ConnectionError("no route to huggingface.co")
        return ["train", "test"]

    assert hub_module._call("acme/prefs", "acme/prefs", fake, revision=None) == ["train", "test"]
    assert seen[0] == "acme/prefs" and seen[1].endswith(f"snapshots/{MAIN}")
    with pytest.raises(
        DataError, match="acme/gone: the Hub cannot be reached and the dataset is not"
    ):
        hub_module._call("acme/gone", "acme/gone", fake, revision=None)
