import hashlib
import json
from types import SimpleNamespace

import pytest

from rugpt_assets.core.sources import (
    SOURCES,
    SOURCES_BY_NAME,
    RawLineError,
    SourceHubError,
    SourceNotFoundError,
    content_hash,
    load_local,
    normalize_rows,
    read_hub,
    read_local,
    read_snapshot,
    write_snapshot,
)
from rugpt_assets.settings import BUNDLED_SAMPLES_DIR, PACKAGE_DIR

SAIGA = SOURCES_BY_NAME["ru_turbo_saiga"]
ALPACA = SOURCES_BY_NAME["ru_turbo_alpaca"]
ROLEPLAY = SOURCES_BY_NAME["gpt_roleplay_realm"]

CHAT = [
    {"role": "system", "content": "Отвечай кратко."},
    {"role": "user", "content": "Привет!"},
    {"role": "bot", "content": "Здравствуйте!"},
]


def flat(messages):
    return {"role": [m["role"] for m in messages], "content": [m["content"] for m in messages]}


def test_specs_in_recipe_order_with_hub_layout_names():
    assert [s.name for s in SOURCES] == [
        "ru_instruct_gpt4",
        "ru_turbo_alpaca_evol_instruct",
        "ru_turbo_alpaca",
        "ru_turbo_saiga",
        "ru_sharegpt_cleaned",
        "oasst1_ru_main_branch",
        "gpt_roleplay_realm",
    ]
    assert SOURCES_BY_NAME["ru_instruct_gpt4"].local_dirname == "lksy__ru_instruct_gpt4"
    assert ROLEPLAY.repo == "IlyaGusev/gpt_roleplay_realm" and ROLEPLAY.split == "ru"
    assert ROLEPLAY.local_path(BUNDLED_SAMPLES_DIR) == BUNDLED_SAMPLES_DIR / "IlyaGusev__gpt_roleplay_realm" / "ru.jsonl"


def test_both_message_list_forms_normalize_identically():
    snap = normalize_rows(SAIGA, [{"messages": CHAT, "source": "x"}, {"messages": flat(CHAT)}])
    assert snap.rows == [{"messages": CHAT}, {"messages": CHAT}]
    assert snap.rejected == {}


def test_roleplay_forms_normalize_identically():
    example = [{"role": "user", "content": "Кто ты?"}, {"role": "char", "content": "Дракон."}]
    chats = [
        [{"role": "operator", "content": "Сцена: перевал."}, {"role": "char", "content": "Стой!"}],
        [{"role": "user", "content": "Загадку!"}, {"role": "char", "content": "Слушай."}],
    ]
    base = {"name": "Огнезар", "context": "Древний дракон.", "greeting": "Стой, путник!", "topics": ["фэнтези"]}
    dialogues = [{"chat": c, "topic": f"t{i}"} for i, c in enumerate(chats)]
    as_lists = {**base, "example_dialogue": example, "dialogues": dialogues}
    flat_inner = {**base, "example_dialogue": flat(example), "dialogues": [{"chat": flat(c)} for c in chats]}
    flat_outer = {
        **base,
        "example_dialogue": flat(example),
        "dialogues": {"chat": [flat(c) for c in chats], "topic": ["t0", "t1"]},
    }
    snap = normalize_rows(ROLEPLAY, [as_lists, flat_inner, flat_outer])
    expected = {
        "name": "Огнезар",
        "context": "Древний дракон.",
        "greeting": "Стой, путник!",
        "example_dialogue": example,
        "dialogues": [{"chat": c} for c in chats],
    }
    assert snap.rows == [expected] * 3


def test_only_what_no_path_can_read_is_rejected():
    raw = [
        {"messages": CHAT},
        {"messages": flat(CHAT)},
        {"messages": "user: привет"},  # wrong_type
        {"chat": CHAT},  # no messages column: null, as datasets gives it: wrong_type
        RawLineError(7, "Expecting ',' delimiter"),
        {"messages": {"role": ["user"], "content": ["раз", "два"]}},  # wrong_type: a longer later list
        ["not", "an", "object"],
        {"messages": [CHAT[0], "bot: да"]},  # wrong_type: not an object
        # Values are the recipe's to judge, where it reads them:
        {"messages": [{"role": "assistant", "content": None}]},
        {"messages": [{"role": "user"}]},
    ]
    snap = normalize_rows(SAIGA, raw)
    assert snap.rows == [
        {"messages": CHAT},
        {"messages": CHAT},
        {"messages": [{"role": "assistant", "content": None}]},
        {"messages": [{"role": "user"}]},
    ]
    assert snap.rows_read == 10
    assert snap.rows_kept + sum(snap.rejected.values()) == snap.rows_read
    assert snap.rejected == {"wrong_type:messages": 4, "malformed_json": 1, "not_an_object": 1}
    assert snap.reject_examples[:2] == ["row 3: wrong_type:messages", "row 4: wrong_type:messages"]
    assert "line 7: malformed_json (Expecting ',' delimiter)" in snap.reject_examples


def test_flattened_lists_are_read_key_by_key_as_rulm_reads_them():
    rows = [
        {"messages": {"role": ["user", "bot"], "content": ["Привет"]}},  # shorter: the last has no content
        {"messages": {"role": [], "content": ["Привет"]}},  # the first non-empty list sets the count
        {"messages": {"role": [], "content": []}},
        {"messages": {"role": ["user"], "content": ["Привет"], "lang": ["ru"]}},  # every key is kept
    ]
    assert [r["messages"] for r in normalize_rows(SAIGA, rows).rows] == [
        [{"role": "user", "content": "Привет"}, {"role": "bot"}],
        [{"content": "Привет"}],
        [],
        [{"role": "user", "content": "Привет", "lang": "ru"}],
    ]


def test_value_columns_are_kept_as_they_are():
    good = {"instruction": "Сложи.", "input": None, "output": "4", "alternative_output": None, "label": "ok"}
    snap = normalize_rows(
        ALPACA,
        [good, {**good, "instruction": 42}, {k: v for k, v in good.items() if k != "alternative_output"}],
    )
    assert snap.rows == [
        {"instruction": "Сложи.", "input": None, "output": "4", "alternative_output": None},
        {"instruction": 42, "input": None, "output": "4", "alternative_output": None},
        {"instruction": "Сложи.", "input": None, "output": "4", "alternative_output": None},  # missing: null
    ]
    assert snap.rejected == {}


def test_roleplay_structure():
    row = {
        "name": None,
        "context": "Кот.",
        "greeting": "Мур.",
        "example_dialogue": [{"role": "operator", "content": "Сцена."}],
        "dialogues": [{"chat": [{"role": "narrator", "content": "Мяу."}]}],
    }
    snap = normalize_rows(
        ROLEPLAY,
        [
            row,
            {**row, "example_dialogue": "не список", "dialogues": []},  # read only on some draws: kept
            {**row, "dialogues": [{"text": "Мяу"}]},  # a dialogue without a chat
            {**row, "dialogues": [{"chat": "Мяу"}]},
            {**row, "dialogues": None},
        ],
    )
    assert snap.rows == [row, {**row, "example_dialogue": "не список", "dialogues": []}]
    assert snap.rejected == {"wrong_type:dialogues": 3}


def test_read_local_yields_line_errors_and_skips_blank_lines(tmp_path):
    path = SAIGA.local_path(tmp_path)
    path.parent.mkdir()
    good = json.dumps({"messages": CHAT}, ensure_ascii=False)
    path.write_bytes(f'{good}\n\n{{"messages": [\n'.encode() + b'{"messages": "\xff"}\n' + f"{good}\n".encode())
    rows = list(read_local(SAIGA, tmp_path))
    assert rows[0] == {"messages": CHAT} and rows[3] == {"messages": CHAT}
    assert isinstance(rows[1], RawLineError) and rows[1].line == 3
    assert isinstance(rows[2], RawLineError) and rows[2].line == 4 and rows[2].reason == "not_utf8"
    assert load_local(SAIGA, tmp_path).rejected == {"malformed_json": 1, "not_utf8": 1}


def test_missing_source_error_names_dataset_path_and_fix(tmp_path):
    spec = SOURCES_BY_NAME["oasst1_ru_main_branch"]
    with pytest.raises(SourceNotFoundError) as e:
        read_local(spec, tmp_path)  # raises at once, not on first iteration
    message = str(e.value)
    assert "oasst1_ru_main_branch" in message
    assert str(tmp_path / "IlyaGusev__oasst1_ru_main_branch" / "train.jsonl") in message
    assert "RUGPT_SOURCES_DIR" in message and "hub profile" in message

    (tmp_path / "IlyaGusev__oasst1_ru_main_branch").mkdir()
    (tmp_path / "IlyaGusev__oasst1_ru_main_branch" / "validation.jsonl").write_text("")
    with pytest.raises(SourceNotFoundError, match="the folder holds: validation.jsonl"):
        content_hash(spec, tmp_path)


def test_content_hash_is_the_file_sha256(tmp_path):
    path = SAIGA.local_path(tmp_path)
    path.parent.mkdir()
    path.write_text('{"messages": []}\n')
    first = content_hash(SAIGA, tmp_path)
    assert first == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_text('{"messages": []}\n{"messages": []}\n')
    assert content_hash(SAIGA, tmp_path) != first


def test_snapshot_round_trip(tmp_path):
    snap = normalize_rows(SAIGA, [{"messages": flat(CHAT)}])
    assert write_snapshot(snap, tmp_path) == tmp_path / "rows.jsonl"
    assert read_snapshot(tmp_path) == [{"messages": CHAT}]
    with pytest.raises(FileNotFoundError, match="materialize"):
        read_snapshot(tmp_path / "nothing")


# --- bundled samples ---------------------------------------------------------------------------

EXPECTED_SAMPLES = {
    "ru_instruct_gpt4": (24, {"malformed_json": 1}),
    "ru_turbo_alpaca_evol_instruct": (23, {"malformed_json": 1}),
    "ru_turbo_alpaca": (26, {"malformed_json": 1}),
    "ru_turbo_saiga": (25, {"malformed_json": 1, "wrong_type:messages": 1}),
    "ru_sharegpt_cleaned": (19, {"malformed_json": 1, "wrong_type:messages": 1}),
    "oasst1_ru_main_branch": (22, {}),
    "gpt_roleplay_realm": (9, {"malformed_json": 1, "wrong_type:dialogues": 1}),
}


@pytest.mark.parametrize("spec", SOURCES, ids=lambda s: s.name)
def test_bundled_samples_load(spec):
    snap = load_local(spec, BUNDLED_SAMPLES_DIR)
    assert (snap.rows_kept, snap.rejected) == EXPECTED_SAMPLES[spec.name]
    assert snap.rows_read == snap.rows_kept + sum(snap.rejected.values())


def _bad(text, phrases):
    return isinstance(text, str) and any(p in text.lower() for p in phrases)


def length(messages):
    return sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))


def test_bundled_samples_cover_the_recipe_branches():
    phrases = [
        line.rstrip("\n")
        for line in (PACKAGE_DIR / "data" / "rulm_bad_substrings.txt").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    rows = {s.name: load_local(s, BUNDLED_SAMPLES_DIR).rows for s in SOURCES}

    gpt4 = rows["ru_instruct_gpt4"]
    assert {bool(r["input"]) for r in gpt4} == {True, False}
    assert any(r["full_output"] == "" for r in gpt4)
    assert any(_bad(r["full_output"], phrases) for r in gpt4)
    assert any(len(r["instruction"]) + len(r["full_output"] or "") > 2000 for r in gpt4 if isinstance(r["instruction"], str))
    assert any(_bad(r["output"], phrases) for r in rows["ru_turbo_alpaca_evol_instruct"])
    alpaca = rows["ru_turbo_alpaca"]
    assert any(_bad(r["alternative_output"], phrases) and not _bad(r["output"], phrases) for r in alpaca)
    assert any(_bad(r["alternative_output"], phrases) and _bad(r["output"], phrases) for r in alpaca)
    saiga = [r["messages"] for r in rows["ru_turbo_saiga"]]
    assert any(m[0]["role"] == "system" for m in saiga)
    assert any(_bad(m["content"], phrases) for c in saiga for m in c)
    for name in ("ru_sharegpt_cleaned", "oasst1_ru_main_branch"):
        assert any(length(r["messages"]) > 10000 and len(r["messages"]) > 2 for r in rows[name])
    # trimming the last two messages leaves nothing
    assert any(length(r["messages"]) > 10000 and len(r["messages"]) <= 2 for r in rows["ru_sharegpt_cleaned"])
    dialogues = [d["chat"] for r in rows["gpt_roleplay_realm"] for d in r["dialogues"]]
    assert len(dialogues) >= 15 and any(m["role"] == "operator" for c in dialogues for m in c)

    # both message-list forms appear in every file that has message lists
    for spec in SOURCES[3:]:
        column = "dialogues" if spec is ROLEPLAY else "messages"
        kinds = {type(raw.get(column)) for raw in read_local(spec, BUNDLED_SAMPLES_DIR) if isinstance(raw, dict)}
        assert {list, dict} <= kinds, spec.name


# --- hub reader (no network: the libraries are replaced) ----------------------------------------


def _fake_hub(monkeypatch, load=None, info_error=None):
    import datasets
    import huggingface_hub

    calls = {}

    class FakeApi:
        def dataset_info(self, repo_id, *, revision=None, token=None):
            calls["info"] = (repo_id, revision, token)
            if info_error:
                raise info_error
            return SimpleNamespace(sha="0123abcd" * 5)

    def fake_load_dataset(path, *, split, revision, token):
        calls["load"] = (path, split, revision, token)
        return load() if load else [{"messages": flat(CHAT)}]

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_read_hub_returns_rows_and_the_resolved_sha(monkeypatch):
    calls = _fake_hub(monkeypatch)
    rows, revision = read_hub(SAIGA, revision="main", token="hf_x")
    assert revision == "0123abcd" * 5
    assert calls["info"] == ("IlyaGusev/ru_turbo_saiga", "main", "hf_x")
    # the data is read at the sha that is reported, not at a moving branch
    assert calls["load"] == ("IlyaGusev/ru_turbo_saiga", "train", revision, "hf_x")
    assert normalize_rows(SAIGA, rows).rows == [{"messages": CHAT}]


def test_read_hub_wraps_load_errors(monkeypatch):
    def boom():
        raise ConnectionError("Couldn't reach 'IlyaGusev/gpt_roleplay_realm' on the Hub")

    _fake_hub(monkeypatch, load=boom)
    with pytest.raises(SourceHubError) as e:
        read_hub(ROLEPLAY, revision=None, token=None)
    message = str(e.value)
    assert "IlyaGusev/gpt_roleplay_realm" in message and "split 'ru'" in message
    assert "default branch" in message and "HF_TOKEN" in message and "Couldn't reach" in message
    assert isinstance(e.value.__cause__, ConnectionError)


def test_read_hub_wraps_revision_errors(monkeypatch):
    _fake_hub(monkeypatch, info_error=ValueError("Revision Not Found for url"))
    with pytest.raises(SourceHubError, match=r"revision v9.*Revision Not Found.*HF_TOKEN"):
        read_hub(ALPACA, revision="v9", token=None)
