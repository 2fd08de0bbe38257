"""EPLBConfig / ParallelConfig parsing: defaults as vLLM's, errors that name the field."""

import pytest

from eplb.config import EPLBConfig, ParallelConfig


def test_reference_config_parses_and_keeps_vllm_defaults():
    cfg = EPLBConfig.from_json('{"window_size":20,"step_interval":100,"use_async":true}')
    assert (cfg.window_size, cfg.step_interval, cfg.use_async) == (20, 100, True)
    default = EPLBConfig()
    assert (default.window_size, default.step_interval) == (1000, 3000)
    assert (default.num_redundant_experts, default.use_async) == (0, True)


@pytest.mark.parametrize(
    "text, named",
    [
        ('{"window_sise": 3}', "window_sise"),
        ('{"window_size": 0}', "window_size"),
        ('{"step_interval": "100"}', "step_interval"),
        ('{"use_async": 1}', "use_async"),
        ('{"num_redundant_experts": -1}', "num_redundant_experts"),
        ('{"policy": "greedy"}', "policy"),
        ('{"transfer_timeout_s": 0}', "transfer_timeout_s"),
        ("[1, 2]", "JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_eplb_config_names_the_field(text, named):
    with pytest.raises(ValueError, match=named):
        EPLBConfig.from_json(text)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ValueError, match="allowed keys: window_size, step_interval"):
        EPLBConfig.from_dict({"bogus": 1})


def test_policy_error_lists_choices():
    with pytest.raises(ValueError, match="deepseek, refined"):
        EPLBConfig(policy="nope")


def test_parallel_config_backend_choices():
    assert ParallelConfig(all2all_backend="naive").all2all_backend == "naive"
    with pytest.raises(ValueError, match="allgather_reducescatter, naive"):
        ParallelConfig(all2all_backend="deepep")
    with pytest.raises(ValueError, match="data_parallel_size"):
        ParallelConfig(data_parallel_size=0)
