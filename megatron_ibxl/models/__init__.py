"""Vision tower, text tower, dual encoder, layer specs, pooling and parameter counts.

Shapes: `b` pairs per rank per micro-batch, `s` sequence, `h` hidden (`h/tp` when sharded),
`d` shared embedding, `n` heads. Megatron-core layers take activations as `[s, b, h]`.
"""

from megatron_ibxl.models.dual_encoder import DualEncoder, build_dual_encoder
from megatron_ibxl.models.init import gather_full_parameters, no_weight_decay, shard_full_tensor
from megatron_ibxl.models.layer_specs import select_layer_backend
from megatron_ibxl.models.param_count import ParamCounts, count_parameters
from megatron_ibxl.models.text import TextTower
from megatron_ibxl.models.vision import VisionTower

__all__ = [
    "DualEncoder",
    "ParamCounts",
    "TextTower",
    "VisionTower",
    "build_dual_encoder",
    "count_parameters",
    "gather_full_parameters",
    "no_weight_decay",
    "select_layer_backend",
    "shard_full_tensor",
]
