"""Packed rows give exactly the loss and LoRA gradients of the same chats run one by one, under
every attention implementation and with compiled blocks."""

import pytest
import torch
from peft import get_peft_model
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, AutoTokenizer

from rugpt_assets.core.chat_template import IGNORE_INDEX, tokenize_chat
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, TrainConfig
from rugpt_assets.core.demo_model import DemoModelSpec, build_demo_model
from rugpt_assets.core.packing import TokenizedChat, collate, pack
from rugpt_assets.core.train import Runtime, compile_blocks, lora_config, loss_sum, trainable

CHATS = [
    [{"role": "user", "content": "Привет!"}, {"role": "bot", "content": "Здравствуйте! Чем помочь?"}],
    [{"role": "user", "content": "Сколько будет 3 плюс 4?"}, {"role": "bot", "content": "3 плюс 4 будет 7."}],
    [
        {"role": "system", "content": "Ты кот."},
        {"role": "user", "content": "Как тебя зовут?"},
        {"role": "bot", "content": "Мяу. Меня зовут Барсик, я люблю спать на солнце."},
        {"role": "user", "content": "А что ты ешь?"},
        {"role": "bot", "content": "Рыбу и немного корма."},
    ],
    [{"role": "user", "content": "Назови столицу Франции."}, {"role": "bot", "content": "Париж."}],
    [{"role": "user", "content": "Спасибо"}, {"role": "bot", "content": "Пожалуйста!"}],
    [{"role": "user", "content": "Переведи: кошка"}, {"role": "bot", "content": "cat"}],
]
PACK_TOKENS = 200
CPU_FP32 = Runtime(torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    texts = [DEFAULT_SYSTEM_PROMPT, *(m["content"] for chat in CHATS for m in chat)] * 3
    out = tmp_path_factory.mktemp("demo_base")
    build_demo_model(texts, out, DemoModelSpec(vocab_size=400, n_positions=256, pretrain_steps=10))
    tokenizer = AutoTokenizer.from_pretrained(out)
    chats = [TokenizedChat(*tokenize_chat(c, tokenizer, max_tokens_count=200)) for c in CHATS]
    return out, tokenizer, chats


def test_pack_fills_rows_with_every_chat_once():
    lengths = [90, 10, 50, 50, 30, 120, 5, 60, 40]
    rows = pack(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) == -(-sum(lengths) // 128)  # as few rows as the tokens allow here
    assert pack(lengths, 128) == rows  # deterministic
    with pytest.raises(ValueError, match="pack_tokens=100"):
        pack([101, 3], 100)


def test_collate_restarts_positions_and_never_targets_across_chats():
    a = TokenizedChat([2, 10, 11, 3], [IGNORE_INDEX, IGNORE_INDEX, 11, 3])
    b = TokenizedChat([2, 20, 3], [IGNORE_INDEX, 20, 3])
    c = TokenizedChat([2, 30, 31, 32, 3], [IGNORE_INDEX, 30, 31, 32, 3])
    batch = collate([[a, b], [c]], filler_id=3)
    assert batch.input_ids.tolist() == [[2, 10, 11, 3, 2, 20, 3], [2, 30, 31, 32, 3, 3, 3]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1]]
    no = IGNORE_INDEX  # a chat's last token predicts nothing: not the next chat's <s>, not padding
    assert batch.targets.tolist() == [[no, 11, 3, no, 20, 3, no], [30, 31, 32, 3, no, no, no]]
    assert (batch.n_tokens, batch.n_targets) == (12, 8) == (12, a.n_targets + b.n_targets + c.n_targets)
    # Segments of the flattened batch: a, b | c, padding.
    assert batch.cu_seq_lens.tolist() == [0, 4, 7, 12, 14] and batch.cu_seq_lens.dtype == torch.int32


def lora_model(base_dir, attn_implementation):
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    model = get_peft_model(model, lora_config(TrainConfig()))
    for name, p in trainable(model).items():
        if "lora_B" in name:  # a fresh adapter has B = 0, so A would get no gradient
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()  # no dropout: both sides must see the same function


def loss_and_grads(model, batches, n_targets):
    model.zero_grad()
    loss = sum(loss_sum(model, batch, CPU_FP32) for batch in batches) / n_targets
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainable(model).items()}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_batch_matches_chats_one_by_one(demo, attn_implementation):
    base_dir, tokenizer, chats = demo
    model = lora_model(base_dir, attn_implementation)
    rows = [[chats[i] for i in row] for row in pack([len(c) for c in chats], PACK_TOKENS)]
    assert len(rows) < len(chats) and any(len(r) > 1 for r in rows)  # really packed
    packed = collate(rows, tokenizer.eos_token_id)
    n_targets = sum(c.n_targets for c in chats)
    assert packed.n_targets == n_targets

    loss_packed, grads_packed = loss_and_grads(model, [packed], n_targets)
    loss_single, grads_single = loss_and_grads(model, [collate([[c]], tokenizer.eos_token_id) for c in chats], n_targets)

    assert abs(loss_packed - loss_single) <= 1e-5 * abs(loss_single)
    assert grads_packed.keys() == grads_single.keys() and len(grads_packed) == 4  # A and B of c_attn in 2 layers
    for name, grad in grads_single.items():
        assert grad.norm() > 0, name
        assert rel_err(grads_packed[name], grad) <= 1e-5, name

    # The comparison is sharp: letting chats see each other (one running position) changes the loss.
    leaky = collate(rows, tokenizer.eos_token_id)
    leaky.position_ids.copy_(torch.arange(leaky.input_ids.shape[1]).expand_as(leaky.position_ids))
    loss_leaky, _ = loss_and_grads(model, [leaky], n_targets)
    assert abs(loss_leaky - loss_single) > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="packed_varlen runs on CUDA only")
def test_packed_varlen_matches_sdpa_on_packed_rows(demo):
    base_dir, tokenizer, chats = demo
    rt = Runtime(torch.device("cuda"), torch.bfloat16)
    rows = [[chats[i] for i in row] for row in pack([len(c) for c in chats], PACK_TOKENS)]
    batch = collate(rows, tokenizer.eos_token_id).to(rt.device)
    results = {}
    for attn in ("sdpa", "packed_varlen"):
        model = lora_model(base_dir, attn).to(rt.device)
        model.zero_grad()
        loss = loss_sum(model, batch, rt) / batch.n_targets
        loss.backward()
        results[attn] = loss.item(), {n: p.grad.clone() for n, p in trainable(model).items()}
    (loss_sdpa, grads_sdpa), (loss_varlen, grads_varlen) = results["sdpa"], results["packed_varlen"]
    assert abs(loss_varlen - loss_sdpa) <= 1e-2 * abs(loss_sdpa)  # bf16 kernels, different summation order
    for name, grad in grads_sdpa.items():
        assert rel_err(grads_varlen[name], grad) <= 5e-2, name


def test_compiled_blocks_give_the_eager_loss_and_gradients(demo):
    base_dir, tokenizer, chats = demo
    rows = [[chats[i] for i in row] for row in pack([len(c) for c in chats], PACK_TOKENS)]
    batch = collate(rows, tokenizer.eos_token_id)
    model = lora_model(base_dir, "sdpa")
    loss_eager, grads_eager = loss_and_grads(model, [batch], batch.n_targets)
    graphs = counters["stats"]["unique_graphs"]
    compile_blocks(model)
    loss_compiled, grads_compiled = loss_and_grads(model, [batch], batch.n_targets)
    assert counters["stats"]["unique_graphs"] > graphs  # it really ran compiled
    assert abs(loss_compiled - loss_eager) <= 1e-5 * abs(loss_eager)
    for name, grad in grads_eager.items():
        assert rel_err(grads_compiled[name], grad) <= 1e-5, name


def test_fixed_batch_shape_keeps_compiled_blocks_from_recompiling(demo):
    """Micro-batches of a training step differ in rows and chats; collated to the trainer's one
    shape they are all served by the first compilation, while their own shapes recompile."""
    base_dir, tokenizer, chats = demo
    rows = [[chats[i] for i in row] for row in pack([len(c) for c in chats], PACK_TOKENS)]
    assert len(rows) >= 2
    model = lora_model(base_dir, "sdpa").train()
    compile_blocks(model)
    shape = (len(rows), PACK_TOKENS)
    loss_and_grads(model, [collate(rows, tokenizer.eos_token_id, shape)], 1)
    graphs = counters["stats"]["unique_graphs"]
    short = collate(rows[-1:], tokenizer.eos_token_id, shape)  # the last row, then padding rows
    assert short.input_ids.shape == shape and short.n_targets == sum(c.n_targets for c in rows[-1])
    assert (short.targets[1:] == IGNORE_INDEX).all() and short.n_tokens == sum(len(c) for c in rows[-1])
    loss_and_grads(model, [short], short.n_targets)
    assert counters["stats"]["unique_graphs"] == graphs
    loss_and_grads(model, [collate(rows[-1:], tokenizer.eos_token_id)], 1)  # its own shape
    assert counters["stats"]["unique_graphs"] > graphs
    with pytest.raises(ValueError, match="do not fit the batch shape"):
        collate(rows, tokenizer.eos_token_id, (len(rows) - 1, PACK_TOKENS))
