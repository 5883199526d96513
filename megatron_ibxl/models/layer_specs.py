"""Megatron-core layer specs and TransformerConfig for the two towers, chosen by the machine.

Two backends, both pre-norm transformer layers with Megatron-core tensor parallelism
(column-parallel QKV and MLP-in, row-parallel attention-out and MLP-out) and Megatron's
sequence parallelism:

- `te`: Transformer Engine layers (LayerNorm fused into the QKV and MLP-in GEMMs,
  `TEDotProductAttention` with its flash / cuDNN kernels). Chosen when Transformer Engine
  imports and CUDA is present. Not exercised by this project's CPU tests.
- `local`: Megatron-core's own column/row-parallel linears, the project's `TowerLayerNorm`
  (sequence-parallel aware) and `LocalCoreAttention` (FlashAttention-2 on CUDA when installed,
  torch SDPA otherwise). Used everywhere else, and by every CPU test.

Both backends hold the same parameters (a LayerNorm before attention and before the MLP, QKV,
attention-out, MLP-in, MLP-out, all with biases, and a final LayerNorm), so
`models/param_count.py` counts either.

Activation checkpointing (`parallel.recompute`) maps onto Megatron-core's own:
`selective` recomputes the attention core (`recompute_modules=["core_attn"]`), `full`
recomputes each whole layer (`recompute_method="uniform"`, one layer per unit).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_ibxl.config import ModelConfig, ParallelConfig
from megatron_ibxl.models.attention import LocalCoreAttention
from megatron_ibxl.models.norm import TowerLayerNorm

LayerBackend = Literal["te", "local"]


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports (it needs CUDA to be useful)."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def select_layer_backend() -> LayerBackend:
    """`te` when Transformer Engine is installed and CUDA is present, else `local`."""
    if torch.cuda.is_available() and transformer_engine_available():
        return "te"
    return "local"


def skip_init(weight: torch.Tensor) -> None:
    """An init method that leaves the tensor as it is (models/init.py fills it later)."""


def tower_transformer_config(
    *,
    hidden: int,
    num_layers: int,
    num_heads: int,
    mlp_hidden: int,
    model: ModelConfig,
    parallel: ParallelConfig,
    tp: int,
    backend: LayerBackend,
) -> TransformerConfig:
    """The TransformerConfig of one tower.

    Parameters are created on CPU in fp32 with a no-op init method: Megatron still builds
    each shard and marks it (`tensor_model_parallel`, `partition_dim`), and `models/init.py`
    then fills every parameter from the run's seed so that the full-size weights do not depend
    on tp. GELU MLP, biases on every linear, no fusions that need Apex or CUDA.
    """
    recompute: dict = {}
    if parallel.recompute == "selective":
        recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif parallel.recompute == "full":
        recompute = dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=num_heads,
        ffn_hidden_size=mlp_hidden,
        kv_channels=hidden // num_heads,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        layernorm_epsilon=model.norm_eps,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu,
        tensor_model_parallel_size=tp,
        sequence_parallel=parallel.sequence_parallel and tp > 1,
        use_cpu_initialization=True,
        init_method=skip_init,
        output_layer_init_method=skip_init,
        params_dtype=torch.float32,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **recompute,
    )


def tower_block_spec(num_layers: int, causal: bool, backend: LayerBackend):
    """TransformerBlock submodules for `num_layers` identical layers and a final norm.

    `causal` selects the attention mask type: `padding_causal` (text) or `padding` (vision);
    the key-padding mask itself is passed at run time (see models/attention.py).
    """
    mask_type = AttnMaskType.padding_causal if causal else AttnMaskType.padding
    if backend == "te":
        layer, final_norm = _te_layer_spec(mask_type)
    else:
        layer, final_norm = _local_layer_spec(mask_type), TowerLayerNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)


def _local_layer_spec(mask_type: AttnMaskType) -> ModuleSpec:
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": mask_type},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=LocalCoreAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )
    mlp = ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=TowerLayerNorm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TowerLayerNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _te_layer_spec(mask_type: AttnMaskType) -> tuple[ModuleSpec, type]:
    """Transformer Engine layer: the pre-attention and pre-MLP norms are fused into the
    following column-parallel GEMM (`layer_norm_weight` / `layer_norm_bias` parameters)."""
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )

    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": mask_type},
        submodules=SelfAttentionSubmodules(
            linear_qkv=TELayerNormColumnParallelLinear,
            core_attention=TEDotProductAttention,
            linear_proj=TERowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )
    mlp = ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(
            linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear
        ),
    )
    layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )
    return layer, TENorm
