"""The gigasaiga chat template and only-target-loss tokenization (docs/ARCHITECTURE.md, "Training").

Every message renders as ``<s>{role}\\n{content}</s>\\n``; the text carries ``<s>``/``</s>`` as
literal special tokens, which the tokenizer maps to ruGPT-3.5's ids 2/3. A chat that does not
start with a system message gets the default system prompt first; generation starts after
``<s>bot\\n``. Training and the chat CLI share `render_message`, so a prompt is always a prefix
of what the model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT

BOT_ROLE = "bot"
IGNORE_INDEX = -100  # label of tokens that carry no loss (torch cross_entropy's ignore_index)

Message = dict[str, str]


def render_message(role: str, content: str) -> str:
    return f"<s>{role}\n{content}</s>\n"


def with_system_prompt(messages: Sequence[Message], system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[Message]:
    """The messages, behind a system message with ``system_prompt`` unless the chat opens with one."""
    if messages and messages[0]["role"] == "system":
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def render_prompt(messages: Sequence[Message], system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The text to generate the next bot message from: the chat so far, then ``<s>bot\\n``."""
    chat = with_system_prompt(messages, system_prompt)
    return "".join(render_message(m["role"], m["content"]) for m in chat) + f"<s>{BOT_ROLE}\n"


# OpenAI-style clients (llama.cpp servers, Ollama) call the bot "assistant"; the template
# writes it as the model was trained.
ASSISTANT_ROLE = "assistant"


def jinja_chat_template(system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """`render_prompt` as a Jinja chat template (`tokenizer.chat_template` in GGUF and HF):
    given `messages` and `add_generation_prompt`, it renders the same text. One line, so
    `trim_blocks`/`lstrip_blocks` (set by HF and llama-cpp-python) change nothing."""
    default_system = render_message("system", system_prompt)
    return (
        "{% if not messages or messages[0]['role'] != 'system' %}{{ " + _jinja_string(default_system) + " }}{% endif %}"
        "{% for message in messages %}"
        f"{{{{ '<s>' + ('{BOT_ROLE}' if message['role'] == '{ASSISTANT_ROLE}' else message['role'])"
        " + '\\n' + message['content'] + '</s>\\n' }}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '<s>{BOT_ROLE}\\n' }}}}{{% endif %}}"
    )


def _jinja_string(text: str) -> str:
    """A Jinja string literal holding `text` exactly."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def ollama_template() -> str:
    """`render_prompt` as an Ollama TEMPLATE (Go text/template over `.Messages`). Ollama puts the
    Modelfile's SYSTEM first when a chat has no system message, as `with_system_prompt` does."""
    return (
        "{{- range .Messages }}<s>"
        f'{{{{ if eq .Role "{ASSISTANT_ROLE}" }}}}{BOT_ROLE}{{{{ else }}}}{{{{ .Role }}}}{{{{ end }}}}\n'
        "{{ .Content }}</s>\n{{ end }}"
        f"<s>{BOT_ROLE}\n"
    )


def tokenize_chat(
    messages: Sequence[Message],
    tokenizer: Any,
    max_tokens_count: int,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one chat, as the seed's trainer built them.

    Messages are tokenized one by one without added special tokens and appended while the total
    stays within ``max_tokens_count``; the first message that would pass it ends the chat (whole
    messages only). Labels are ``IGNORE_INDEX`` except on bot messages. A global BOS is
    prepended when the ids do not already start with it (label ignored); a trailing newline
    after the last ``</s>`` is dropped; a global EOS is appended (labelled) when the ids do not
    already end with it. Returns empty lists when even the first message does not fit.
    """
    chat = with_system_prompt(messages, system_prompt)
    texts = [render_message(m["role"], m["content"]) for m in chat]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    input_ids: list[int] = []
    labels: list[int] = []
    for message, ids in zip(chat, encoded, strict=True):
        if len(input_ids) + len(ids) > max_tokens_count:
            break
        input_ids += ids
        labels += ids if message["role"] == BOT_ROLE else [IGNORE_INDEX] * len(ids)
    if not input_ids:
        return [], []

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if input_ids[0] != bos:
        input_ids.insert(0, bos)
        labels.insert(0, IGNORE_INDEX)
    if len(input_ids) > 1 and input_ids[-2] == eos:
        input_ids.pop()
        labels.pop()
    if input_ids[-1] != eos:
        input_ids.append(eos)
        labels.append(eos)
    return input_ids, labels
