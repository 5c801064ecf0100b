"""The rulm chat recipe (DESIGN §3): normalized source rows in, chat records out.

Reproduces rulm's ``create_chat_set`` (Sept 2023): given the same rows it gives the same records,
in the same order, with the same train/validation split. One ``random.Random(config.seed)``
drives every random choice, in the recipe's order of calls: the mix draws (step 7), the roleplay
draws (step 9), then the shuffle (step 11). Steps 1-6 and 8 draw nothing.

Input rows are keyed by source name (``sources.SOURCES``) and already normalized: text columns
are ``str``, message lists are ``[{"role", "content"}, ...]`` with known roles. Output records are
``{"messages": [{"role", "content"}, ...], "source": ...}``. Inputs are never modified.
"""

from __future__ import annotations

import math
import random
import re
import statistics
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
RECIPE_VERSION = "1"

DEFAULT_BAD_SUBSTRINGS_PATH = Path(__file__).resolve().parent.parent / "data" / "rulm_bad_substrings.txt"
TOKEN_RE = re.compile(r"[а-яё-]+|[a-z-]+|\d+|\S", re.IGNORECASE)
# datasketch >= 2.0 defaults to the "affine32" permutations, which estimate different Jaccard
# values; rulm ran datasketch 1.x, whose permutations survive bit for bit as "legacy".
MINHASH_SCHEME = "legacy"


@dataclass
class ChatSet:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    stats: dict[str, dict[str, int]]  # recipe step -> counts (rows read, dropped by reason, kept)


# --- records ---------------------------------------------------------------------------------


def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def record(messages: list[dict[str, str]], source: str) -> dict[str, Any]:
    return {"messages": messages, "source": source}


def content_length(messages: Sequence[Mapping[str, str]]) -> int:
    return sum(len(m["content"]) for m in messages)


def chat_length(record: Mapping[str, Any]) -> int:
    """The length steps 6-8 compare with their limits: characters (code points) of the contents,
    summed over the messages; roles and separators do not count."""
    return content_length(record["messages"])


def instruction_message(instruction: str, input: str) -> str:
    return instruction + "\nДано: " + input if input else instruction


# --- bad substrings (§3.1) ---------------------------------------------------------------------


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


def has_bad_message(messages: Sequence[Mapping[str, str]], bad: BadSubstrings) -> bool:
    return any(bad(m["content"]) for m in messages)


# --- steps 1-3: instructions -----------------------------------------------------------------


def gpt4_records(rows, bad, stats) -> list[dict]:
    """Step 1: instruction (+ input) -> full_output; empty or bad answers are skipped."""
    records, counts = [], Counter(rows=len(rows), dropped_empty_answer=0, dropped_bad_answer=0)
    for row in rows:
        answer = row["full_output"]
        if not answer:
            counts["dropped_empty_answer"] += 1
        elif bad(answer):
            counts["dropped_bad_answer"] += 1
        else:
            user = instruction_message(row["instruction"], row["input"])
            records.append(record([message("user", user), message("bot", answer)], "gpt4"))
    stats["gpt4"] = dict(counts, kept=len(records))
    return records


def evol_instruct_records(rows, bad, stats) -> list[dict]:
    """Step 2: instruction -> output; bad answers are skipped (empty ones are not)."""
    records, counts = [], Counter(rows=len(rows), dropped_bad_answer=0)
    for row in rows:
        if bad(row["output"]):
            counts["dropped_bad_answer"] += 1
        else:
            messages = [message("user", row["instruction"]), message("bot", row["output"])]
            records.append(record(messages, "alpaca-evol-instruct"))
    stats["alpaca-evol-instruct"] = dict(counts, kept=len(records))
    return records


def alpaca_records(rows, bad, stats) -> list[dict]:
    """Step 3: the alternative output, or the output when the alternative is bad; else skipped."""
    records, counts = [], Counter(rows=len(rows), bad_alternative=0, dropped_bad_answer=0)
    for row in rows:
        answer = row["alternative_output"]
        if bad(answer):
            answer = row["output"]
            counts["bad_alternative"] += 1
            if bad(answer):
                counts["dropped_bad_answer"] += 1
                continue
        user = instruction_message(row["instruction"], row["input"])
        records.append(record([message("user", user), message("bot", answer)], "alpaca"))
    stats["alpaca"] = dict(counts, kept=len(records))
    return records


# --- step 4: near-duplicate removal ----------------------------------------------------------


def fingerprint_tokens(text: str) -> list[bytes]:
    """Every token occurrence (not a set), UTF-8 encoded: what rulm fed its MinHash."""
    return [token.encode("utf-8") for token in TOKEN_RE.findall(text)]


def minhashes(texts, num_perm: int):
    """One MinHash per text, lazily. ``MinHash.generator`` builds the permutations once and feeds
    each text with ``update_batch``: the same hash values as a fresh ``MinHash(num_perm)`` fed token
    by token (checked in the tests), at a fraction of the cost."""
    tokens = (fingerprint_tokens(text) for text in texts)
    return MinHash.generator(tokens, num_perm=num_perm, scheme=MINHASH_SCHEME)


def remove_near_duplicates(records, config: RecipeConfig, stats) -> list[dict]:
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
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)  # used for its b, r only
    band_dtype = np.dtype((np.void, lsh.r * 8))  # the r uint64 values of a band as one bytes key
    buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(lsh.b)]
    kept_hashvalues = np.empty((len(records), num_perm), dtype=np.uint64)  # row = kept record
    kept = []
    texts = (r["messages"][0]["content"] for r in records)
    for r, minhash in zip(records, minhashes(texts, num_perm)):
        hashvalues = minhash.hashvalues
        bands = hashvalues[: lsh.b * lsh.r].view(band_dtype).tolist()
        rows = chain.from_iterable(bucket.get(band, ()) for bucket, band in zip(buckets, bands))
        candidates = np.fromiter(rows, dtype=np.intp)
        if candidates.size:
            jaccard = (kept_hashvalues[candidates] == hashvalues).sum(axis=1) / num_perm
            if (jaccard > threshold).any():
                continue
        for bucket, band in zip(buckets, bands):
            bucket[band].append(len(kept))
        kept_hashvalues[len(kept)] = hashvalues
        kept.append(r)
    dropped = len(records) - len(kept)
    stats["near_duplicates"] = {"records": len(records), "dropped": dropped, "kept": len(kept)}
    return kept


# --- step 5: saiga ---------------------------------------------------------------------------


def saiga_records(rows, bad, stats) -> list[dict]:
    """Step 5: every conversation without a bad substring in any of its messages."""
    records = [
        record([message(m["role"], m["content"]) for m in row["messages"]], "saiga")
        for row in rows
        if not has_bad_message(row["messages"], bad)
    ]
    stats["saiga"] = {"rows": len(rows), "dropped_bad": len(rows) - len(records), "kept": len(records)}
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
    > 10000), drop its last two messages; skip it when nothing is left."""
    records, counts = [], Counter(rows=len(rows), truncated=0, dropped_too_long=0)
    for row in rows:
        messages = [message(m["role"], m["content"]) for m in row["messages"]]
        truncated = False
        while content_length(messages) > config.conversation_max_chars:
            messages = messages[:-2]
            truncated = True
        if not messages:
            counts["dropped_too_long"] += 1
            continue
        if truncated:
            counts["truncated"] += 1
        records.append(record(messages, source))
    stats[source] = dict(counts, kept=len(records))
    return records


# --- step 9: roleplay --------------------------------------------------------------------------

CHAT_ROLE = {"char": "bot", "operator": "user"}  # roleplay role -> chat role; "user" stays


def example_dialogue_text(example_dialogue) -> str:
    # The lines are joined with newlines: no newline after the last one.
    return "\n".join(
        f"{'Пользователь' if m['role'] == 'user' else 'Персонаж'}: {m['content']}" for m in example_dialogue
    )


def roleplay_records(rows, rng: random.Random, config: RecipeConfig, stats) -> list[dict]:
    """Step 9: one record per dialogue of each character. Two draws per dialogue, greeting first:
    the greeting joins the context and opens the chat as a bot message; the example dialogue joins
    the context. The system message (context) comes first."""
    records = []
    counts = Counter(characters=len(rows), with_greeting=0, with_example_dialogue=0)
    for row in rows:
        for dialogue in row["dialogues"]:
            chat = [message(CHAT_ROLE.get(m["role"], m["role"]), m["content"]) for m in dialogue["chat"]]
            context = f"Ты {row['name']}. {row['context']}"
            if rng.random() < config.roleplay_greeting_probability:
                context += f"\nПриветствие: {row['greeting']}"
                chat.insert(0, message("bot", row["greeting"]))
                counts["with_greeting"] += 1
            if rng.random() < config.roleplay_example_probability:
                context += "\nПример диалога:\n" + example_dialogue_text(row["example_dialogue"])
                counts["with_example_dialogue"] += 1
            records.append(record([message("system", context)] + chat, "roleplay"))
    stats["roleplay"] = dict(counts, dialogues=len(records))
    return records


# --- steps 10-11: clean, shuffle and split -----------------------------------------------------


def clean(records, bad, stats) -> list[dict]:
    """Step 10, on every record of every source: an unknown role is an error; records with a bad
    substring in any message (user and system messages included) or with no messages are dropped."""
    for r in records:
        for m in r["messages"]:
            if m["role"] not in CHAT_ROLES:
                raise ValueError(
                    f"a {r['source']!r} record has role {m['role']!r}; chat roles are system, user, "
                    f"bot. Fix: normalize the source rows (sources.normalize_rows) before the recipe."
                )
    kept, counts = [], Counter(records=len(records), dropped_empty=0, dropped_bad=0)
    for r in records:
        if not r["messages"]:
            counts["dropped_empty"] += 1
        elif has_bad_message(r["messages"], bad):
            counts["dropped_bad"] += 1
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


def build_chat_set(
    rows: Mapping[str, Sequence[dict]], config: RecipeConfig, bad_substrings: Sequence[str]
) -> ChatSet:
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
    instructs = gpt4 + remove_near_duplicates(evol + alpaca, config, stats)  # 4
    saiga = saiga_records(rows["ru_turbo_saiga"], bad, stats)  # 5
    merged = merge_short_instructs(instructs, config, stats)  # 6
    records = mix_into_saiga(saiga, merged, rng, config, stats)  # 7
    records += truncated_conversations(rows["ru_sharegpt_cleaned"], "sharegpt", config, stats)  # 8
    records += truncated_conversations(rows["oasst1_ru_main_branch"], "oasst", config, stats)
    records += roleplay_records(rows["gpt_roleplay_realm"], rng, config, stats)  # 9
    records = clean(records, bad, stats)  # 10
    train, val = shuffle_and_split(records, rng, config, stats)  # 11
    return ChatSet(train=train, val=val, stats=stats)


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
