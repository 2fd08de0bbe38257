"""The shipped tiny-qwen3-moe checkpoint (eplb/assets/models/), checked with transformers on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from eplb.evals import problems
from eplb.evals.prompt import STOP_STRINGS, build_prompt, extract_answer, reference_answer
from eplb.resources import data_dir, default_model_path

MODEL = default_model_path()
DATA = data_dir()
NUM_SOLVED = 6  # a handful of test problems, greedy: keeps this file fast on 2 CPU cores


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(MODEL).eval()


@pytest.fixture(scope="module")
def shots():
    return problems.read_jsonl(DATA / problems.TRAIN_FILE)[:5]


def test_architecture_and_size(model) -> None:
    from transformers import Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = model.config
    assert type(model) is Qwen3MoeForCausalLM
    raw = json.loads((MODEL / "config.json").read_text())
    assert raw["architectures"] == ["Qwen3MoeForCausalLM"] and raw["model_type"] == "qwen3_moe"
    assert raw["num_experts"] >= 8 and raw["num_experts_per_tok"] >= 2
    assert raw["hidden_size"] <= 256 and raw["num_hidden_layers"] <= 4
    assert raw["vocab_size"] <= 1024 and raw["max_position_embeddings"] >= 2048
    assert raw["router_aux_loss_coef"] <= 1e-3
    assert all(isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in model.model.layers)
    assert len(model.model.layers) == cfg.num_hidden_layers
    assert (MODEL / "model.safetensors").stat().st_size <= 30 * 2**20
    with safe_open(MODEL / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys)
    expert_keys = [k for k in keys if ".mlp.experts." in k]
    assert len(expert_keys) == 3 * raw["num_experts"] * raw["num_hidden_layers"]


def test_tokenizer(tok, shots) -> None:
    assert len(tok) <= 1024 and tok.eos_token is not None and tok.pad_token is not None
    text = "Question: Tom has 905 apples.\nAnswer: Tom has 905 + 17 = 922 apples.\n#### 922\n\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    digit_tokens = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digit_tokens and all(len(t) == 1 for t in digit_tokens)  # one token per digit
    test = problems.read_jsonl(DATA / problems.TEST_FILE)
    lens = [len(x) for x in tok([build_prompt(shots, r["question"]) for r in test],
                                add_special_tokens=False)["input_ids"]]
    assert max(lens) <= 600


def test_solves_test_problems_greedily(tok, model, shots) -> None:
    test = problems.read_jsonl(DATA / problems.TEST_FILE)[:NUM_SOLVED]
    tok.padding_side = "left"
    enc = tok([build_prompt(shots, r["question"]) for r in test], return_tensors="pt",
              padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=48, do_sample=False,
                             stop_strings=STOP_STRINGS, tokenizer=tok,
                             pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    got = [extract_answer(t.split("\n\n")[0]) for t in texts]
    want = [reference_answer(r["answer"]) for r in test]
    assert got == want, texts


def test_routing_is_skewed(tok, model, shots) -> None:
    """max/mean tokens per expert >= 2 in most layers, on a few real prompts."""
    test = problems.read_jsonl(DATA / problems.TEST_FILE)[:2]
    num_experts = model.config.num_experts
    load = torch.zeros(len(model.model.layers), num_experts)

    def hook(i):
        def fn(_m, _inp, output):
            idx = next(o for o in output if torch.is_tensor(o) and not o.is_floating_point())
            load[i] += torch.bincount(idx.reshape(-1), minlength=num_experts).float()
        return fn

    handles = [layer.mlp.gate.register_forward_hook(hook(i))
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            for r in test:  # one prompt at a time: no padding tokens in the counts
                model(**tok(build_prompt(shots, r["question"]), return_tensors="pt",
                            add_special_tokens=False))
    finally:
        for h in handles:
            h.remove()
    skew = load.max(1).values / load.mean(1)
    assert int((skew >= 2).sum()) > len(skew) // 2, skew
