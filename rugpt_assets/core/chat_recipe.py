"""The rulm chat recipe: normalized source rows in, chat records out.

Reproduces rulm's ``create_chat_set`` (commit 7991597, Sept 2023, run with the datasketch 1.5.9
it pins): on any input rulm's script runs to the end on, the same records in the same order and
the same train/validation split. One ``random.Random(config.seed)`` stands in for the global
``random`` module rulm seeds once, and takes every draw rulm's run makes, in the same order: the
eleven that building datasketch's LSH index makes (step 4, `draw_lsh_storage_name`), the mix draws
(step 7), the roleplay draws (step 9), then the shuffle (step 11).

Input rows are keyed by source name (``sources.SOURCES``) in the shape ``sources.normalize_rows``
gives: every used column present, message lists as lists of message objects. Values are judged
where rulm reads them, on the path it takes: a value rulm never reads is never judged (an alpaca
``output`` whose alternative answer is good may be null). What rulm skips is dropped and counted
(``dropped_*``); what rulm could not process at all (its script stops with an error there) is left
out and counted as ``rejected_*``, so that a malformed row never stops the recipe. Output records
are ``{"messages": [message objects], "source": ...}``. Inputs are never modified.
"""

from __future__ import annotations

import functools
import math
import random
import re
import statistics
import string
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from datasketch import MinHash, MinHashLSH

from rugpt_assets.core.artifacts import write_jsonl
from rugpt_assets.core.configs import RecipeConfig
from rugpt_assets.core.sources import CHAT_ROLES, SOURCES

# Bump by hand whenever the records this module produces change (Dagster code_version).
RECIPE_VERSION = "2"

# What `build_chat_set` reproduces, for the chat_set metadata.
RULM_COMMIT = "7991597ef64329b5e288d95b10ef53a3536fa680"
RULM_SCRIPT = "self_instruct/src/data_processing/create_chat_set.py"

DEFAULT_BAD_SUBSTRINGS_PATH = Path(__file__).resolve().parent.parent / "data" / "rulm_bad_substrings.txt"
TOKEN_RE = re.compile(r"[а-яё-]+|[a-z-]+|\d+|\S", re.IGNORECASE)
# datasketch >= 2.0 defaults to the "affine32" permutations, which estimate different Jaccard
# values; rulm ran datasketch 1.x, whose permutations survive bit for bit as "legacy".
MINHASH_SCHEME = "legacy"


@dataclass
class ChatSet:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    stats: dict[str, dict[str, int]]  # recipe step -> counts (rows read, dropped and rejected by reason, kept)


# --- records ---------------------------------------------------------------------------------


def message(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


def record(messages: list[dict[str, Any]], source: str) -> dict[str, Any]:
    return {"messages": messages, "source": source}


def content_length(messages: Sequence[Mapping[str, str]]) -> int:
    return sum(len(m["content"]) for m in messages)


def chat_length(record: Mapping[str, Any]) -> int:
    """The length steps 6-8 compare with their limits: characters (code points) of the contents,
    summed over the messages; roles and separators do not count."""
    return content_length(record["messages"])


def instruction_message(instruction: Any, input: Any) -> str | None:
    """The user message of steps 1 and 3: the instruction, plus ``"\nДано: "`` and the input when
    the input is non-empty (truthy, as rulm tests it); None when that is not text."""
    if input:
        return instruction + "\nДано: " + input if isinstance(instruction, str) and isinstance(input, str) else None
    return instruction if isinstance(instruction, str) else None


# --- bad substrings ---------------------------------------------------------------------------


def load_bad_substrings(path: Path | str | None = None) -> list[str]:
    """The phrases of a bad-substring list; ``None`` or ``""`` means rulm's own list.

    One phrase a line, taken as written: only the line break is removed, not the spaces around
    the phrase. rulm's list keeps them on purpose: " ул. " (street addresses) must not match
    "стул." and " +7" (phone numbers) must not match "a+7". Line 27 is two phrases run together
    ("...ассистентai помощник"), as in rulm; it is kept as one phrase so results stay the same.
    """
    path = Path(path) if path else DEFAULT_BAD_SUBSTRINGS_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"bad-substring list {path} does not exist. Fix: point bad_substrings_path at a UTF-8 "
            f"text file with one phrase a line, or leave it empty for rulm's list."
        )
    phrases = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), 1):
        # A blank phrase would match every message and drop the whole chat set.
        if not line.strip():
            continue
        if line != line.lower():
            raise ValueError(
                f"{path}, line {line_no}: {line!r} has upper-case letters, but phrases are matched "
                f"against lower-cased text, so it could never match. Fix: write it in lower case."
            )
        phrases.append(line)
    return phrases


class BadSubstrings:
    """The bad-substring test: ``bad(text)`` is true when the lower-cased text contains a phrase.

    Answers are remembered per text: step 10 tests again the messages that steps 1-5 tested
    (saiga conversations, instruct answers), which took over a quarter of the recipe's time at
    full size.
    """

    def __init__(self, phrases: Sequence[str]):
        self.phrases = tuple(phrases)
        self.answers: dict[str, bool] = {}

    def __call__(self, text: str) -> bool:
        found = self.answers.get(text)
        if found is None:
            lowered = text.lower()
            found = self.answers[text] = any(phrase in lowered for phrase in self.phrases)
        return found


def scan_messages(messages: Sequence[Mapping[str, Any]], bad: BadSubstrings) -> str | None:
    """rulm's bad-substring test of a message list: in order, up to the first bad message, which
    gives ``"bad"``. A content it reaches that is not text gives ``"content_not_text"`` (rulm
    stops with an error there); a content after the first bad message is never read. None when
    no message is bad."""
    for m in messages:
        content = m.get("content")
        if not isinstance(content, str):
            return "content_not_text"
        if bad(content):
            return "bad"
    return None


def copied(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(m) for m in messages]


# --- steps 1-3: instructions -----------------------------------------------------------------


def gpt4_records(rows, bad, stats) -> list[dict]:
    """Step 1: instruction (+ input) -> full_output; empty or bad answers are skipped."""
    records, counts = [], Counter(rows=len(rows), dropped_empty_answer=0, dropped_bad_answer=0)
    for row in rows:
        answer = row["full_output"]
        user = instruction_message(row["instruction"], row["input"])
        if not answer:
            counts["dropped_empty_answer"] += 1
        elif not isinstance(answer, str):
            counts["rejected_answer_not_text"] += 1
        elif bad(answer):
            counts["dropped_bad_answer"] += 1
        elif user is None:
            counts["rejected_instruction_not_text"] += 1
        else:
            records.append(record([message("user", user), message("bot", answer)], "gpt4"))
    stats["gpt4"] = dict(counts, kept=len(records))
    return records


def evol_instruct_records(rows, bad, stats) -> list[dict]:
    """Step 2: instruction -> output; bad answers are skipped (empty ones are not)."""
    records, counts = [], Counter(rows=len(rows), dropped_bad_answer=0)
    for row in rows:
        instruction, answer = row["instruction"], row["output"]
        if not isinstance(answer, str):
            counts["rejected_answer_not_text"] += 1
        elif bad(answer):
            counts["dropped_bad_answer"] += 1
        elif not isinstance(instruction, str):
            counts["rejected_instruction_not_text"] += 1
        else:
            records.append(record([message("user", instruction), message("bot", answer)], "alpaca-evol-instruct"))
    stats["alpaca-evol-instruct"] = dict(counts, kept=len(records))
    return records


def alpaca_records(rows, bad, stats) -> list[dict]:
    """Step 3: the alternative output, or the output when the alternative is bad; else skipped.
    The output is read only then: when the alternative is good, the output may be anything."""
    records, counts = [], Counter(rows=len(rows), bad_alternative=0, dropped_bad_answer=0)
    for row in rows:
        answer = row["alternative_output"]
        if not isinstance(answer, str):
            counts["rejected_alternative_not_text"] += 1
            continue
        if bad(answer):
            answer = row["output"]
            counts["bad_alternative"] += 1
            if not isinstance(answer, str):
                counts["rejected_answer_not_text"] += 1
                continue
            if bad(answer):
                counts["dropped_bad_answer"] += 1
                continue
        user = instruction_message(row["instruction"], row["input"])
        if user is None:
            counts["rejected_instruction_not_text"] += 1
            continue
        records.append(record([message("user", user), message("bot", answer)], "alpaca"))
    stats["alpaca"] = dict(counts, kept=len(records))
    return records


# --- step 4: near-duplicate removal ----------------------------------------------------------

# Constructing datasketch's ``MinHashLSH`` names its storage with ``storage._random_name(11)``:
# eleven ``random.choice(string.ascii_lowercase)`` calls on the *global* ``random`` module
# (datasketch 1.5.9, which rulm pins, and 2.x alike). rulm seeds that module once and builds one
# index, in this step, so every draw of steps 7, 9 and 11 comes after these eleven.
LSH_STORAGE_NAME_DRAWS = 11


def draw_lsh_storage_name(rng: random.Random) -> None:
    """The draws rulm's ``MinHashLSH()`` makes, made on the recipe's own generator instead."""
    for _ in range(LSH_STORAGE_NAME_DRAWS):
        rng.choice(string.ascii_lowercase)


@functools.cache  # datasketch computes them by numeric integration: ~20 ms
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(b, r): the bands and rows per band of datasketch's ``MinHashLSH(threshold, num_perm)``.
    Building one draws from the global ``random`` module (see `draw_lsh_storage_name`); its state
    is put back, so callers' own use of ``random`` is not shifted."""
    state = random.getstate()
    try:
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    finally:
        random.setstate(state)
    return lsh.b, lsh.r


def fingerprint_tokens(text: str) -> list[bytes]:
    """Every token occurrence (not a set), UTF-8 encoded: what rulm fed its MinHash."""
    return [token.encode("utf-8") for token in TOKEN_RE.findall(text)]


def minhashes(texts, num_perm: int):
    """One MinHash per text, lazily. ``MinHash.generator`` builds the permutations once and feeds
    each text with ``update_batch``: the same hash values as a fresh ``MinHash(num_perm)`` fed token
    by token (checked in the tests), at a fraction of the cost."""
    tokens = (fingerprint_tokens(text) for text in texts)
    return MinHash.generator(tokens, num_perm=num_perm, scheme=MINHASH_SCHEME)


def remove_near_duplicates(records, rng: random.Random, config: RecipeConfig, stats) -> list[dict]:
    """Step 4: drop a record whose first message is estimated > threshold similar (Jaccard) to
    that of an earlier kept record among its LSH candidates; dropped records are not indexed.

    The index is datasketch's ``MinHashLSH(threshold, num_perm)``, written out: its b bands of r
    hash values (12 x 2 for 0.3 and 32), and its rule, a kept record is a candidate when it equals
    the query on all values of some band. Here the buckets hold row numbers into one array of the
    kept hash values, so the candidates' Jaccard estimates (the share of equal hash values, as
    ``MinHash.jaccard``) come in one numpy step. At threshold 0.3 a query has hundreds of
    candidates (~480 in the bench): with ``MinHashLSH.query`` and one ``jaccard`` call per
    candidate this step took over a minute there, this way about ten seconds. The tests check it
    against ``query`` + ``jaccard``.
    """
    threshold, num_perm = config.dedup_threshold, config.dedup_num_perm
    draw_lsh_storage_name(rng)  # rulm builds its index here, even for no records
    b, r = lsh_bands(threshold, num_perm)
    band_dtype = np.dtype((np.void, r * 8))  # the r uint64 values of a band as one bytes key
    buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(b)]
    kept_hashvalues = np.empty((len(records), num_perm), dtype=np.uint64)  # row = kept record
    kept = []
    texts = (rec["messages"][0]["content"] for rec in records)
    for rec, minhash in zip(records, minhashes(texts, num_perm)):
        hashvalues = minhash.hashvalues
        bands = hashvalues[: b * r].view(band_dtype).tolist()
        rows = chain.from_iterable(bucket.get(band, ()) for bucket, band in zip(buckets, bands))
        candidates = np.fromiter(rows, dtype=np.intp)
        if candidates.size:
            jaccard = (kept_hashvalues[candidates] == hashvalues).sum(axis=1) / num_perm
            if (jaccard > threshold).any():
                continue
        for bucket, band in zip(buckets, bands):
            bucket[band].append(len(kept))
        kept_hashvalues[len(kept)] = hashvalues
        kept.append(rec)
    dropped = len(records) - len(kept)
    stats["near_duplicates"] = {"records": len(records), "dropped": dropped, "kept": len(kept)}
    return kept


# --- step 5: saiga ---------------------------------------------------------------------------


def saiga_records(rows, bad, stats) -> list[dict]:
    """Step 5: every conversation without a bad substring in any of its messages (an empty one
    too: a later instruct may be mixed into it)."""
    records, counts = [], Counter(rows=len(rows), dropped_bad=0)
    for row in rows:
        verdict = scan_messages(row["messages"], bad)
        if verdict is None:
            records.append(record(copied(row["messages"]), "saiga"))
        elif verdict == "bad":
            counts["dropped_bad"] += 1
        else:
            counts[f"rejected_{verdict}"] += 1
    stats["saiga"] = dict(counts, kept=len(records))
    return records


# --- step 6: merge short instructions ----------------------------------------------------------


def merge_short_instructs(records, config: RecipeConfig, stats) -> list[dict]:
    """Step 6: a record longer than the limit (`chat_length` > 1000) is emitted alone when reached,
    even while a short one waits; two short ones are emitted as one record when the second is
    reached; an unpaired short record at the end is dropped."""
    merged, waiting = [], None
    counts = Counter(records=len(records), long_alone=0, merged_pairs=0)
    for r in records:
        if chat_length(r) > config.merge_short_below_chars:
            merged.append(r)
            counts["long_alone"] += 1
        elif waiting is None:
            waiting = r
        else:
            merged.append(record(waiting["messages"] + r["messages"], "merged_instruct"))
            counts["merged_pairs"] += 1
            waiting = None
    counts["dropped_unpaired"] = int(waiting is not None)
    stats["merge_short_instructs"] = dict(counts, emitted=len(merged))
    return merged


# --- step 7: mix into saiga --------------------------------------------------------------------


def mix_into_saiga(saiga, instructs, rng: random.Random, config: RecipeConfig, stats) -> list[dict]:
    """Step 7: a long instruct (`chat_length` > 2000) is appended without a draw. A short one
    draws ``random()``: below p it is appended; else its messages go to the end of the record at
    ``randrange(len(records))``, redrawn until the index was not used before. ``records`` is the
    saiga list with the instructs appended so far, so the range grows and an appended instruct
    can itself be mixed into (its source becomes "mixed")."""
    records = list(saiga)
    used: set[int] = set()
    counts = Counter(instructs=len(instructs), appended_long=0, appended_by_draw=0, mixed=0)
    counts["appended_no_free_record"] = 0
    for r in instructs:
        if chat_length(r) > config.mix_long_above_chars:
            records.append(r)
            counts["appended_long"] += 1
            continue
        if rng.random() < config.mix_probability:
            records.append(r)
            counts["appended_by_draw"] += 1
            continue
        # rulm would loop forever (or fail on an empty list) with no unused index left; this only
        # happens on tiny inputs, where the record is appended instead.
        if len(used) == len(records):
            records.append(r)
            counts["appended_no_free_record"] += 1
            continue
        index = rng.randrange(len(records))
        while index in used:
            index = rng.randrange(len(records))
        used.add(index)
        records[index] = record(records[index]["messages"] + r["messages"], "mixed")
        counts["mixed"] += 1
    stats["mix_into_saiga"] = dict(counts)
    return records


# --- step 8: sharegpt, oasst -------------------------------------------------------------------


def truncated_conversations(rows, source: str, config: RecipeConfig, stats) -> list[dict]:
    """Step 8: while a conversation is longer than the limit (the `chat_length` of what is left
    > 10000), drop its last two messages; skip it when nothing is left (or nothing was there).
    The length counts every message, so every content must be text."""
    records, counts = [], Counter(rows=len(rows), truncated=0, dropped_empty=0)
    for row in rows:
        messages = row["messages"]
        if not all(isinstance(m.get("content"), str) for m in messages):
            counts["rejected_content_not_text"] += 1
            continue
        truncated = False
        while content_length(messages) > config.conversation_max_chars:
            messages = messages[:-2]
            truncated = True
        if not messages:
            counts["dropped_empty"] += 1
            continue
        counts["truncated"] += truncated
        records.append(record(copied(messages), source))
    stats[source] = dict(counts, kept=len(records))
    return records


# --- step 9: roleplay --------------------------------------------------------------------------

CHAT_ROLE = {"char": "bot", "operator": "user"}  # roleplay role -> chat role; others stay
SPEAKER = {"user": "Пользователь", "char": "Персонаж"}  # example-dialogue role -> line prefix


def roleplay_message(m: Mapping[str, Any]) -> dict[str, Any]:
    role = m.get("role")
    return {**m, "role": CHAT_ROLE[role]} if isinstance(role, str) and role in CHAT_ROLE else dict(m)


def example_dialogue_text(example_dialogue: Any) -> str | None:
    """The example dialogue as lines joined with newlines (no newline after the last one); None
    when it is not a list of messages with roles user/char, or empty (rulm stops with an error there).
    Contents are formatted as Python formats any value, as rulm's f-string does."""
    if not isinstance(example_dialogue, list):
        return "" if example_dialogue == "" else None  # an empty string iterates as no messages
    lines = []
    for m in example_dialogue:
        role = m.get("role") if isinstance(m, dict) else None
        if not (isinstance(role, str) and role in SPEAKER and "content" in m):
            return None
        lines.append(f"{SPEAKER[role]}: {m['content']}")
    return "\n".join(lines)


def roleplay_records(rows, rng: random.Random, config: RecipeConfig, stats) -> list[dict]:
    """Step 9: one record per dialogue of each character. Two draws per dialogue, greeting first:
    the greeting joins the context and opens the chat as a bot message; the example dialogue joins
    the context. The system message (context) comes first. name, context and greeting are
    formatted as Python formats any value (a null reads "None"), as rulm's f-strings do; the
    greeting and the example dialogue are read only when their draw says so."""
    records = []
    counts = Counter(characters=len(rows), with_greeting=0, with_example_dialogue=0)
    for row in rows:
        for dialogue in row["dialogues"]:
            chat = [roleplay_message(m) for m in dialogue["chat"]]
            context = f"Ты {row['name']}. {row['context']}"
            greeting = rng.random() < config.roleplay_greeting_probability
            if greeting:
                context += f"\nПриветствие: {row['greeting']}"
                chat.insert(0, message("bot", row["greeting"]))
            if rng.random() < config.roleplay_example_probability:
                example = example_dialogue_text(row["example_dialogue"])
                if example is None:
                    counts["rejected_example_dialogue_unreadable"] += 1
                    continue
                context += "\nПример диалога:\n" + example
                counts["with_example_dialogue"] += 1
            counts["with_greeting"] += greeting
            records.append(record([message("system", context)] + chat, "roleplay"))
    stats["roleplay"] = dict(counts, dialogues=len(records))
    return records


# --- steps 10-11: clean, shuffle and split -----------------------------------------------------


def clean(records, bad, stats) -> list[dict]:
    """Step 10, on every record of every source: records with a bad substring in any message
    (user and system messages included) or with no messages are dropped. A record with a role
    other than system/user/bot, or with a content that is not text, is rejected (rulm stops with
    an error on either)."""
    kept, counts = [], Counter(records=len(records), dropped_empty=0, dropped_bad=0)
    for r in records:
        messages = r["messages"]
        if not all(isinstance(m.get("role"), str) and m["role"] in CHAT_ROLES for m in messages):
            counts["rejected_unknown_role"] += 1
            continue
        verdict = scan_messages(messages, bad)
        if verdict == "bad":
            counts["dropped_bad"] += 1
        elif verdict:
            counts[f"rejected_{verdict}"] += 1
        elif not messages:
            counts["dropped_empty"] += 1
        else:
            kept.append(r)
    stats["clean"] = dict(counts, kept=len(kept))
    return kept


def shuffle_and_split(records, rng: random.Random, config: RecipeConfig, stats) -> tuple[list, list]:
    """Step 11: shuffle; the first ``int(train_fraction * n)`` records are train, the rest val."""
    records = list(records)
    rng.shuffle(records)
    border = int(config.train_fraction * len(records))
    stats["split"] = {"train": border, "val": len(records) - border}
    return records[:border], records[border:]


# --- the recipe ------------------------------------------------------------------------------


def build_chat_set(rows: Mapping[str, Sequence[dict]], config: RecipeConfig, bad_substrings: Sequence[str]) -> ChatSet:
    missing = [spec.name for spec in SOURCES if spec.name not in rows]
    if missing:
        raise KeyError(
            f"chat recipe: no rows for source(s) {', '.join(missing)}; it needs all of "
            f"{', '.join(spec.name for spec in SOURCES)} (an empty list is fine)."
        )
    rng = random.Random(config.seed)
    bad = BadSubstrings(bad_substrings)
    stats: dict[str, dict[str, int]] = {}
    gpt4 = gpt4_records(rows["ru_instruct_gpt4"], bad, stats)  # 1
    evol = evol_instruct_records(rows["ru_turbo_alpaca_evol_instruct"], bad, stats)  # 2
    alpaca = alpaca_records(rows["ru_turbo_alpaca"], bad, stats)  # 3
    instructs = gpt4 + remove_near_duplicates(evol + alpaca, rng, config, stats)  # 4
    saiga = saiga_records(rows["ru_turbo_saiga"], bad, stats)  # 5
    merged = merge_short_instructs(instructs, config, stats)  # 6
    records = mix_into_saiga(saiga, merged, rng, config, stats)  # 7
    records += truncated_conversations(rows["ru_sharegpt_cleaned"], "sharegpt", config, stats)  # 8
    records += truncated_conversations(rows["oasst1_ru_main_branch"], "oasst", config, stats)
    records += roleplay_records(rows["gpt_roleplay_realm"], rng, config, stats)  # 9
    records = clean(records, bad, stats)  # 10
    train, val = shuffle_and_split(records, rng, config, stats)  # 11
    return ChatSet(train=train, val=val, stats=stats)


# --- what it reproduces ------------------------------------------------------------------------

# The record sources of steps 1-3, 5, 8 and 9, one per dataset, in the order of `sources.SOURCES`.
SOURCE_STEPS = ("gpt4", "alpaca-evol-instruct", "alpaca", "saiga", "sharegpt", "oasst", "roleplay")


def recipe_parity(chat_set: ChatSet) -> dict[str, Any]:
    """What `build_chat_set` reproduces, and what each source's step kept, dropped as rulm does,
    and rejected where rulm could not go on; for metadata."""
    return {
        "reference": f"rulm {RULM_SCRIPT} at commit {RULM_COMMIT}, with datasketch 1.5.9",
        "datasketch_behaviour": (
            f"MinHashLSH() draws random.choice(string.ascii_lowercase) {LSH_STORAGE_NAME_DRAWS} times from "
            "the global random module (storage._random_name) before the mix, roleplay and shuffle draws; "
            "made on the recipe's own Random(seed) at the same step; MinHash permutations: scheme "
            f"{MINHASH_SCHEME!r} (datasketch 1.x)"
        ),
        "counts_per_source": {spec.name: {"step": step, **chat_set.stats[step]} for spec, step in zip(SOURCES, SOURCE_STEPS)},
    }


# --- output ----------------------------------------------------------------------------------


def write_chat_set(chat_set: ChatSet, out_dir: Path) -> None:
    """``train.jsonl`` and ``val.jsonl``; the same chat set always gives the same bytes.
    Written in place: the caller publishes the directory (`artifacts.publish_dir`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", chat_set.train), ("val", chat_set.val)):
        write_jsonl(out_dir / f"{name}.jsonl", records)


def distribution(values: Sequence[int]) -> dict[str, float]:
    """min / median / mean / p95 (nearest rank) / max; all zero for no values."""
    if not values:
        return {"min": 0, "median": 0, "mean": 0, "p95": 0, "max": 0}
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "mean": round(statistics.fmean(ordered), 1),
        "p95": ordered[math.ceil(0.95 * len(ordered)) - 1],
        "max": ordered[-1],
    }


def summarize(chat_set: ChatSet) -> dict[str, Any]:
    """Counts by split and source, and length statistics over all records, for metadata."""
    records = chat_set.train + chat_set.val
    train, val = Counter(r["source"] for r in chat_set.train), Counter(r["source"] for r in chat_set.val)
    return {
        "train": len(chat_set.train),
        "val": len(chat_set.val),
        "by_source": {s: {"train": train[s], "val": val[s]} for s in sorted(train | val)},
        "chars": distribution([chat_length(r) for r in records]),
        "messages": distribution([len(r["messages"]) for r in records]),
    }
