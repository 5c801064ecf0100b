"""chat_set at full size: load the seven sources, run the rulm recipe, write the split.

Generates a synthetic input in the offline hub layout (``<dir>/<owner>__<name>/<split>.jsonl``)
shaped like the hub data (row counts, answer and conversation lengths, some near-duplicate
instructions, a few bad substrings, some conversations over the length limit), then times, in a
fresh process so that generation does not count: loading through ``sources`` (``read_local`` +
``normalize_rows``), ``build_chat_set``, and ``write_chat_set``; peak RSS is the child's maxrss.

    python bench/chat_set_bench.py                  # generate into a temp dir, measure, clean up
    python bench/chat_set_bench.py --dir /tmp/src   # reuse (or create) the synthetic input there
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYLLABLES = "ба ва га да же за ки ли ми но по ра со ту фа хо це чи ша ще ю я ё ль ст пр кр гр мо не".split()
# Frequent words, as in real Russian text: they are what makes LSH candidates numerous.
COMMON = "и в не на что с как по это но к а из у за о же от для то бы мы вы все так его она он".split()
LATIN = "data model python api server json http code test query index cache".split()
BAD = ["как ии", "openai", " ул. ", "я ассистент"]


class Text:
    """Russian-like text from a fixed word list: cheap to make, tokenizes like Russian."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        pseudo = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(6000)]
        self.words = pseudo + LATIN + COMMON * 100  # about one word in three is a common one
        # Long texts are built from a pool of sentences: generating every word would dominate.
        self.sentences = [self.sentence() for _ in range(20000)]

    def sentence(self, n: int | None = None) -> str:
        words = self.rng.choices(self.words, k=n or self.rng.randint(5, 18))
        return " ".join(words).capitalize() + self.rng.choice(".!?.,.")

    def paragraph(self, chars: int, bad_rate: float = 0.0) -> str:
        parts, size = [], 0
        while size < chars:
            s = self.rng.choice(self.sentences)
            parts.append(s)
            size += len(s) + 1
        if self.rng.random() < bad_rate:
            parts.insert(self.rng.randrange(len(parts) + 1), self.rng.choice(BAD))
        return " ".join(parts)

    def length(self, low: int, high: int) -> int:
        """Log-uniform: many short, some long."""
        return int(low * (high / low) ** self.rng.random())


def near_duplicate(t: Text, text: str) -> str:
    """The text with one word replaced."""
    words = text.split()
    words[t.rng.randrange(len(words))] = t.rng.choice(t.words)
    return " ".join(words)


def conversation(t: Text, turns: tuple[int, int], chars: tuple[int, int], bad_rate: float) -> list[dict]:
    messages = []
    for _ in range(t.rng.randint(*turns)):
        messages.append({"role": "user", "content": t.sentence() + " " + t.paragraph(t.length(20, 400))})
        messages.append({"role": "bot", "content": t.paragraph(t.length(*chars), bad_rate)})
    return messages


def flattened(messages: list[dict]) -> dict:
    """The hub's columnar form of a message list."""
    return {"role": [m["role"] for m in messages], "content": [m["content"] for m in messages]}


def instructions(t: Text, n: int, dup_rate: float) -> list[str]:
    out = []
    for _ in range(n):
        if out and t.rng.random() < dup_rate:
            out.append(near_duplicate(t, t.rng.choice(out)))
        else:
            out.append(t.sentence(t.rng.randint(6, 30)))
    return out


def generate(root: Path, scale: float, seed: int = 0) -> None:
    """Row counts near the hub's, set so that the recipe gives about the 62k chats it gave on the
    hub data; ``scale`` multiplies them."""
    rng = random.Random(seed)
    t = Text(rng)

    def n(count: int) -> int:
        return max(1, int(count * scale))

    def write(dirname: str, split: str, rows) -> None:
        path = root / dirname / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    write("lksy__ru_instruct_gpt4", "train", (
        {"instruction": i, "input": t.paragraph(t.length(20, 600)) if rng.random() < 0.3 else "",
         "full_output": t.paragraph(t.length(200, 4000), 0.03) if rng.random() > 0.01 else None}
        for i in instructions(t, n(14_000), 0.05)
    ))  # fmt: skip
    write("IlyaGusev__ru_turbo_alpaca_evol_instruct", "train", (
        {"instruction": i, "output": t.paragraph(t.length(300, 5000), 0.03)}
        for i in instructions(t, n(40_000), 0.4)
    ))  # fmt: skip
    write("IlyaGusev__ru_turbo_alpaca", "train", (
        {"instruction": i, "input": t.paragraph(t.length(20, 400)) if rng.random() < 0.4 else "",
         "output": t.paragraph(t.length(50, 1500), 0.03),
         "alternative_output": t.paragraph(t.length(50, 1500), 0.05)}
        for i in instructions(t, n(30_000), 0.4)
    ))  # fmt: skip
    write("IlyaGusev__ru_turbo_saiga", "train", (
        {"messages": flattened(conversation(t, (1, 6), (100, 2000), 0.02))} for _ in range(n(37_700))
    ))  # fmt: skip
    write("IlyaGusev__ru_sharegpt_cleaned", "train", (
        {"messages": flattened(conversation(t, (1, 8), (200, 8000), 0.01))} for _ in range(n(4_500))
    ))  # fmt: skip
    write("IlyaGusev__oasst1_ru_main_branch", "train", (
        {"messages": flattened(conversation(t, (1, 4), (100, 3000), 0.01))} for _ in range(n(600))
    ))  # fmt: skip
    write("IlyaGusev__gpt_roleplay_realm", "ru", (
        {"name": t.sentence(2), "context": t.paragraph(t.length(200, 800)), "greeting": t.paragraph(150),
         "example_dialogue": [{"role": role, "content": t.sentence()} for role in ("user", "char") * 3],
         "dialogues": [{"chat": [{"role": role, "content": t.paragraph(t.length(30, 600))}
                                 for role in ("user", "char") * rng.randint(2, 6)]}
                       for _ in range(rng.randint(5, 15))]}
        for _ in range(n(420))
    ))  # fmt: skip


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(root: Path, out_dir: Path) -> dict:
    """The timed part (runs in a child process): load, build, write."""
    from rugpt_assets.core.chat_recipe import build_chat_set, load_bad_substrings, summarize, write_chat_set
    from rugpt_assets.core.configs import RecipeConfig
    from rugpt_assets.core.sources import SOURCES, normalize_rows, read_local

    stages = {}

    def stage(name, work):
        wall, cpu = time.perf_counter(), time.process_time()
        result = work()
        stages[name] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "rss": rss_mb()}
        return result

    rows = stage("load", lambda: {s.name: normalize_rows(s, read_local(s, root)).rows for s in SOURCES})
    chat_set = stage("build_chat_set", lambda: build_chat_set(rows, RecipeConfig(), load_bad_substrings()))
    stage("write", lambda: write_chat_set(chat_set, out_dir))
    return {
        "stages": stages,
        "rows": sum(len(r) for r in rows.values()),
        "summary": summarize(chat_set),
        "stats": chat_set.stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, help="synthetic sources, generated when missing (default: temp)")
    parser.add_argument("--scale", type=float, default=1.0, help="rows per source relative to the hub")
    parser.add_argument("--stats", action="store_true", help="also print the recipe's per-step counts")
    parser.add_argument("--measure", type=Path, nargs=2, help=argparse.SUPPRESS)  # child: SOURCES OUT
    args = parser.parse_args()

    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    work = Path(tempfile.mkdtemp(prefix="chat_set_bench-"))
    sources_dir = args.dir or work / "sources"
    try:
        if not (sources_dir / "IlyaGusev__gpt_roleplay_realm" / "ru.jsonl").is_file():
            start = time.perf_counter()
            generate(sources_dir, args.scale)
            print(f"generated synthetic sources in {time.perf_counter() - start:.0f} s: {sources_dir}")
        size_mb = sum(p.stat().st_size for p in sources_dir.rglob("*.jsonl")) / 2**20
        load_before = os.getloadavg()[0]  # other work on the machine stretches wall time, not CPU time
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(sources_dir), str(work / "chat_set")],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        result = json.loads(child.stdout)
        out_mb = sum(p.stat().st_size for p in (work / "chat_set").glob("*.jsonl")) / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)

    stages, summary = result["stages"], result["summary"]
    print(f"input: {result['rows']:,} rows, {size_mb:,.0f} MB -> {summary['train']:,} train + "
          f"{summary['val']:,} val chats, {out_mb:,.0f} MB")  # fmt: skip
    print(f"machine load average when it started: {load_before:.1f} (on {os.cpu_count()} cores)")
    print(f"{'stage':<16}{'wall s':>8}{'CPU s':>8}{'peak RSS MB':>13}")
    for name, st in stages.items():
        print(f"{name:<16}{st['wall']:>8.1f}{st['cpu']:>8.1f}{st['rss']:>13,.0f}")
    wall, cpu = (sum(st[k] for st in stages.values()) for k in ("wall", "cpu"))
    print(f"{'total':<16}{wall:>8.1f}{cpu:>8.1f}{max(st['rss'] for st in stages.values()):>13,.0f}")
    print("by source:", {s: c["train"] + c["val"] for s, c in summary["by_source"].items()})
    if args.stats:
        print(json.dumps(result["stats"], indent=1))


if __name__ == "__main__":
    main()
