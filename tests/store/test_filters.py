"""containerd filter syntax: operators, quoting, presence, combination and every malformed form."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cowstore.errors import InvalidArgument
from cowstore.filters import compile_filters

BASE = {"name": "base", "kind": "committed", "parent": "", "labels": {"containerd.io/gc.root": "x"}}
CHILD = {"name": "ctr/1", "kind": "active", "parent": "base", "labels": {"tier": "2", "a.b": "dotted"}}
VIEW = {"name": "v", "kind": "view", "parent": "base", "labels": {}}
CORPUS = {"base": BASE, "ctr/1": CHILD, "v": VIEW}


def selected(*filters: str) -> list[str]:
    match = compile_filters(filters)
    return [name for name, fields in CORPUS.items() if match(fields)]


def test_no_filters_match_everything():
    assert selected() == ["base", "ctr/1", "v"]


def test_an_empty_filter_string_matches_everything():
    assert selected("") == ["base", "ctr/1", "v"]
    assert selected("", "name==nothing") == ["base", "ctr/1", "v"]


def test_equal_selects_the_field_value():
    assert selected("kind==active") == ["ctr/1"]
    assert selected("name==ctr/1") == ["ctr/1"]


def test_not_equal_excludes_the_field_value():
    assert selected("kind!=active") == ["base", "v"]


def test_regexp_is_an_unanchored_search():
    assert selected("name~=t") == ["ctr/1"]
    assert selected("name~=^v$") == ["v"]
    assert selected("kind~=(view|active)") == ["ctr/1", "v"]


def test_regexp_accepts_slash_and_pipe_delimiters_with_escapes():
    assert selected("name~=/^ctr\\/1$/") == ["ctr/1"]
    assert selected("name~=|^ctr/|") == ["ctr/1"]
    assert selected("name~=/[abc]{1,2}/") == ["base", "ctr/1"]
    assert selected('name~="^b"') == ["base"]


def test_commas_and_selectors_and_separate_filters_or_them():
    assert selected("kind!=committed,labels.tier") == ["ctr/1"]
    assert selected("kind==view", "labels.tier==2") == ["ctr/1", "v"]
    assert selected("kind==view,labels.tier==2") == []


def test_bare_field_path_tests_presence():
    assert selected("labels.tier") == ["ctr/1"]
    assert selected("name") == ["base", "ctr/1", "v"]
    assert selected("labels.nope") == []
    assert selected("labels") == []
    assert selected("size") == []


def test_parent_is_present_even_without_a_parent():
    assert selected("parent") == ["base", "ctr/1", "v"]
    assert selected('parent==""') == ["base"]
    assert selected('parent!=""') == ["ctr/1", "v"]
    assert selected("parent==base") == ["ctr/1", "v"]


def test_equal_never_matches_an_absent_field():
    assert selected('labels.tier==""') == []


def test_not_equal_and_regexp_compare_an_absent_field_as_empty():
    assert selected("labels.tier!=2") == ["base", "v"]
    assert selected('labels.tier!=""') == ["ctr/1"]
    assert selected("labels.tier~=^$") == ["base", "v"]


def test_quoted_label_key_may_hold_dots_and_slashes():
    assert selected('labels."containerd.io/gc.root"==x') == ["base"]
    assert selected('labels."containerd.io/gc.root"') == ["base"]


def test_label_path_components_join_with_dots():
    assert selected("labels.a.b==dotted") == ["ctr/1"]
    assert selected('labels."a".b') == ["ctr/1"]


def test_unquoted_fields_take_letters_digits_dash_and_underscore():
    match = compile_filters(["labels.gc-root_2==on"])
    assert match({"labels": {"gc-root_2": "on"}})
    assert not match({"labels": {"gc-root_2": "off"}})


def test_quoted_values_keep_commas_spaces_and_operators():
    match = compile_filters(['labels.note=="a, b == c"'])
    assert match({"labels": {"note": "a, b == c"}})
    assert not match({"labels": {"note": "a"}})


def test_bare_values_take_punctuation_and_quote_characters_literally():
    match = compile_filters(["labels.v==omg_asdf.asdf-qwer/x:y=z'q'\"", "name==牛"])
    assert match({"labels": {"v": "omg_asdf.asdf-qwer/x:y=z'q'\""}})
    assert match({"name": "牛"})
    assert not match({"name": "cow"})


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        (r'"a\nb\tc"', "a\nb\tc"),
        (r'"say \"hi\""', 'say "hi"'),
        (r'"back\\slash"', "back\\slash"),
        (r'"\x41\101"', "AA"),
        (r'"\xc3\xa9"', "é"),
        (r'"\u00e9\U0001F600"', "é😀"),
        (r'"\a\b\f\r\v"', "\a\b\f\r\v"),
    ],
)
def test_quoted_strings_decode_go_escapes(literal: str, expected: str):
    assert compile_filters([f"labels.{literal}=={literal}"])({"labels": {expected: expected}})
    assert not compile_filters([f"labels.k=={literal}"])({"labels": {"k": literal}})


def test_invalid_utf8_bytes_match_no_label():
    assert not compile_filters([r'name=="\xff"'])({"name": "\xff"})


def test_whitespace_may_precede_fields_operators_and_values():
    assert selected("  kind == active, labels. tier") == ["ctr/1"]
    assert selected('kind\t==\u3000"view"') == ["v"]


def test_regexps_compile_once_when_the_filter_does(monkeypatch):
    match = compile_filters(["name~=^c", "name~=1$"])

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled at match time")

    monkeypatch.setattr(re, "compile", refuse)
    assert match(CHILD)
    assert not match(BASE)


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("name==", 6),
        ("==x", 0),
        ("name=x", 4),
        ("name<>x", 4),
        ("name===x", 4),
        ("name~~x", 4),
        ("labels.", 7),
        ("labels..x", 7),
        (".name", 0),
        ("name==x,", 8),
        (",name", 0),
        ("name==x,,kind", 8),
        ("name==,kind", 6),
        ("name==x ", 7),
        ("name ", 5),
        ("name ,kind", 5),
        ("labels .x", 7),
        ("name==x y", 7),
        ("name==x\x01", 7),
        ('name=="x', 6),
        ('labels."a\nb"', 7),
        ("name~=/x", 6),
        ('name=="\\q"', 7),
        ('name=="\\xz1"', 7),
        ('name=="\\u12"', 7),
        ('name=="\\777"', 7),
        ('name=="\\U00110000"', 7),
        ('name=="\\\'"', 7),
        ("name==/x/", 6),
        ("name!=|x|", 6),
        ("labels.|x|", 7),
        ("labels.'x'", 7),
        ("name~=(", 6),
        ("name~=[z-a]", 6),
        ("name~=/a{2,1}/", 6),
        ("name==\0", 6),
        ("na\0me", 2),
        (" ", 1),
        ("labels.?x", 7),
    ],
)
def test_malformed_filters_raise_invalid_argument_naming_filter_and_position(text: str, position: int):
    with pytest.raises(InvalidArgument, match=f"at position {position}:") as raised:
        compile_filters(["name==ok", text])
    assert repr(text) in str(raised.value)


def test_filters_must_be_a_sequence_of_strings():
    with pytest.raises(InvalidArgument):
        compile_filters("name==x")
    with pytest.raises(InvalidArgument):
        compile_filters([b"name==x"])  # type: ignore[list-item]


def test_containerd_check_walk_table():
    root = {"containerd.io/gc.root": "check-walk"}
    snapshots = {
        "a-np": ("active", "", root),
        "p": ("committed", "", root),
        "a": ("active", "p", root),
        "v": ("view", "p", root),
        "p-wl": ("committed", "", {**root, "l": "1"}),
        "a-wl": ("active", "p-wl", {**root, "l": "2"}),
        "v-wl": ("view", "p-wl", {**root, "l": "3"}),
        "a-np-wl": ("active", "", {**root, "l": "2"}),
    }
    gc = 'labels."containerd.io/gc.root"==check-walk'
    fields = {n: {"name": n, "kind": k, "parent": p, "labels": lb} for n, (k, p, lb) in snapshots.items()}
    table = [
        ([gc], set(snapshots)),
        ([f"kind==active,{gc}"], {"a-np", "a", "a-wl", "a-np-wl"}),
        ([f"kind==view,{gc}"], {"v", "v-wl"}),
        ([f"kind==committed,{gc}"], {"p", "p-wl"}),
        (["name==p", "name==a-np-wl"], {"p", "a-np-wl"}),
        (["name==a-wl,labels.l"], {"a-wl"}),
        (["parent==p"], {"a", "v"}),
        ([f'parent!="",{gc}'], {"a", "v", "a-wl", "v-wl"}),
        (["labels.l"], {"p-wl", "a-wl", "v-wl", "a-np-wl"}),
        (["labels.l==2"], {"a-wl", "a-np-wl"}),
    ]
    for filters, expected in table:
        match = compile_filters(filters)
        assert {n for n, f in fields.items() if match(f)} == expected, filters


PIECES = [*"abl.,=\"!~/|\\ x0'\n\0é-_", "labels.", "==", "\\x4"]
SYNTAX = st.lists(st.sampled_from(PIECES), max_size=20).map("".join)


@given(st.lists(st.one_of(st.text(max_size=40), SYNTAX), max_size=3))
def test_any_text_compiles_or_raises_invalid_argument(filters: list[str]):
    try:
        match = compile_filters(filters)
    except InvalidArgument:
        return
    assert match(CHILD) in (True, False)
    assert match({}) in (True, False)
