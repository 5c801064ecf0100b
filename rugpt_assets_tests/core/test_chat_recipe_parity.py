"""chat_set against an independent transliteration of rulm's ``create_chat_set``, record for record.

`rulm_chat_set` below restates the published script (rulm, commit 7991597) step by step in plain
loops: the global ``random`` module seeded once with 42, datasketch's own ``MinHashLSH`` and
``MinHash`` objects (so the draws that building the index makes happen here the way they
happen in rulm), every field read only where the script reads it, and every place where the
script would stop with an error left to fail the same way (only its endless redraw, when every
record has been mixed into, raises instead). It shares no code with the product. On 400 of these
inputs it gave the same records as rulm's own script run with datasketch 1.5.9, and stopped
where that script stopped.

A seeded generator writes hub-layout files (both message-list forms, missing columns, nulls and
empty strings on every path, bad phrases at the start, middle and end of every kind of text,
lengths around the 1000/2000/10000 limits, near-duplicate and empty instructions, all seven
sources); the product reads them as chat_set does (``sources.load_local`` -> snapshot ->
``build_chat_set``). Where the transliteration runs to the end, train and validation must be the
same records in the same order; where it stops, the product must still finish, without error.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections import Counter

from datasketch import MinHash, MinHashLSH

from rugpt_assets.core import chat_recipe, sources
from rugpt_assets.core.configs import RecipeConfig
from rugpt_assets.settings import PACKAGE_DIR

CASES = 200

GPT4 = "lksy/ru_instruct_gpt4"
EVOL = "IlyaGusev/ru_turbo_alpaca_evol_instruct"
ALPACA = "IlyaGusev/ru_turbo_alpaca"
SAIGA = "IlyaGusev/ru_turbo_saiga"
SHAREGPT = "IlyaGusev/ru_sharegpt_cleaned"
OASST = "IlyaGusev/oasst1_ru_main_branch"
ROLEPLAY = "IlyaGusev/gpt_roleplay_realm"


def rulm_phrases() -> list[str]:
    text = (PACKAGE_DIR / "data" / "rulm_bad_substrings.txt").read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line]


# --- the transliteration ---------------------------------------------------------------------


class DrawsForever(Exception):
    """rulm's mix loop would redraw forever: every record has been mixed into already."""


def rulm_chat_set(hub: dict[str, list[dict]], phrases: list[str]) -> tuple[list[dict], list[dict]]:
    """rulm's create_chat_set on rows as ``datasets`` gives them (``hub[repo]``); (train, val)."""

    def bad(messages):
        for m in messages:
            lowered = m["content"].lower()
            if any(p in lowered for p in phrases):
                return True
        return False

    def longest(records):  # the script prints this after most steps; it fails on no records
        return max([sum([len(m["content"]) for m in r["messages"]]) for r in records])

    def unflatten(columns):
        items = []
        for key, values in columns.items():
            if not items:
                items = [{} for _ in range(len(values))]
            for i, value in enumerate(values):
                items[i][key] = value
        return items

    def character_system_messages(char):
        context = f"Ты {char['name']}. {char['context']}"
        chat = []
        if random.random() < 0.2:
            context += f"\nПриветствие: {char['greeting']}"
            chat.append({"role": "bot", "content": char["greeting"]})
        if random.random() < 0.2:
            speaker = {"user": "Пользователь", "char": "Персонаж"}
            lines = [f"{speaker[m['role']]}: {m['content']}" for m in char["example_dialogue"]]
            context += "\nПример диалога:\n" + "\n".join(lines)
        chat.insert(0, {"role": "system", "content": context})
        return chat

    random.seed(42)

    instruct = []
    for row in hub[GPT4]:
        text = row["instruction"]
        if row["input"]:
            text += "\nДано: " + row["input"]
        answer = row["full_output"]
        if not answer:
            continue
        if bad([{"content": answer}]):
            continue
        instruct.append({"messages": [{"role": "user", "content": text}, {"role": "bot", "content": answer}], "source": "gpt4"})
    longest(instruct)

    evol = []
    for row in hub[EVOL]:
        answer = row["output"]
        if bad([{"content": answer}]):
            continue
        messages = [{"role": "user", "content": row["instruction"]}, {"role": "bot", "content": answer}]
        evol.append({"messages": messages, "source": "alpaca-evol-instruct"})
    longest(evol)

    alpaca = []
    for row in hub[ALPACA]:
        text = row["instruction"]
        if row["input"]:
            text += "\nДано: " + row["input"]
        answer = row["alternative_output"]
        if bad([{"content": answer}]):
            answer = row["output"]
            if bad([{"content": answer}]):
                continue
        alpaca.append({"messages": [{"role": "user", "content": text}, {"role": "bot", "content": answer}], "source": "alpaca"})
    longest(alpaca)

    # Near-duplicates. rulm round-trips each MinHash through LeanMinHash bytes, which keeps the
    # seed and the hash values as they are; datasketch 2's "legacy" scheme is 1.5.9's hashing.
    pool = evol + alpaca
    sketches = []
    for r in pool:
        tokens = re.findall(r"[а-яё-]+|[a-z-]+|\d+|\S", r["messages"][0]["content"], re.I)
        sketch = MinHash(num_perm=32, scheme="legacy")
        sketch.update_batch([t.encode("utf-8") for t in tokens])
        sketches.append(sketch)
    index = MinHashLSH(threshold=0.3, num_perm=32)
    unique = []
    for i, r in enumerate(pool):
        duplicate = False
        for j in index.query(sketches[i]):  # the keys inserted: ints
            if sketches[i].jaccard(sketches[j]) > 0.3:  # pyright: ignore[reportCallIssue, reportArgumentType]
                duplicate = True
        if duplicate:
            continue
        index.insert(i, sketches[i])
        unique.append(r)
    instruct += unique

    saiga = []
    for row in hub[SAIGA]:
        messages = unflatten(row["messages"])
        if bad(messages):
            continue
        saiga.append({"messages": messages, "source": "saiga"})
    longest(saiga)

    merged = []
    waiting = None
    for i, r in enumerate(instruct):
        if sum([len(m["content"]) for m in r["messages"]]) > 1000:
            merged.append(r)
            continue
        if waiting is None:
            waiting = i
            continue
        merged.append({"messages": instruct[waiting]["messages"] + r["messages"], "source": "merged_instruct"})
        waiting = None
    longest(merged)

    records = saiga
    used = set()
    for r in merged:
        if sum([len(m["content"]) for m in r["messages"]]) > 2000 or random.random() < 0.5:
            records.append(r)
            continue
        if records and len(used) == len(records):
            raise DrawsForever
        i = random.randrange(len(records))
        while i in used:
            i = random.randrange(len(records))
        used.add(i)
        records[i]["source"] = "mixed"
        records[i]["messages"] += r["messages"]
    longest(records)

    for repo, source in ((SHAREGPT, "sharegpt"), (OASST, "oasst")):
        for row in hub[repo]:
            messages = unflatten(row["messages"])
            length = sum([len(m["content"]) for m in messages])
            while length > 10000 and messages:
                messages = messages[:-2]
                length = sum([len(m["content"]) for m in messages])
            if not messages:
                continue
            records.append({"messages": messages, "source": source})
        if source == "sharegpt":
            longest(records)

    roleplay = []
    for row in hub[ROLEPLAY]:
        for dialogue in row["dialogues"]:
            chat = dialogue["chat"]
            for m in chat:
                if m["role"] == "char":
                    m["role"] = "bot"
                if m["role"] == "operator":
                    m["role"] = "user"
            roleplay.append({"messages": character_system_messages(row) + chat, "source": "roleplay"})
    records += roleplay
    longest(records)

    kept = []
    for r in records:
        for role in {m["role"] for m in r["messages"]}:
            if role not in ("bot", "user", "system"):
                raise AssertionError(role)
        if bad(r["messages"]):
            continue
        if not r["messages"]:
            continue
        kept.append(r)
    records = kept

    random.shuffle(records)
    border = int(0.95 * len(records))
    return records[:border], records[border:]


# --- generated hub rows ------------------------------------------------------------------------

WORDS = (
    "кот дом лес река поле небо город улица море ветер снег дождь солнце книга окно стол путь "
    "день ночь ёж мир-труд Ёлка data model code test query index cache 42 2024 7"
).split()
PUNCTUATION = [",", ".", "!", "?", " -", " —", ":", "\n"]
# Bad phrases as they appear in text (any case); near misses that must not count as bad.
BAD_TEXT = ["OpenAI", "как ИИ", " ул. ", "Sorry", "я ассистент", "ChatGPT", "как иси-ассистентai помощник", " +7"]
NEAR_MISSES = ["стул.", "5+7", "ai помощник", "как иси-ассистент", "Open AI", "ассистент"]


class HubRows:
    """Rows as ``datasets`` gives them: every column present, message lists of the saiga,
    sharegpt and oasst sets in the hub's flattened form, roleplay lists as lists."""

    def __init__(self, seed: int, phrases: list[str]):
        self.rng = random.Random(seed)
        self.phrases = phrases
        # One case in five also has values rulm cannot read on the path it takes (it stops).
        self.unreadable = self.chance(0.2)
        # A small vocabulary per case: instructions overlap, so near-duplicates are common.
        tokens = self.rng.sample(WORDS, self.rng.randint(4, len(WORDS))) + PUNCTUATION
        self.snippets = [" ".join(self.rng.choices(tokens, k=self.rng.randint(4, 12))) for _ in range(300)]
        self.instructions: list[str] = []

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def stopper(self, p: float) -> bool:
        """Whether to put in a value rulm stops on."""
        return self.unreadable and self.chance(p)

    def bad(self, text: str) -> bool:
        return any(p in text.lower() for p in self.phrases)

    def text(self, length: int | None = None, bad: float = 0.08) -> str:
        if length is None:
            length = self.rng.choice([0, 1, 3, 10, 40, 120, 400, self.rng.randint(0, 1500)])
        parts = self.rng.choices(self.snippets, k=length // 10 + 1)  # ten characters or more each
        if self.chance(0.1):
            parts.insert(self.rng.randint(0, len(parts)), self.rng.choice(NEAR_MISSES))
        out = " ".join(parts)[:length]
        if self.chance(bad):  # at the start, somewhere inside, or at the end
            at = self.rng.choice([0, len(out) // 2, len(out)])
            out = out[:at] + self.rng.choice(BAD_TEXT) + out[at:]
        return out

    def sized(self, total: int, *fixed: str) -> str:
        """A text that brings the fixed texts to `total` characters (at least one)."""
        return self.text(max(1, total - sum(len(t) for t in fixed)), bad=0.03)

    def total(self, limit: int) -> int:
        """A record length just around a limit, or anywhere."""
        return self.rng.choice([limit - 1, limit, limit + 1, self.rng.randint(1, 2 * limit)])

    def instruction_row(self, answer_column: str, with_input: bool) -> dict:
        if self.instructions and self.chance(0.2):  # the same as an earlier one, or one word off
            instruction = self.rng.choice(self.instructions)
            if self.chance(0.5):
                instruction = " ".join(w if self.chance(0.9) else self.rng.choice(WORDS) for w in instruction.split(" "))
        else:
            instruction = self.text(self.rng.choice([0, 5, 30, 80, 300])) if self.chance(0.9) else ""
        self.instructions.append(instruction)
        row: dict[str, str | None] = {"instruction": instruction}
        if with_input:
            row["input"] = self.rng.choice(["", None, self.text(), self.text(60)])
        message = instruction + ("\nДано: " + row["input"] if with_input and row["input"] else "")
        if self.chance(0.5):
            row[answer_column] = self.sized(self.total(self.rng.choice([1000, 2000])), message)
        else:
            row[answer_column] = self.text()
        return row

    def gpt4(self) -> dict:
        row = self.instruction_row("full_output", with_input=True)
        if self.chance(0.15):
            row["full_output"] = self.rng.choice(["", None])
            if self.chance(0.3):  # never read: the row is skipped first
                row["instruction"] = None
                row["input"] = self.rng.choice(["", None])
        return row

    def evol(self) -> dict:
        row = self.instruction_row("output", with_input=False)
        if self.stopper(0.1):
            row["output"] = None
        return row

    def alpaca(self) -> dict:
        row = self.instruction_row("alternative_output", with_input=True)
        if self.chance(0.2):
            row["alternative_output"] = self.text(self.rng.randint(0, 200), bad=0.6)
        # The output is read only when the alternative is bad.
        row["output"] = self.rng.choice([self.text(), self.text(), ""])
        if self.chance(0.3) and (not self.bad(row["alternative_output"]) or self.stopper(0.5)):
            row["output"] = None
        if self.stopper(0.1):
            row["alternative_output"] = None
        return row

    def conversation(self, roles: list[str], total: int | None = None) -> list[dict]:
        if total is None:
            return [{"role": r, "content": self.text()} for r in roles]
        cuts = sorted(self.rng.randint(0, total) for _ in roles[1:])
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
        return [{"role": r, "content": self.text(n, bad=0.02)} for r, n in zip(roles, lengths)]

    def turns(self, n: int) -> list[str]:
        roles = ["system"] if self.chance(0.2) else []
        return roles + ["user", "bot"] * n + (["user"] if self.chance(0.2) else [])

    def flattened(self, messages: list[dict]) -> dict:
        flat = {"role": [m["role"] for m in messages], "content": [m["content"] for m in messages]}
        if messages and self.stopper(0.05):
            flat["content"] = flat["content"][:-1]  # ragged: the last message has no content
        return flat

    def saiga(self) -> dict:
        messages = self.conversation(self.turns(self.rng.randint(0, 3)))
        if self.chance(0.05) and messages:  # after a bad message, never read
            messages[0]["content"] += " OpenAI"
            messages.append({"role": self.rng.choice(["bot", "assistant"]), "content": None})
        if self.stopper(0.1):
            messages.append({"role": "assistant", "content": "Да."})
        return {"messages": self.flattened(messages)}

    def long_conversation(self) -> dict:
        roles = self.turns(self.rng.randint(0, 4))
        total = self.rng.choice([9999, 10000, 10001, self.rng.randint(0, 25000), self.rng.randint(0, 3000)])
        messages = self.conversation(roles, total) if roles else []
        if len(messages) > 2 and total > 10000 and self.chance(0.2):
            messages[-1]["role"] = "prompter"  # cut away before rulm looks at roles
        if messages and self.stopper(0.1):
            messages[0]["content"] = None  # rulm cannot measure it
        return {"messages": self.flattened(messages)}

    def character(self) -> dict:
        def maybe_null(value, p=0.1):
            return None if self.chance(p) else value

        example = [{"role": r, "content": self.text(40)} for r in ["user", "char"] * self.rng.randint(0, 2)]
        dialogues = []
        for _ in range(self.rng.randint(0, 3)):
            roles = [self.rng.choice(["user", "operator"]) if i % 2 == 0 else "char" for i in range(self.rng.randint(0, 5))]
            if roles and self.chance(0.1):
                roles[0] = self.rng.choice(["system", "bot"])  # roles that need no mapping
            dialogues.append({"chat": [{"role": r, "content": self.text(bad=0.04)} for r in roles]})
        return {
            "name": maybe_null(self.text(12, bad=0.02)),
            "context": maybe_null(self.text(self.rng.choice([0, 50, 300]), bad=0.03)),
            # rulm reads these on one draw in five: a null then stops it
            "greeting": None if self.stopper(0.2) else self.text(30, bad=0.05),
            "example_dialogue": None if self.stopper(0.2) else self.rng.choice([example, example, [], "", {}]),
            "dialogues": dialogues,
        }

    def rows(self) -> dict[str, list[dict]]:
        def some(make, low, high):
            return [make() for _ in range(self.rng.randint(low, high))]

        return {
            GPT4: some(self.gpt4, 2, 14),
            EVOL: some(self.evol, 2, 18),
            ALPACA: some(self.alpaca, 2, 18),
            SAIGA: some(self.saiga, 2, 14),
            SHAREGPT: some(self.long_conversation, 0, 8),
            OASST: some(self.long_conversation, 0, 6),
            ROLEPLAY: some(self.character, 0, 5),
        }


def as_lists(columns: dict) -> list[dict]:
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def flat(items: list[dict]) -> dict:
    return {key: [item[key] for item in items] for key in (items[0] if items else {})}


def hub_file_row(repo: str, row: dict, rng: random.Random) -> dict:
    """The row as a hub-layout file may hold it: a column that is null may be left out, and a
    message list may be written in either form."""
    row = {k: v for k, v in row.items() if v is not None or rng.random() < 0.5}
    if "messages" in row and rng.random() < 0.5 and len({len(v) for v in row["messages"].values()}) <= 1:
        row["messages"] = as_lists(row["messages"])
    if repo == ROLEPLAY and rng.random() < 0.3:
        if isinstance(row.get("example_dialogue"), list) and all(set(m) == {"role", "content"} for m in row["example_dialogue"]):
            row["example_dialogue"] = flat(row["example_dialogue"])
        row["dialogues"] = [{"chat": flat(d["chat"])} if d["chat"] else d for d in row["dialogues"]]
        if row["dialogues"] and rng.random() < 0.5:
            row["dialogues"] = flat(row["dialogues"])
    return row


def write_hub_layout(root, hub: dict[str, list[dict]], rng: random.Random) -> None:
    for spec in sources.SOURCES:
        path = spec.local_path(root)
        path.parent.mkdir(parents=True)
        lines = [json.dumps(hub_file_row(spec.repo, row, rng), ensure_ascii=False) for row in hub[spec.repo]]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def product_chat_set(root, snapshots) -> chat_recipe.ChatSet:
    """What the chat_set asset does with the files: raw snapshots, then the recipe."""
    rows = {}
    for spec in sources.SOURCES:
        (snapshots / spec.name).mkdir(parents=True)
        sources.write_snapshot(sources.load_local(spec, root), snapshots / spec.name)
        rows[spec.name] = sources.read_snapshot(snapshots / spec.name)
    return chat_recipe.build_chat_set(rows, RecipeConfig(), chat_recipe.load_bad_substrings())


# --- the test ------------------------------------------------------------------------------------


def test_chat_set_is_the_rulm_recipe_record_for_record(tmp_path):
    phrases = rulm_phrases()
    outcome, produced, steps, mismatched = Counter(), Counter(), Counter(), []
    global_state = random.getstate()
    for seed in range(CASES):
        hub = HubRows(seed, phrases).rows()
        root = tmp_path / f"case{seed}"
        write_hub_layout(root, hub, random.Random(seed))
        ours = product_chat_set(root, root / "snapshots")  # never raises, whatever rulm does
        rejected = {f"{step}.{k}": n for step, c in ours.stats.items() for k, n in c.items() if k.startswith("rejected")}
        try:
            train, val = rulm_chat_set(copy.deepcopy(hub), phrases)
        except (TypeError, KeyError, AttributeError, ValueError, IndexError, AssertionError, DrawsForever) as e:
            outcome[f"rulm stops: {type(e).__name__}"] += 1
            continue
        outcome["rulm finishes"] += 1
        produced.update(r["source"] for r in train + val)
        steps.update({f"{step}.{k}": n for step, c in ours.stats.items() for k, n in c.items()})
        steps["alpaca.null_output_good_alternative"] += sum(
            r["output"] is None and not any(p in r["alternative_output"].lower() for p in phrases) for r in hub[ALPACA]
        )
        if (ours.train, ours.val) != (train, val):
            same = sum(a == b for a, b in zip(ours.train, train))
            mismatched.append(f"seed {seed}: train {len(ours.train)} vs {len(train)} ({same} equal), val {len(ours.val)} vs {len(val)}")
        elif rejected:  # rulm read every row, so nothing may have been rejected
            mismatched.append(f"seed {seed}: same records, but rejected {rejected}")
    random.setstate(global_state)

    assert not mismatched, f"{len(mismatched)} of {outcome['rulm finishes']} cases differ:\n" + "\n".join(mismatched[:20])
    # Most cases are ones rulm runs to the end, every kind of record is in them, and the cases
    # where rulm stops (and the product goes on) are there too.
    assert outcome["rulm finishes"] >= CASES * 0.6, outcome
    assert sum(outcome.values()) - outcome["rulm finishes"] >= CASES * 0.05, outcome
    kinds = {"gpt4", "alpaca-evol-instruct", "alpaca", "saiga", "merged_instruct", "mixed", "sharegpt", "oasst", "roleplay"}
    assert all(produced[k] >= 20 for k in kinds), produced
    branches = [
        "gpt4.dropped_empty_answer", "gpt4.dropped_bad_answer", "alpaca-evol-instruct.dropped_bad_answer",
        "alpaca.bad_alternative", "alpaca.dropped_bad_answer", "alpaca.null_output_good_alternative",
        "near_duplicates.dropped", "near_duplicates.kept", "saiga.dropped_bad",
        "merge_short_instructs.long_alone", "merge_short_instructs.merged_pairs", "merge_short_instructs.dropped_unpaired",
        "mix_into_saiga.appended_long", "mix_into_saiga.appended_by_draw", "mix_into_saiga.mixed",
        "sharegpt.truncated", "sharegpt.dropped_empty", "oasst.truncated", "oasst.dropped_empty",
        "roleplay.with_greeting", "roleplay.with_example_dialogue", "clean.dropped_bad", "clean.dropped_empty",
    ]  # fmt: skip
    assert all(steps[b] >= 5 for b in branches), {b: steps[b] for b in branches}
