"""HF MoE checkpoints: config and safetensors loading, layers, the MoE layer with EP hooks."""

from eplb.model.attention import AttentionMetadata
from eplb.model.checkpoint import CheckpointReader
from eplb.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, load_config
from eplb.model.loader import load_model, resolve_dtype
from eplb.model.moe import MoELayer, combine, expert_forward, local_dispatch

__all__ = [
    "AttentionMetadata", "CheckpointReader", "ModelConfig", "MoELayer", "SUPPORTED_ARCHITECTURES",
    "combine", "expert_forward", "load_config", "load_model", "local_dispatch", "resolve_dtype",
]
