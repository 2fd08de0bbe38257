"""--load-format dummy: random weights of a config's shapes, the shipped configs, the IdTokenizer,
FP8-by-default resolution, and the dummy router skew (issue: the seed's model at full size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eplb.balancer.placement import Placement
from eplb.balancer.stats import balancedness
from eplb.engine.sampling import SamplingParams
from eplb.engine.tokenizer import IdTokenizer, load_tokenizer
from eplb.model.checkpoint import dequantize_block_fp8
from eplb.model.config import load_config
from eplb.model.dummy import RouterSkew, RouterSkewState, RouterTrace, RouterTraceState, init_dummy_weights, router_skew
from eplb.model.loader import build_model, load_model, resolve_quantization

ROOT = Path(__file__).resolve().parents[1]
BF16_DIR = ROOT / "configs" / "Qwen3-30B-A3B"
FP8_DIR = ROOT / "configs" / "Qwen3-30B-A3B-FP8"
SMALL = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
             num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=1024)


def small_copy(src: Path, dst: Path, **overrides) -> str:
    """The shipped config scaled down (128 experts and top-8 kept), with an IdTokenizer."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(SMALL, **overrides)
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "id_tokenizer.json").write_text(json.dumps({"vocab_size": cfg["vocab_size"]}))
    return str(dst)


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dummy")
    return small_copy(BF16_DIR, root / "bf16"), small_copy(FP8_DIR, root / "fp8")


def test_shipped_configs_are_qwen3_30b_a3b():
    for d, fp8 in ((BF16_DIR, None), (FP8_DIR, [128, 128])):
        c = load_config(str(d))
        assert (c.architecture, c.num_layers, c.hidden_size, c.num_experts, c.top_k) == (
            "Qwen3MoeForCausalLM", 48, 2048, 128, 8)
        assert (c.moe_intermediate_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
            768, 6144, 32, 4, 128)
        assert (c.vocab_size, c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (151936, 1e6, 1e-6, 40960)
        assert c.norm_topk_prob and not c.tie_word_embeddings and c.moe_layers == list(range(48))
        assert c.fp8_block_size == fp8 and c.eos_token_ids == [151645, 151643]
        assert isinstance(load_tokenizer(str(d)), IdTokenizer) and len(load_tokenizer(str(d))) == 151936
    q = json.loads((FP8_DIR / "config.json").read_text())["quantization_config"]
    assert q == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


@pytest.mark.parametrize("path, quant, gb", [(BF16_DIR, None, 61.1), (FP8_DIR, "fp8", 31.2)])
def test_full_size_shapes_and_bytes_on_meta(path, quant, gb):
    """The full model built on the meta device (no memory): 30.5B parameters, 61 GB in bf16 and
    about 31 GB with block-FP8 attention and experts."""
    cfg = load_config(str(path))
    m = build_model(cfg, dtype=torch.bfloat16, device="meta", ep_rank=0, ep_size=1,
                    phy2log=torch.arange(128).repeat(48, 1), max_len=64, quantization=quant)
    params = list(m.parameters())
    n = sum(p.numel() for p in params if p.dtype != torch.float32)  # scales are float32
    assert 30.4e9 < n < 30.6e9
    nbytes = sum(p.numel() * p.element_size() for p in params)
    assert abs(nbytes / 1e9 - gb) < 0.3
    e = m.layers[0].mlp
    assert e.w13.shape == (128, 1536, 2048) and e.w2.shape == (128, 2048, 768)
    if quant:
        assert e.w13.dtype == torch.float8_e4m3fn and e.w13_scale.shape == (128, 12, 16)
        assert m.layers[0].attn.qkv.dtype == torch.float8_e4m3fn and m.lm_head.dtype == torch.bfloat16


def test_dummy_weights_are_finite_and_scaled(small_dirs):
    bf16, _ = small_dirs
    m, cfg = load_model(bf16, load_format="dummy", dtype="float32")
    for name, p in m.named_parameters():
        assert torch.isfinite(p).all(), name
    layer = m.layers[1]
    assert torch.equal(layer.input_norm, torch.ones(128)) and torch.equal(m.norm, torch.ones(128))
    assert abs(layer.mlp.w13.std().item() - 0.02) < 0.001
    assert abs(layer.attn.qkv.std().item() - 0.02) < 0.001
    assert abs(layer.mlp.gate_weight.std().item() - 128 ** -0.5) < 0.01  # router logits ~ N(0, 1)
    # distinct tensors get distinct numbers; the same seed gives the same model, another seed not
    assert not torch.equal(layer.mlp.w13[0], layer.mlp.w13[1])
    m2, _ = load_model(bf16, load_format="dummy", dtype="float32")
    m3, _ = load_model(bf16, load_format="dummy", dtype="float32", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert not torch.equal(m.layers[0].mlp.w2, m3.layers[0].mlp.w2)


def test_fp8_config_dequantized_equals_kept_fp8_numbers(small_dirs):
    """An FP8 config's dummy model dequantized (CPU: FP8 kernels do not run) holds exactly the
    numbers of the block-FP8 tensors it would keep on a GPU: e4m3 values times a scale per block."""
    _, fp8 = small_dirs
    m, cfg = load_model(fp8, load_format="dummy", dtype="float32")
    assert m.layers[0].mlp.w13.dtype == torch.float32 and m.layers[0].mlp.w13_scale is None
    kept = build_model(cfg, dtype=torch.float32, device="cpu", ep_rank=0, ep_size=1,
                       phy2log=torch.arange(128).repeat(2, 1), max_len=64, quantization="fp8")
    init_dummy_weights(kept, seed=0)
    k0, d0 = kept.layers[1].mlp, m.layers[1].mlp
    assert k0.w13.dtype == torch.float8_e4m3fn and k0.w13_scale.shape == (128, 2, 1)
    assert float(k0.w13_scale.min()) >= 0.015 and float(k0.w13_scale.max()) <= 0.025
    torch.testing.assert_close(dequantize_block_fp8(k0.w13, k0.w13_scale, [128, 128]), d0.w13, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_block_fp8(k0.w2, k0.w2_scale, [128, 128]), d0.w2, rtol=0, atol=0)
    a = kept.layers[0].attn
    torch.testing.assert_close(dequantize_block_fp8(a.qkv, a.qkv_scale, [128, 128]), m.layers[0].attn.qkv,
                               rtol=0, atol=0)
    torch.testing.assert_close(kept.lm_head, m.lm_head, rtol=0, atol=0)


def test_ep_ranks_make_the_experts_of_their_slots(small_dirs):
    """With EP each rank makes only its slots, and a slot holds the numbers of the logical expert
    it names, whatever rank or position it has: the same model as one process."""
    bf16, _ = small_dirs
    full, _ = load_model(bf16, load_format="dummy", dtype="float32")
    perm = torch.stack([torch.randperm(128, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    phy2log = torch.cat([perm, perm[:, :2]], dim=1)  # 2 redundant slots: 130 = 2 x 65
    for rank in range(2):
        part, _ = load_model(bf16, load_format="dummy", dtype="float32", ep_rank=rank, ep_size=2, phy2log=phy2log)
        for li in range(2):
            lay = part.layers[li].mlp
            assert lay.w13.shape[0] == 65
            for local, slot in enumerate(range(lay.slot_start, lay.slot_end)):
                e = int(phy2log[li, slot])
                assert torch.equal(lay.w13[local], full.layers[li].mlp.w13[e])
                assert torch.equal(lay.w2[local], full.layers[li].mlp.w2[e])
        assert torch.equal(part.layers[1].attn.o, full.layers[1].attn.o)
        assert torch.equal(part.layers[1].mlp.gate_weight, full.layers[1].mlp.gate_weight)


def test_load_format_errors(small_dirs, tmp_path):
    bf16, _ = small_dirs
    with pytest.raises(ValueError, match="load_format must be one of auto, dummy, got 'random'"):
        load_model(bf16, load_format="random")
    with pytest.raises(ValueError, match="--load-format dummy"):
        load_model(bf16)  # no safetensors there
    with pytest.raises(ValueError, match="dummy_router_skew needs load_format='dummy'"):
        load_model(bf16, router_skew=RouterSkew(1.5))
    with pytest.raises(ValueError, match="dummy_router_skew must be a number > 0"):
        router_skew(-1.0)
    with pytest.raises(ValueError, match="dummy_router_drift must be an integer >= 0"):
        router_skew(1.0, -5)
    with pytest.raises(ValueError, match="dummy_router_drift needs dummy_router_skew"):
        router_skew(None, 10)


def test_resolve_quantization_follows_the_checkpoint():
    bf16, fp8 = load_config(str(BF16_DIR)), load_config(str(FP8_DIR))
    for cfg in (bf16, fp8):  # CPU: always dequantized unless FP8 is insisted on
        assert resolve_quantization(None, "cpu", torch.bfloat16, cfg) is None
        assert resolve_quantization("none", "cpu", torch.bfloat16, cfg) is None
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_quantization("fp8", "cpu", torch.bfloat16, fp8)
    with pytest.raises(ValueError, match=r"or 'none' to dequantize"):
        resolve_quantization("int8", "cpu", torch.bfloat16, fp8)
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        assert resolve_quantization(None, "cuda", torch.bfloat16, fp8) == "fp8"
        assert resolve_quantization(None, "cuda", torch.float32, fp8) is None
        assert resolve_quantization(None, "cuda", torch.bfloat16, bf16) is None


def test_id_tokenizer_covers_every_id(small_dirs):
    tok = IdTokenizer(151936)
    assert tok.decode([0, 5, 151935]) == "t0 t5 t151935" and len(tok) == 151936
    assert tok.encode("t5  t151935\nt0") == [5, 151935, 0]
    assert tok.encode("hi t999999") == [104, 105] + list(b"t999999")  # other words: their bytes
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 256"):
        IdTokenizer(100)
    assert load_tokenizer(small_dirs[0]).vocab_size == 1024


def test_dummy_engine_generates_and_streams_every_token(small_dirs):
    """Token-id prompts and generation over the FP8 config's dummy model on CPU: every generated id
    reads as one word, so the text grows with every token."""
    from eplb.engine.core import EngineCore

    _, fp8 = small_dirs
    core = EngineCore(fp8, load_format="dummy", dtype="float32", max_model_len=64, max_num_seqs=2)
    core.add_request("a", [1, 1023, 7], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    texts = []
    while core.has_unfinished_requests():
        for out in core.step():
            texts.append(out.text)
    assert len(texts) == 6 and all(len(a) < len(b) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == " ".join(f"t{i}" for i in out.token_ids)


# ------------------------------------------------------------------------------ router skew

def _step_balancedness(path: str, skew: float | None) -> float:
    """Mean per-step balancedness at EP 2 (default placement) of a CPU run, EPLB off."""
    from eplb.engine.llm import LLM

    llm = LLM(path, load_format="dummy", dtype="float32", max_model_len=64, max_num_seqs=16,
              dummy_router_skew=skew, dummy_router_drift=0 if skew else None)
    g = torch.Generator().manual_seed(0)
    for i in range(16):
        llm.engine.add_request(str(i), torch.randint(0, 1024, (16,), generator=g).tolist(),
                               SamplingParams(max_tokens=12, temperature=1.0, seed=i, ignore_eos=True))
    layers = llm.engine.model.moe_layers()
    placement = Placement.default(len(layers), 128, 2, 0)
    bals = []
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        load = torch.stack([lay.take_load() for lay in layers])
        bals.append(balancedness(load, placement).mean().item())
    return sum(bals) / len(bals)


def test_router_skew_unbalances_ep2_to_about_half(small_dirs):
    """The calibrated skew (1.5) gives balancedness about 0.5 at EP 2 with EPLB off; the plain
    random router is near balanced."""
    bf16, _ = small_dirs
    assert _step_balancedness(bf16, None) > 0.85
    assert 0.5 <= _step_balancedness(bf16, 1.5) < 0.6


def test_router_skew_window_drifts_one_expert_per_period():
    st = RouterSkewState(RouterSkew(1.0, drift_steps=3, seed=4), num_layers=3, num_experts=16,
                         dtype=torch.float32, device="cpu")
    hot0 = st.bias.argmax(1)
    assert torch.equal(hot0, st.offset[:, 0])
    assert torch.allclose(st.bias.sort(1, descending=True).values[0],
                          -torch.log(torch.arange(16.0) + 1))  # Zipf(1) prior in logit space
    for _ in range(2):
        st.advance()
    assert torch.equal(st.bias.argmax(1), hot0)
    st.advance()  # step 3: one period
    assert torch.equal(st.bias.argmax(1), (hot0 + 1) % 16)
    for _ in range(3 * 15):
        st.advance()
    assert torch.equal(st.bias.argmax(1), hot0)  # a full turn after E periods


def test_router_skew_counts_forwards_in_the_model(small_dirs):
    """Installed through the engine: the first MoE layer advances the counter once per forward
    (dummy steps too); a static skew (drift 0) installs no hook; without skew no bias at all."""
    from eplb.engine.core import EngineCore

    bf16, _ = small_dirs
    core = EngineCore(bf16, load_format="dummy", dtype="float32", max_model_len=64, max_num_seqs=2,
                      dummy_router_skew=1.5, dummy_router_drift=2)
    skew = core.model.router_skew
    layers = core.model.moe_layers()
    assert layers[0].before_route is not None and layers[1].before_route is None
    assert layers[1].router_bias.data_ptr() == skew.bias[1].data_ptr()
    core.add_request("a", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    while core.has_unfinished_requests():
        core.step()
    core.dummy_step()
    assert int(skew.step) == 4  # prefill + 2 decodes + 1 dummy step
    static = EngineCore(bf16, load_format="dummy", dtype="float32", max_model_len=64, max_num_seqs=2,
                        dummy_router_skew=1.5, dummy_router_drift=0)
    assert static.model.moe_layers()[0].before_route is None
    plain = EngineCore(bf16, load_format="dummy", dtype="float32", max_model_len=64, max_num_seqs=2)
    assert all(lay.router_bias is None and lay.before_route is None for lay in plain.model.moe_layers())


def test_router_trace_state_replays_each_step_and_wraps():
    """Row t mod steps of the trace is the bias at forward step t: the log of the smoothed
    popularity, whose argmax is the step's hottest expert."""
    import numpy as np

    load = np.zeros((3, 2, 8), dtype=np.int64)
    for t in range(3):
        load[t, 0, t] = 100  # layer 0: expert t takes everything at step t
        load[t, 1, 7 - t] = 50
    st = RouterTraceState(RouterTrace("t.npz", load), num_layers=2, num_experts=8, dtype=torch.float32,
                          device="cpu")
    seen = []
    for _ in range(7):  # each forward advances before it routes
        st.advance()
        seen.append(st.bias.argmax(1).tolist())
    assert seen == [[0, 7], [1, 6], [2, 5], [0, 7], [1, 6], [2, 5], [0, 7]]
    assert torch.allclose(st.bias[0].exp().sum(), torch.tensor(1.0))  # a distribution over experts
    assert torch.allclose(st.bias[0, 0], torch.log(torch.tensor(100.5 / 104.0)))  # forward 6: row 0
    with pytest.raises(ValueError, match=r"dummy_router_trace t.npz: load of 2 layers x 8 experts, the model has 3"):
        RouterTraceState(RouterTrace("t.npz", load), num_layers=3, num_experts=8, dtype=torch.float32, device="cpu")


def test_router_trace_steers_the_engines_routing(small_dirs, tmp_path):
    """Through the engine, a trace that sends each layer's load to 4 experts (other ones per
    layer, switching after 2 steps) makes the routers pick those experts for almost every pair,
    step by step; bad traces and mixed options are refused naming the option."""
    import numpy as np

    from eplb.engine.core import EngineCore
    from eplb.sim.traces import save_trace

    bf16, _ = small_dirs
    hot = [[[0, 1, 2, 3], [64, 65, 66, 67]], [[10, 20, 30, 40], [100, 101, 102, 103]]]  # [phase][layer]
    load = np.zeros((4, 2, 128), dtype=np.int64)
    for t in range(4):
        for layer in range(2):
            load[t, layer, hot[t // 2][layer]] = 1000
    path = tmp_path / "trace.npz"
    save_trace(path, load)
    core = EngineCore(bf16, load_format="dummy", dtype="float32", max_model_len=64, max_num_seqs=4,
                      dummy_router_trace=str(path))
    layers = core.model.moe_layers()
    assert layers[0].before_route is not None
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        core.add_request(str(i), torch.randint(0, 1024, (8,), generator=g).tolist(),
                         SamplingParams(max_tokens=8, temperature=1.0, seed=i, ignore_eos=True))
    for t in range(4):  # step 0 is the prefill (trace row 0), then decodes
        core.step()
        for layer, lay in enumerate(layers):
            step_load = lay.take_load()
            on_hot = int(step_load[hot[t // 2][layer]].sum())
            # top-8 of 128 with 4 hot experts: at most half the pairs (3% without the trace)
            assert on_hot >= 0.45 * int(step_load.sum()), (t, layer, step_load.nonzero().flatten().tolist())
    with pytest.raises(ValueError, match="dummy_router_trace: trace .* must be 3-D"):
        bad = tmp_path / "bad.npz"
        np.savez(bad, load=np.zeros((2, 3), dtype=np.int64))
        router_skew(None, trace=str(bad))
    with pytest.raises(ValueError, match="dummy_router_trace replaces dummy_router_skew"):
        router_skew(1.5, trace=str(path))
    with pytest.raises(ValueError, match="dummy_router_trace needs load_format='dummy'"):
        load_model(bf16, router_skew=router_skew(None, trace=str(path)))


def test_serve_flags(small_dirs, capsys):
    from eplb.cli import main as cli_main

    bf16, _ = small_dirs

    def run(argv):
        try:
            return cli_main(argv), capsys.readouterr().err
        except SystemExit as exc:
            return exc.code, capsys.readouterr().err

    rc, err = run(["serve", bf16, "--load-format", "random"])
    assert rc == 2 and "invalid choice" in err and "dummy" in err
    rc, err = run(["serve", bf16, "--port", "0", "--dummy-router-skew", "1.5"])
    assert rc == 2 and "--dummy-router-skew/--dummy-router-drift/--dummy-router-trace need --load-format dummy" in err
    rc, err = run(["serve", bf16, "--port", "0", "--load-format", "dummy", "--dummy-router-skew", "-2"])
    assert rc == 2 and "--dummy-router-skew must be a number > 0" in err
    rc, err = run(["serve", bf16, "--port", "0", "--load-format", "dummy", "--dummy-router-trace", "/nonexistent.npz"])
    assert rc == 2 and "--dummy-router-trace: cannot read trace /nonexistent.npz" in err
    import argparse

    from eplb.server.serve_cli import add_arguments, build_configs

    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = build_configs(p.parse_args([bf16, "--port", "0", "--load-format", "dummy", "--dummy-router-skew",
                                      "--quantization", "none"]))
    kw = cfg.engine_kwargs
    assert (kw["load_format"], kw["dummy_router_skew"], kw["dummy_router_drift"], kw["quantization"]) == (
        "dummy", 1.5, None, "none")
    assert cfg.vocab_size == 1024
    assert "load_format" not in build_configs(p.parse_args([bf16, "--port", "0"])).engine_kwargs


def test_generate_cli_with_dummy_weights(small_dirs, capsys):
    from eplb.cli import main as cli_main

    _, fp8 = small_dirs
    assert cli_main(["generate", fp8, "--load-format", "dummy", "--prompt", "t1 t2 t1000", "--max-tokens", "3",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 3 and out["text"] == " ".join(f"t{i}" for i in out["token_ids"])
    assert cli_main(["generate", fp8, "--prompt", "t1"]) == 2
    assert "--load-format dummy" in capsys.readouterr().err
