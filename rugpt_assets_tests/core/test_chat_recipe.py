"""The rulm chat recipe, one test per rule, on hand-made rows (the parity with rulm itself is
test_chat_recipe_parity.py).

Expected records are written out by hand. For the random steps they follow from the sequence
of ``random.Random(42)``, printed once to write these tests; each step is given the generator
directly:
    random() x 6:                                   0.6394, 0.0250, 0.2750, 0.2232, 0.7365, 0.6767
    random(), randrange(1), random(), random():     0.6394, 0, 0.7416, 0.2449
      then shuffle(list(range(4))):                 [3, 0, 2, 1]
    shuffle(list(range(10))):                       [7, 3, 2, 8, 5, 6, 9, 4, 0, 1]
    the calls of test_step7_mix_into_saiga:         random() 0.6394, randrange(3) 0;
        random() 0.7416, randrange(3) 0, 0, 0, 2;   random() 0.1025;
        random() 0.7407, randrange(4) 0, 3;         random() 0.0318
    the whole recipe: the same generator after 11 choice() calls (step 4, datasketch's storage name):
    random() 0.7407, randrange(1) 0, random() 0.5905, random() 0.0318; shuffle(list(range(4))): [1, 2, 3, 0]
"""

from __future__ import annotations

import copy
import hashlib
import random
import struct
from dataclasses import replace

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from rugpt_assets.core import chat_recipe as cr
from rugpt_assets.core.configs import RecipeConfig

CONFIG = RecipeConfig()
BAD = cr.BadSubstrings(["openai", " ул. "])


def user(content):
    return {"role": "user", "content": content}


def bot(content):
    return {"role": "bot", "content": content}


def system(content):
    return {"role": "system", "content": content}


def rec(source, *messages):
    return {"messages": list(messages), "source": source}


# --- bad substrings -----------------------------------------------------------------------


def test_packaged_list_is_rulms_phrases_as_written():
    phrases = cr.load_bad_substrings()
    assert len(phrases) == 77
    assert phrases[:3] == [" ул. ", " +7", "как ии"]  # surrounding spaces kept
    assert phrases[26] == "как иси-ассистентai помощник"  # two phrases run together, as in rulm
    assert phrases[-1] == "всего лишь искуственный интеллект"


def test_bad_substring_rule_on_rulms_list():
    bad = cr.BadSubstrings(cr.load_bad_substrings())
    assert bad("Офис: Москва, УЛ. Тверская, 1")  # lower-cased before matching
    assert not bad("Поставь стул. Садись.")  # " ул. " needs the space before it
    assert bad("Звоните: +7 999 000-00-00")
    assert not bad("Посчитай 5+7.")
    assert bad("Я ChatGPT, и я здесь.")
    assert bad("Sorry, I can't.")
    assert bad("как иси-ассистентai помощник")
    assert not bad("как иси-ассистент")  # neither half of the run-together line is a phrase
    assert not bad("ai помощник")
    assert not bad("Столица Франции — Париж.")


def test_bad_substrings_match_anywhere_in_lower_cased_text():
    bad = cr.BadSubstrings(["ab", "abc", "b d", "x.y"])
    assert [bad(t) for t in ["zzab", "AB", "a b", "b  d", "b d", "xzy", "X.Y", ""]] == [
        True, True, False, False, True, False, True, False,
    ]  # fmt: skip
    assert not cr.BadSubstrings([])("anything")
    assert cr.BadSubstrings([""])("x")  # "" is in every text, as with `in`


def test_load_bad_substrings_from_a_user_file(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text(" x \n\nплохо\n", encoding="utf-8")
    assert cr.load_bad_substrings(path) == [" x ", "плохо"]
    assert cr.load_bad_substrings("") == cr.load_bad_substrings(None)  # empty setting: rulm's list
    path.write_text("ok\nChatGPT\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: 'ChatGPT' has upper-case letters"):
        cr.load_bad_substrings(path)
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        cr.load_bad_substrings(tmp_path / "missing.txt")


# --- steps 1-3 -------------------------------------------------------------------------------


def test_step1_gpt4_instruct():
    rows = [
        {"instruction": "Сложи числа.", "input": "2 и 3", "full_output": "Будет 5."},
        {"instruction": "Назови цвет неба.", "input": "", "full_output": "Синий."},
        {"instruction": "Пусто.", "input": "", "full_output": ""},
        {"instruction": "Кто ты?", "input": "", "full_output": "Модель от OpenAI."},
        # Only answers are tested here (step 10 tests the rest).
        {"instruction": "Что такое OpenAI?", "input": "", "full_output": "Компания."},
    ]
    stats = {}
    assert cr.gpt4_records(rows, BAD, stats) == [
        rec("gpt4", user("Сложи числа.\nДано: 2 и 3"), bot("Будет 5.")),
        rec("gpt4", user("Назови цвет неба."), bot("Синий.")),
        rec("gpt4", user("Что такое OpenAI?"), bot("Компания.")),
    ]
    assert stats["gpt4"] == {"rows": 5, "dropped_empty_answer": 1, "dropped_bad_answer": 1, "kept": 3}


def test_step1_reads_the_instruction_only_for_a_good_answer():
    rows = [
        {"instruction": None, "input": None, "full_output": None},  # skipped before the instruction is read
        {"instruction": None, "input": "", "full_output": "Ответ из OpenAI."},  # bad answer: skipped too
        {"instruction": "Сложи.", "input": None, "full_output": "4"},  # a null input is an empty one
        {"instruction": None, "input": "", "full_output": "Ответ."},  # rulm stops here
        {"instruction": "Сложи.", "input": 2, "full_output": "4"},  # and here ("\nДано: " + 2)
        {"instruction": "Сложи.", "input": "", "full_output": ["4"]},  # and here (a list has no lower())
    ]
    stats = {}
    assert cr.gpt4_records(rows, BAD, stats) == [rec("gpt4", user("Сложи."), bot("4"))]
    assert stats["gpt4"] == {
        "rows": 6, "dropped_empty_answer": 1, "dropped_bad_answer": 1, "rejected_instruction_not_text": 2,
        "rejected_answer_not_text": 1, "kept": 1,
    }  # fmt: skip


def test_step2_evol_instruct():
    rows = [
        {"instruction": "Объясни LSH.", "output": "Хеши по полосам."},
        {"instruction": "Кто тебя сделал?", "output": "OpenAI."},
        {"instruction": "Молчи.", "output": ""},  # empty answers are not skipped here
    ]
    assert cr.evol_instruct_records(rows, BAD, {}) == [
        rec("alpaca-evol-instruct", user("Объясни LSH."), bot("Хеши по полосам.")),
        rec("alpaca-evol-instruct", user("Молчи."), bot("")),
    ]
    stats = {}
    rows = [{"instruction": "А?", "output": None}, {"instruction": None, "output": "OpenAI"}, {"instruction": None, "output": "Б"}]
    assert cr.evol_instruct_records(rows, BAD, stats) == []
    assert stats["alpaca-evol-instruct"] == {
        "rows": 3, "dropped_bad_answer": 1, "rejected_answer_not_text": 1, "rejected_instruction_not_text": 1, "kept": 0
    }  # fmt: skip


def test_step3_alpaca_prefers_the_alternative_output():
    rows = [
        {"instruction": "Переведи.", "input": "cat", "output": "Кот.", "alternative_output": "Кошка."},
        {"instruction": "Адрес?", "input": "", "output": "Не знаю.", "alternative_output": "Москва, ул. Мира."},
        {"instruction": "Кто ты?", "input": "", "output": "OpenAI.", "alternative_output": "Я из OpenAI."},
    ]
    stats = {}
    assert cr.alpaca_records(rows, BAD, stats) == [
        rec("alpaca", user("Переведи.\nДано: cat"), bot("Кошка.")),
        rec("alpaca", user("Адрес?"), bot("Не знаю.")),
    ]
    assert stats["alpaca"] == {"rows": 3, "bad_alternative": 2, "dropped_bad_answer": 1, "kept": 2}


def test_step3_reads_the_output_only_when_the_alternative_is_bad():
    rows = [
        {"instruction": "Переведи.", "input": None, "output": None, "alternative_output": "Кошка."},  # kept
        {"instruction": "Молчи.", "input": "", "output": "Нет.", "alternative_output": ""},  # kept: "" is not bad
        {"instruction": "Кто ты?", "input": "", "output": None, "alternative_output": "Я из OpenAI."},  # rulm stops
        {"instruction": "Адрес?", "input": "", "output": "Тут.", "alternative_output": None},  # rulm stops
    ]
    stats = {}
    assert cr.alpaca_records(rows, BAD, stats) == [
        rec("alpaca", user("Переведи."), bot("Кошка.")),
        rec("alpaca", user("Молчи."), bot("")),
    ]
    assert stats["alpaca"] == {
        "rows": 4, "bad_alternative": 1, "dropped_bad_answer": 0, "rejected_answer_not_text": 1,
        "rejected_alternative_not_text": 1, "kept": 2,
    }  # fmt: skip


# --- step 4 ----------------------------------------------------------------------------------

ANIMALS = "кот пёс лиса волк заяц ёж бобр лось рысь барсук крот мышь"
WATERS = "река озеро море океан пруд ручей болото залив пролив канал дельта устье"


def minhash(text):
    m = MinHash(num_perm=32, scheme="legacy")
    m.update_batch(cr.fingerprint_tokens(text))
    return m


def test_fingerprint_tokens():
    # Case-insensitive regex, tokens kept as written (not lower-cased).
    assert cr.fingerprint_tokens("Ёж-ик, 2024 год! abc-Def x") == [t.encode() for t in ["Ёж-ик", ",", "2024", "год", "!", "abc-Def", "x"]]


def test_fingerprint_is_datasketch_1x_minhash_fed_every_token():
    """rulm ran datasketch 1.x: h -> ((a*h + b) mod (2^61-1)) & (2^32-1), a, b from RandomState(1)
    (uint64 arithmetic), h = the first 4 bytes of SHA-1, little-endian; computed here from that."""
    prime, max_hash = np.uint64((1 << 61) - 1), np.uint64((1 << 32) - 1)
    gen = np.random.RandomState(1)
    a, b = np.array(
        [(gen.randint(1, prime, dtype=np.uint64), gen.randint(0, prime, dtype=np.uint64)) for _ in range(32)],
        dtype=np.uint64,
    ).T
    text = "Привет, мир! Привет 42 раза, hello-world."
    expected = np.full(32, max_hash, dtype=np.uint64)
    for token in cr.fingerprint_tokens(text):
        h = np.uint64(struct.unpack("<I", hashlib.sha1(token).digest()[:4])[0])
        expected = np.minimum(expected, ((a * h + b) % prime) & max_hash)
    [fingerprint] = cr.minhashes([text], 32)
    np.testing.assert_array_equal(fingerprint.hashvalues, expected)
    one_by_one = MinHash(num_perm=32, scheme="legacy")
    for token in cr.fingerprint_tokens(text):
        one_by_one.update(token)
    np.testing.assert_array_equal(one_by_one.hashvalues, expected)


def test_step4_near_duplicates_against_kept_records_only():
    # The estimates this reasoning rests on (true Jaccard 0.5, 0.5, 0): B is a candidate of A.
    a, b, c = minhash(ANIMALS), minhash(ANIMALS + " " + WATERS), minhash(WATERS)
    assert a.jaccard(b) > 0.3 and b.jaccard(c) > 0.3 and a.jaccard(c) == 0.0
    lsh = MinHashLSH(threshold=0.3, num_perm=32)
    lsh.insert("a", a)
    assert lsh.query(b) == ["a"]

    records = [
        rec("alpaca-evol-instruct", user(ANIMALS), bot("1")),
        rec("alpaca-evol-instruct", user(ANIMALS + " " + WATERS), bot("2")),  # near A: dropped
        rec("alpaca", user(WATERS), bot("3")),  # near B only, which was dropped: kept
        rec("alpaca", user(ANIMALS), bot("4")),  # the same as A: dropped
        rec("alpaca", user(ANIMALS.upper()), bot("5")),  # tokens keep their case: no overlap, kept
    ]
    stats = {}
    assert cr.remove_near_duplicates(records, random.Random(42), CONFIG, stats) == [records[0], records[2], records[4]]
    assert stats["near_duplicates"] == {"records": 5, "dropped": 2, "kept": 3}


def test_step4_matches_datasketch_query_and_jaccard_one_by_one():
    """The vectorized candidate check keeps exactly what MinHashLSH.query + MinHash.jaccard keep."""
    rng = random.Random(0)
    words = "а бы в где да его же за и к ли мы не о по с то у что я кот дом лес".split()
    texts = [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(300)]
    lsh, kept_minhashes, expected = MinHashLSH(threshold=0.3, num_perm=32), {}, []
    for i, text in enumerate(texts):
        m = minhash(text)
        if any(m.jaccard(kept_minhashes[j]) > 0.3 for j in lsh.query(m)):
            continue
        lsh.insert(i, m)
        kept_minhashes[i] = m
        expected.append(i)
    # 30 of 300 kept; 10 of them have a kept record estimated > 0.3 that is not an LSH candidate,
    # 23 have candidates, all at most 0.3: both the band rule and the threshold are exercised.
    assert len(expected) == 30
    records = [rec("alpaca", user(t), bot("")) for t in texts]
    assert cr.remove_near_duplicates(records, random.Random(42), CONFIG, {}) == [records[i] for i in expected]


def test_step4_makes_the_draws_that_building_datasketchs_index_makes():
    """rulm seeds the global random module, then builds one MinHashLSH, whose storage name takes
    11 draws from that module; the recipe makes them on its own generator, and leaves the global
    module as it was."""
    random.seed(42)
    MinHashLSH(threshold=0.3, num_perm=32)
    after_rulms_index = random.getstate()

    random.seed(7)
    global_before = random.getstate()
    rng = random.Random(42)
    records = [rec("alpaca", user(ANIMALS), bot("1")), rec("alpaca", user(WATERS), bot("2"))]
    cr.remove_near_duplicates(records, rng, CONFIG, {})
    assert rng.getstate() == after_rulms_index
    assert random.getstate() == global_before
    rng = random.Random(42)
    cr.remove_near_duplicates([], rng, CONFIG, {})  # rulm builds its index even for no records
    assert rng.getstate() == after_rulms_index


# --- step 5 ----------------------------------------------------------------------------------


def test_step5_saiga_skips_conversations_with_any_bad_message():
    rows = [
        {"messages": [system("Ты помощник."), user("Привет"), bot("Привет!")]},
        {"messages": [user("Где офис?"), bot("Москва, ул. Тверская")]},
        {"messages": [user("Расскажи про OpenAI"), bot("Хорошо.")]},
    ]
    stats = {}
    assert cr.saiga_records(rows, BAD, stats) == [
        rec("saiga", system("Ты помощник."), user("Привет"), bot("Привет!")),
    ]
    assert stats["saiga"] == {"rows": 3, "dropped_bad": 2, "kept": 1}


def test_step5_reads_messages_up_to_the_first_bad_one():
    rows = [
        {"messages": [user("OpenAI?"), {"role": "bot", "content": None}]},  # skipped at the first message
        {"messages": [user("Привет"), {"role": "bot", "content": None}]},  # rulm stops at the second
        {"messages": [user("Привет"), {"role": "bot"}]},  # and here (no content)
        {"messages": []},  # kept: an instruct may be mixed into it; step 10 drops it if not
        {"messages": [{"role": "user", "content": "Да", "lang": "ru"}]},  # message objects are kept whole
    ]
    stats = {}
    assert cr.saiga_records(rows, BAD, stats) == [rec("saiga"), rec("saiga", {"role": "user", "content": "Да", "lang": "ru"})]
    assert stats["saiga"] == {"rows": 5, "dropped_bad": 1, "rejected_content_not_text": 2, "kept": 2}


# --- step 6 ----------------------------------------------------------------------------------


def test_step6_merge_short_instructs():
    records = [
        rec("gpt4", user("д" * 500), bot("д" * 501)),  # 1001 chars: alone
        rec("gpt4", user("к" * 500), bot("к" * 500)),  # 1000 chars: short, waits
        rec("alpaca", user("Д" * 600), bot("Д" * 600)),  # alone, emitted while the short one waits
        rec("alpaca", user("вопрос"), bot("ответ")),  # pairs with the waiting one
        rec("alpaca-evol-instruct", user("ещё"), bot("да")),  # unpaired at the end: dropped
    ]
    stats = {}
    assert cr.merge_short_instructs(records, CONFIG, stats) == [
        rec("gpt4", user("д" * 500), bot("д" * 501)),
        rec("alpaca", user("Д" * 600), bot("Д" * 600)),
        rec("merged_instruct", user("к" * 500), bot("к" * 500), user("вопрос"), bot("ответ")),
    ]
    assert stats["merge_short_instructs"] == {
        "records": 5, "long_alone": 2, "merged_pairs": 1, "dropped_unpaired": 1, "emitted": 3,
    }  # fmt: skip


# --- step 7 ----------------------------------------------------------------------------------


def test_step7_mix_into_saiga():
    saiga = [rec("saiga", user("с0"), bot("о0")), rec("saiga", user("с1"), bot("о1"))]
    instructs = [
        rec("gpt4", user("и" * 1000), bot("и" * 1001)),  # 2001 chars: appended, no draw
        rec("merged_instruct", user("к" * 1000), bot("к" * 1000)),  # 2000: 0.6394 -> randrange(3) 0
        rec("alpaca", user("в2"), bot("о2")),  # 0.7416 -> randrange(3) 0, 0, 0 (used), 2: the appended one
        rec("alpaca", user("в3"), bot("о3")),  # 0.1025: appended (now 4 records)
        rec("alpaca", user("в4"), bot("о4")),  # 0.7407 -> randrange(4) 0 (used), 3: the one just appended
        rec("alpaca", user("в5"), bot("о5")),  # 0.0318: appended
    ]
    stats = {}
    assert cr.mix_into_saiga(saiga, instructs, random.Random(42), CONFIG, stats) == [
        rec("mixed", user("с0"), bot("о0"), user("к" * 1000), bot("к" * 1000)),
        rec("saiga", user("с1"), bot("о1")),
        rec("mixed", user("и" * 1000), bot("и" * 1001), user("в2"), bot("о2")),
        rec("mixed", user("в3"), bot("о3"), user("в4"), bot("о4")),
        rec("alpaca", user("в5"), bot("о5")),
    ]
    assert stats["mix_into_saiga"] == {
        "instructs": 6, "appended_long": 1, "appended_by_draw": 2, "mixed": 3, "appended_no_free_record": 0,
    }  # fmt: skip


def test_step7_appends_when_every_record_was_mixed_into():
    # rulm would draw forever here; 0.6394 -> randrange(1) 0; 0.7416 -> no unused record left.
    saiga = [rec("saiga", user("с0"), bot("о0"))]
    instructs = [rec("alpaca", user("в1"), bot("о1")), rec("alpaca", user("в2"), bot("о2"))]
    assert cr.mix_into_saiga(saiga, instructs, random.Random(42), CONFIG, {}) == [
        rec("mixed", user("с0"), bot("о0"), user("в1"), bot("о1")),
        rec("alpaca", user("в2"), bot("о2")),
    ]


# --- step 8 ----------------------------------------------------------------------------------


def test_step8_long_conversations_lose_their_last_two_messages():
    rows = [
        {"messages": [user("а" * 4000), bot("б" * 4000), user("в" * 3000)]},  # 11000 -> 4000
        {"messages": [user("а" * 6000), bot("б" * 5000)]},  # 11000 -> nothing: skipped
        {"messages": [user("а" * 10001)]},  # one message over the limit: skipped
        {"messages": [user("а" * 5000), bot("б" * 5000)]},  # 10000: kept whole
        {"messages": [user("а" * 3000), bot("б" * 3000), user("в" * 3000), bot("г" * 3000)]},  # 12000 -> 6000
    ]
    stats = {}
    assert cr.truncated_conversations(rows, "oasst", CONFIG, stats) == [
        rec("oasst", user("а" * 4000)),
        rec("oasst", user("а" * 5000), bot("б" * 5000)),
        rec("oasst", user("а" * 3000), bot("б" * 3000)),
    ]
    assert stats["oasst"] == {"rows": 5, "truncated": 2, "dropped_empty": 2, "kept": 3}


def test_step8_measures_every_message_and_reads_roles_later():
    rows = [
        {"messages": []},  # nothing there: skipped
        {"messages": [user("а" * 6000), bot("б" * 4000), {"role": "prompter", "content": "в"}]},  # cut: 6000
        {"messages": [user("а"), {"role": "bot", "content": None}]},  # rulm cannot measure it
    ]
    stats = {}
    assert cr.truncated_conversations(rows, "sharegpt", CONFIG, stats) == [rec("sharegpt", user("а" * 6000))]
    assert stats["sharegpt"] == {"rows": 3, "truncated": 1, "dropped_empty": 1, "rejected_content_not_text": 1, "kept": 1}


# --- step 9 ----------------------------------------------------------------------------------


def test_step9_roleplay():
    # Probabilities 0.5 instead of 0.2, so that three dialogues show every case:
    # greeting draw, then example draw, per dialogue: (0.6394, 0.0250), (0.2750, 0.2232), (0.7365, 0.6767).
    config = replace(CONFIG, roleplay_greeting_probability=0.5, roleplay_example_probability=0.5)
    sherlock = {
        "name": "Шерлок",
        "context": "Сыщик.",
        "greeting": "Добрый вечер.",
        "example_dialogue": [user("Кто вы?"), {"role": "char", "content": "Детектив."}],
        "dialogues": [
            {"chat": [user("Помогите!"), {"role": "char", "content": "Слушаю."}]},
            {"chat": [{"role": "operator", "content": "Начнём."}, {"role": "char", "content": "Хорошо."}]},
        ],
    }
    watson = {
        "name": "Ватсон",
        "context": "Доктор.",
        "greeting": "Здравствуйте.",
        "example_dialogue": [user("Вы врач?"), {"role": "char", "content": "Да."}],
        "dialogues": [{"chat": [user("Болит голова."), {"role": "char", "content": "Отдохните."}]}],
    }
    example = "\nПример диалога:\nПользователь: Кто вы?\nПерсонаж: Детектив."
    assert cr.roleplay_records([sherlock, watson], random.Random(42), config, {}) == [
        rec("roleplay", system("Ты Шерлок. Сыщик." + example), user("Помогите!"), bot("Слушаю.")),
        rec(
            "roleplay",
            system("Ты Шерлок. Сыщик.\nПриветствие: Добрый вечер." + example),
            bot("Добрый вечер."),
            user("Начнём."),
            bot("Хорошо."),
        ),
        rec("roleplay", system("Ты Ватсон. Доктор."), user("Болит голова."), bot("Отдохните.")),
    ]


def test_step9_example_dialogue_text():
    dialogue = [user("Кто вы?"), {"role": "char", "content": None, "mood": "calm"}]
    assert cr.example_dialogue_text(dialogue) == "Пользователь: Кто вы?\nПерсонаж: None"
    assert cr.example_dialogue_text([]) == cr.example_dialogue_text("") == ""  # both iterate as nothing
    # rulm stops on these: no list of messages, a role it has no prefix for, no content
    for unreadable in (None, "Кто вы?", [system("Да")], [{"role": "user"}], ["Кто вы?"]):
        assert cr.example_dialogue_text(unreadable) is None


def test_step9_reads_greeting_and_example_dialogue_only_when_drawn():
    # Draws as in test_step9_roleplay, greeting p 0.5, example p 0.1: dialogue 1 (0.6394, 0.0250)
    # reads the example dialogue, dialogue 2 (0.2750, 0.2232) the greeting, dialogue 3 neither.
    config = replace(CONFIG, roleplay_greeting_probability=0.5, roleplay_example_probability=0.1)
    unread = {"greeting": None, "example_dialogue": None}
    nameless = {
        "name": None,  # formatted as Python formats it, as rulm's f-string does
        "context": "",
        **unread,
        "dialogues": [{"chat": []}, {"chat": [{"role": "system", "content": "Тихо.", "mood": "calm"}]}],
    }
    ghost = {"name": "Призрак", "context": "Тень.", **unread, "dialogues": [{"chat": [user("Бу!")]}]}
    stats = {}
    assert cr.roleplay_records([nameless, ghost], random.Random(42), config, stats) == [
        # dialogue 1: a null example dialogue is read (rulm stops): rejected
        # dialogue 2: a null greeting is read: it becomes the content of a bot message (step 10 rejects it)
        rec(
            "roleplay",
            system("Ты None. \nПриветствие: None"),
            bot(None),
            {"role": "system", "content": "Тихо.", "mood": "calm"},
        ),
        rec("roleplay", system("Ты Призрак. Тень."), user("Бу!")),  # dialogue 3: neither is read
    ]
    assert stats["roleplay"] == {
        "characters": 2, "with_greeting": 1, "with_example_dialogue": 0,
        "rejected_example_dialogue_unreadable": 1, "dialogues": 2,
    }  # fmt: skip


# --- steps 10-11 -----------------------------------------------------------------------------


def test_step10_clean_tests_every_message_of_every_record():
    records = [
        rec("saiga", user("Привет"), bot("Здравствуй")),
        rec("roleplay", system("Ты бот из OpenAI."), user("Привет")),
        rec("sharegpt"),
        rec("mixed", user("Что такое OpenAI?"), bot("Компания.")),
        rec("oasst", user("Да?"), bot("Да.")),
        rec("roleplay", system("OpenAI"), bot(None)),  # bad before the null: dropped, as rulm does
        # rulm stops on these: a role it does not know, a missing role, a content that is not text
        rec("roleplay", {"role": "narrator", "content": "Да."}),
        rec("sharegpt", {"content": "Да."}),
        rec("roleplay", system("Ты кот."), bot(None)),
    ]
    stats = {}
    assert cr.clean(records, BAD, stats) == [records[0], records[4]]
    assert stats["clean"] == {
        "records": 9, "dropped_empty": 1, "dropped_bad": 3, "rejected_unknown_role": 2,
        "rejected_content_not_text": 1, "kept": 2,
    }  # fmt: skip


def test_step11_shuffle_and_split():
    records = [rec("saiga", user(str(i))) for i in range(10)]
    train, val = cr.shuffle_and_split(records, random.Random(42), CONFIG, {})
    assert train == [records[i] for i in [7, 3, 2, 8, 5, 6, 9, 4, 0]]  # int(0.95 * 10) = 9
    assert val == [records[1]]


# --- the whole recipe ------------------------------------------------------------------------

CAPITAL = "Назови столицу Франции."
LONG_ANSWER = "Столица Франции — Париж. " * 90  # 2250 chars


def sample_rows():
    return {
        "ru_instruct_gpt4": [{"instruction": CAPITAL, "input": "", "full_output": "Париж."}],
        "ru_turbo_alpaca_evol_instruct": [{"instruction": "Сколько будет два плюс два?", "output": "Четыре."}],
        "ru_turbo_alpaca": [
            # The same instruction as the gpt4 row: gpt4 records are not deduplicated, so both stay.
            {"instruction": CAPITAL, "input": "", "output": "Париж.", "alternative_output": LONG_ANSWER}
        ],
        "ru_turbo_saiga": [
            {"messages": [user("Привет!"), bot("Здравствуйте!")]},
            {"messages": [user("Расскажи про OpenAI."), bot("Хорошо.")]},
        ],
        "ru_sharegpt_cleaned": [{"messages": [user("Что такое ChatGPT?"), bot("Чат-бот.")]}],
        "oasst1_ru_main_branch": [
            {"messages": [user("Вопрос?"), bot("б" * 9990), user("Ещё?"), bot("Нет.")]}  # 10005 chars
        ],
        "gpt_roleplay_realm": [
            {
                "name": "Шерлок",
                "context": "Сыщик с Бейкер-стрит.",
                "greeting": "Добрый вечер.",
                "example_dialogue": [user("Кто вы?"), {"role": "char", "content": "Детектив."}],
                "dialogues": [
                    {
                        "chat": [
                            user("Помогите!"),
                            {"role": "char", "content": "Слушаю."},
                            {"role": "operator", "content": "Что дальше?"},
                            {"role": "char", "content": "Ждём."},
                        ]
                    }
                ],
            }
        ],
    }


def test_build_chat_set_end_to_end():
    """Steps 1-6: [gpt4 + evol merged (short pair), alpaca (long)]; 4 makes its 11 draws; 7: the
    pair draws 0.7407 and randrange(1) 0, so it goes into the one saiga record, alpaca (> 2000) is
    appended without a draw; 8: sharegpt kept, oasst cut to two messages; 9: 0.5905 (no
    greeting), 0.0318 (the example dialogue); 10: sharegpt mentions ChatGPT: dropped;
    11: shuffle(4) -> [1, 2, 3, 0], 3 train."""
    rows = sample_rows()
    pristine = copy.deepcopy(rows)
    chat_set = cr.build_chat_set(rows, CONFIG, cr.load_bad_substrings())
    mixed = rec(
        "mixed",
        user("Привет!"),
        bot("Здравствуйте!"),
        user(CAPITAL),
        bot("Париж."),
        user("Сколько будет два плюс два?"),
        bot("Четыре."),
    )
    roleplay = rec(
        "roleplay",
        system("Ты Шерлок. Сыщик с Бейкер-стрит.\nПример диалога:\nПользователь: Кто вы?\nПерсонаж: Детектив."),
        user("Помогите!"),
        bot("Слушаю."),
        user("Что дальше?"),
        bot("Ждём."),
    )
    oasst = rec("oasst", user("Вопрос?"), bot("б" * 9990))
    alpaca = rec("alpaca", user(CAPITAL), bot(LONG_ANSWER))
    assert chat_set.train == [alpaca, oasst, roleplay]
    assert chat_set.val == [mixed]
    assert chat_set.stats["clean"] == {"records": 5, "dropped_empty": 0, "dropped_bad": 1, "kept": 4}
    assert rows == pristine  # inputs are not modified

    assert cr.summarize(chat_set) == {
        "train": 3,
        "val": 1,
        "by_source": {
            "alpaca": {"train": 1, "val": 0},
            "mixed": {"train": 0, "val": 1},
            "oasst": {"train": 1, "val": 0},
            "roleplay": {"train": 1, "val": 0},
        },
        # chars: roleplay 64 + 58 (the example dialogue), mixed 83, alpaca 23 + 2250, oasst 7 + 9990
        "chars": {"min": 83, "median": 1197.5, "mean": 3118.8, "p95": 9997, "max": 9997},
        "messages": {"min": 2, "median": 3.5, "mean": 3.8, "p95": 6, "max": 6},
    }


def test_build_chat_set_needs_every_source():
    rows = sample_rows()
    del rows["ru_turbo_saiga"]
    with pytest.raises(KeyError, match="no rows for source\\(s\\) ru_turbo_saiga"):
        cr.build_chat_set(rows, CONFIG, [])


def test_write_chat_set_is_byte_deterministic(tmp_path):
    bad = cr.load_bad_substrings()
    cr.write_chat_set(cr.build_chat_set(sample_rows(), CONFIG, bad), tmp_path / "a")
    cr.write_chat_set(cr.build_chat_set(sample_rows(), CONFIG, bad), tmp_path / "b")
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["train.jsonl", "val.jsonl"]

    cr.write_chat_set(cr.ChatSet(train=[rec("saiga", user("Привет"))], val=[], stats={}), tmp_path / "c")
    assert (tmp_path / "c" / "train.jsonl").read_bytes() == (
        '{"messages": [{"role": "user", "content": "Привет"}], "source": "saiga"}\n'.encode()
    )
    assert (tmp_path / "c" / "val.jsonl").read_bytes() == b""
