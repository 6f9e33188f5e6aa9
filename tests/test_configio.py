"""preftune._configio on a toy schema: lists of sections, null resets, exclusive pairs, hints."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml

from preftune._configio import (
    ConfigError,
    apply_overrides,
    build,
    config_to_dict,
    format_config,
    setting,
)


@dataclass
class Item:
    path: str = setting("", "where")
    share: float | None = setting(None, "a share")
    tags: list[str] = setting([], "labels")


@dataclass
class Inner:
    items: list[Item] = setting([], "entries")
    size: int = setting(3, "a size")
    files: list[str] = setting([], "files")
    part: float = setting(0.0, "a part")


@dataclass
class Root:
    inner: Inner = setting(Inner, "a section")
    name: str | None = setting("x", "a name")


HINTS = {"rank": "inner.size", "inner.items[].where": "inner.items[].path"}


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_a_list_of_sections_is_built_and_each_entry_checked():
    cfg = build(Root, {"inner": {"items": [{"path": "a", "share": "0.5"}, {"path": 7}]}})
    assert cfg.inner.items == [Item("a", 0.5), Item("7")]
    assert isinstance(cfg.inner.items[0], Item) and cfg.inner.items[0].tags == []
    msg = error(build, Root, {"inner": {"items": [{"path": "a"}, {"share": "lots"}]}})
    assert msg == "inner.items[1].share: expected a number, got 'lots' (or null)"
    msg = error(build, Root, {"inner": {"items": [{"pth": "a"}]}})
    assert msg == "unknown key 'inner.items[0].pth' (did you mean 'inner.items[0].path'?)"
    assert error(build, Root, {"inner": {"items": ["a"]}}) == (
        "inner.items[0]: expected a mapping, got 'a'"
    )
    assert config_to_dict(cfg)["inner"]["items"][0] == {"path": "a", "share": 0.5, "tags": []}


def test_overrides_reach_list_entries():
    cfg = apply_overrides(Root(), ["inner.items=[{path: a}, {path: b, tags: [t]}]"])
    apply_overrides(cfg, ["inner.items[0].share=0.25", "inner.items[1]={path: c}"])
    assert cfg.inner.items == [Item("a", 0.25), Item("c")]
    assert error(apply_overrides, cfg, ["inner.items[2].share=1"]) == (
        "inner.items[2]: no such entry; 'items' has entries 0 to 1"
    )
    assert error(apply_overrides, cfg, ["inner.size[0]=1"]) == "inner.size[0]: 'size' is not a list"
    assert "inner.items[0].share: expected a number" in error(
        apply_overrides, cfg, ["inner.items[0].share=x"]
    )


def test_format_shows_entries_by_their_non_default_fields_and_reads_back():
    cfg = apply_overrides(Root(), ["inner.items=[{path: a, share: 0.5}, {path: b}]"])
    text = format_config(cfg)
    assert "items: [{path: a, share: 0.5}, {path: b}]  # entries" in text
    assert build(Root, yaml.safe_load(text)) == cfg


def test_null_resets_to_the_default_unless_null_is_allowed(caplog):
    caplog.set_level("INFO", logger="preftune.config")
    cfg = apply_overrides(Root(), ["inner.size=9", "inner.files=[a]", "name=y"])
    apply_overrides(cfg, ["inner.size=null", "inner.files=~", "name=null"])
    assert (cfg.inner.size, cfg.inner.files, cfg.name) == (3, [], None)
    assert "inner.size=null: its default 3" in caplog.text
    assert build(Root, {"inner": {"files": None, "size": None}}).inner == Inner()
    assert apply_overrides(Root(), ["name=none"]).name is None  # optional: none is null too
    assert apply_overrides(Root(), ["inner.files=none"]).inner.files == ["none"]  # a string here


def test_exclusive_settings_the_later_one_wins(caplog):
    caplog.set_level("INFO", logger="preftune.config")
    pairs = [("inner.files", "inner.part")]
    cfg = apply_overrides(Root(), ["inner.part=0.5", "inner.files=[f]"], exclusive=pairs)
    assert cfg.inner.files == ["f"] and cfg.inner.part == 0.0
    assert "inner.files set after inner.part=0.5: the later setting wins" in caplog.text
    cfg = apply_overrides(cfg, ["inner.part=0.2"], exclusive=pairs)
    assert cfg.inner.files == [] and cfg.inner.part == 0.2
    cfg = apply_overrides(cfg, ["inner.files=[]"], exclusive=pairs)  # clearing clears nothing else
    assert cfg.inner.part == 0.2
    both = apply_overrides(Root(), ["inner.part=0.5", "inner.files=[f]"])  # no pairs: both stay
    assert both.inner.part == 0.5 and both.inner.files == ["f"]


def test_hints_name_the_key_a_foreign_name_stands_for():
    assert error(apply_overrides, Root(), ["rank=4"], hints=HINTS) == (
        "unknown key 'rank' (did you mean 'inner.size'?)"
    )
    assert error(build, Root, {"inner": {"rank": 4}}, hints=HINTS) == (
        "unknown key 'inner.rank' (did you mean 'inner.size'?)"
    )
    cfg = apply_overrides(Root(), ["inner.items=[{path: a}, {path: b}]"])
    assert error(apply_overrides, cfg, ["inner.items[1].where=x"], hints=HINTS) == (
        "unknown key 'inner.items[1].where' (did you mean 'inner.items[1].path'?)"
    )
    msg = error(build, Root, {"inner": {"items": [{"where": "a"}]}}, hints=HINTS)
    assert msg == "unknown key 'inner.items[0].where' (did you mean 'inner.items[0].path'?)"
    # without hints: the closest name in the section, as before
    assert error(apply_overrides, cfg, ["inner.items[1].pat=x"]) == (
        "unknown key 'inner.items[1].pat' (did you mean 'inner.items[1].path'?)"
    )
