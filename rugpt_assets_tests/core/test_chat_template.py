"""The gigasaiga template and only-target-loss tokenization, token by token."""

import pytest

from rugpt_assets.core.chat_template import IGNORE_INDEX, render_message, render_prompt, tokenize_chat
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT
from rugpt_assets.core.demo_model import BOS_ID, EOS_ID, train_tokenizer

CHAT = [
    {"role": "user", "content": "Привет! Как дела?"},
    {"role": "bot", "content": "Хорошо, спасибо. Чем помочь?"},
    {"role": "user", "content": "Сколько будет 2 плюс 2?"},
    {"role": "bot", "content": "2 плюс 2 будет 4."},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [DEFAULT_SYSTEM_PROMPT, *(m["content"] for m in CHAT)] * 4
    return train_tokenizer(texts, vocab_size=400)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected(tokenizer, messages):
    """Hand-rendered segments: ids and labels, message by message."""
    ids, labels = [], []
    for m in messages:
        seg = encode(tokenizer, f"<s>{m['role']}\n{m['content']}</s>\n")
        ids += seg
        labels += seg if m["role"] == "bot" else [IGNORE_INDEX] * len(seg)
    return ids, labels


def test_render_message_and_prompt():
    assert render_message("user", "hi") == "<s>user\nhi</s>\n"
    prompt = render_prompt([{"role": "user", "content": "Привет"}])
    assert prompt == f"<s>system\n{DEFAULT_SYSTEM_PROMPT}</s>\n<s>user\nПривет</s>\n<s>bot\n"
    own_system = render_prompt([{"role": "system", "content": "Ты кот."}, {"role": "user", "content": "Мяу"}], "unused")
    assert own_system == "<s>system\nТы кот.</s>\n<s>user\nМяу</s>\n<s>bot\n"


def test_labels_are_ignored_exactly_off_bot_messages(tokenizer):
    input_ids, labels = tokenize_chat(CHAT, tokenizer, max_tokens_count=1000)
    system = {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    want_ids, want_labels = expected(tokenizer, [system, *CHAT])
    # The rendered text starts with <s> (no second BOS); the newline after the last </s> goes.
    assert want_ids[0] == BOS_ID and want_ids[-2:] == [EOS_ID, encode(tokenizer, "\n")[0]]
    assert input_ids == want_ids[:-1]
    assert labels == want_labels[:-1]
    assert input_ids[-1] == EOS_ID and labels[-1] == EOS_ID  # the final </s> of a bot message is learned
    # The special markers really are single special tokens.
    assert input_ids.count(BOS_ID) == 5 and input_ids.count(EOS_ID) == 5
    # Token by token: a label is either the token itself (bot) or ignored (everything else).
    bot_tokens = sum(len(encode(tokenizer, render_message("bot", m["content"]))) for m in CHAT if m["role"] == "bot")
    assert sum(label != IGNORE_INDEX for label in labels) == bot_tokens - 1  # minus the dropped newline
    assert all(label in (IGNORE_INDEX, tok) for tok, label in zip(input_ids, labels))


def test_truncation_drops_whole_messages(tokenizer):
    system = {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    full = [len(expected(tokenizer, [m])[0]) for m in [system, *CHAT]]
    limit = sum(full[:3]) + full[3] - 1  # the 4th message misses by one token
    input_ids, labels = tokenize_chat(CHAT, tokenizer, max_tokens_count=limit)
    want_ids, want_labels = expected(tokenizer, [system, *CHAT[:2]])
    assert input_ids == want_ids[:-1] and labels == want_labels[:-1]
    assert tokenize_chat(CHAT, tokenizer, max_tokens_count=sum(full))[0] == expected(tokenizer, [system, *CHAT])[0][:-1]
    assert tokenize_chat(CHAT, tokenizer, max_tokens_count=full[0] - 1) == ([], [])


def test_truncated_after_user_message_ends_unlabelled(tokenizer):
    system = {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    full = [len(expected(tokenizer, [m])[0]) for m in [system, *CHAT]]
    input_ids, labels = tokenize_chat(CHAT, tokenizer, max_tokens_count=sum(full[:3]) - 1)
    assert input_ids == expected(tokenizer, [system, CHAT[0]])[0][:-1]  # the bot answer does not fit
    assert input_ids[-1] == EOS_ID and set(labels) == {IGNORE_INDEX}  # no EOS added, nothing to learn


class CharTokenizer:
    """One id per character and no special tokens: exercises the global BOS/EOS rules."""

    bos_token_id, eos_token_id = 2, 3

    def __call__(self, texts, add_special_tokens):
        assert add_special_tokens is False
        return {"input_ids": [[100 + ord(ch) % 1000 for ch in text] for text in texts]}


def test_global_bos_and_eos_are_added_when_missing():
    chat = [{"role": "system", "content": "s"}, {"role": "bot", "content": "ok"}]
    input_ids, labels = tokenize_chat(chat, CharTokenizer(), max_tokens_count=1000)
    body = [100 + ord(ch) % 1000 for ch in "<s>system\ns</s>\n<s>bot\nok</s>\n"]
    assert input_ids == [2, *body, 3]
    n_system = len("<s>system\ns</s>\n")
    assert labels == [IGNORE_INDEX] + [IGNORE_INDEX] * n_system + body[n_system:] + [3]
