"""A small dual encoder with the attributes of the real one, for the sharding and checkpoint
tests while megatron_ibxl.models does not export `build_dual_encoder`.

It has what sharding and checkpoints depend on: Megatron-core column- and row-parallel
linears and a vocabulary-parallel embedding (tensor-parallel params with `partition_dim`),
norms marked `sequence_parallel` under sequence parallelism, replicated heads, position
embeddings and a logit scale, and per tower a block whose `layers` are the FSDP units.
Shapes: b pairs per rank, s sequence, h hidden (h/tp sharded), d shared embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.parallel_state import get_tensor_model_parallel_world_size
from torch import nn


def build_model(config) -> nn.Module:
    """The real dual encoder when the package exports it, otherwise this stand-in."""
    try:
        from megatron_ibxl.models import build_dual_encoder
    except ImportError:
        return build_toy_dual_encoder(config)
    return build_dual_encoder(config)


class _Norm(nn.LayerNorm):
    def __init__(self, hidden: int, sequence_parallel: bool):
        super().__init__(hidden)
        for param in self.parameters():
            param.sequence_parallel = sequence_parallel


class _Layer(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int, mp_config: ModelParallelConfig):
        super().__init__()
        init = nn.init.xavier_uniform_
        self.norm = _Norm(hidden, mp_config.sequence_parallel)
        self.fc1 = tensor_parallel.ColumnParallelLinear(
            hidden, mlp_hidden, config=mp_config, init_method=init, bias=True
        )
        self.fc2 = tensor_parallel.RowParallelLinear(
            mlp_hidden,
            hidden,
            config=mp_config,
            init_method=init,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        inner, _ = self.fc1(self.norm(hidden_states))  # [s/tp, b, h] -> [s, b, mlp/tp]
        out, _ = self.fc2(F.gelu(inner))  # [s, b, mlp/tp] -> [s/tp, b, h]
        return hidden_states + out


class _Block(nn.Module):
    def __init__(self, num_layers: int, hidden: int, mlp_hidden: int, mp_config):
        super().__init__()
        self.layers = nn.ModuleList(
            _Layer(hidden, mlp_hidden, mp_config) for _ in range(num_layers)
        )
        self.final_norm = _Norm(hidden, mp_config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.final_norm(hidden_states)


class _Tower(nn.Module):
    def __init__(self, seq: int, hidden: int, layers: int, mlp: int, mp_config):
        super().__init__()
        self.sequence_parallel = mp_config.sequence_parallel
        self.position_embedding = nn.Parameter(torch.randn(seq, 1, hidden) * 0.02)
        self.block = _Block(layers, hidden, mlp, mp_config)

    def _encode(self, embedded: torch.Tensor) -> torch.Tensor:
        hidden_states = embedded + self.position_embedding  # [s, b, h]
        if self.sequence_parallel:
            hidden_states = tensor_parallel.scatter_to_sequence_parallel_region(hidden_states)
        hidden_states = self.block(hidden_states)  # [s/tp, b, h]
        if self.sequence_parallel:
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False
            )  # [s/tp, b, h] -> [s, b, h]
        return hidden_states


class _ImageTower(_Tower):
    def __init__(self, vision, mp_config):
        super().__init__(
            vision.num_patches, vision.hidden, vision.num_layers, vision.mlp_hidden, mp_config
        )
        self.patch_size = vision.patch_size
        self.patch_embed = nn.Linear(vision.channels * vision.patch_size**2, vision.hidden)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(images, self.patch_size, stride=self.patch_size)  # [b, c*p*p, s]
        patches = patches.permute(2, 0, 1)  # [b, c*p*p, s] -> [s, b, c*p*p]
        return self._encode(self.patch_embed(patches)).mean(dim=0)  # [s, b, h] -> [b, h]


class _TextTower(_Tower):
    def __init__(self, text, mp_config, tp: int):
        super().__init__(
            text.context_length, text.hidden, text.num_layers, text.mlp_hidden, mp_config
        )
        self.token_embedding = tensor_parallel.VocabParallelEmbedding(
            text.padded_vocab_size(tp),
            text.hidden,
            init_method=nn.init.xavier_uniform_,
            config=mp_config,
        )

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        token_hidden = self.token_embedding(tokens)  # [b, s, h]
        text_hidden = self._encode(token_hidden.transpose(0, 1))  # [s, b, h]
        last = (lengths - 1).clamp(min=0)
        return text_hidden[last, torch.arange(tokens.shape[0])]  # [s, b, h] -> [b, h]


class ToyDualEncoder(nn.Module):
    """Patch-linear image tower and vocabulary-parallel text tower, mean/last pooled."""

    def __init__(self, config):
        super().__init__()
        model, tp = config.model, get_tensor_model_parallel_world_size()
        mp_config = ModelParallelConfig(
            tensor_model_parallel_size=tp,
            sequence_parallel=config.parallel.sequence_parallel,
            use_cpu_initialization=True,
            params_dtype=torch.float32,
        )
        self.image_tower = _ImageTower(model.vision, mp_config)
        self.text_tower = _TextTower(model.text, mp_config, tp)
        vision, text = model.vision, model.text
        self.image_head = nn.Linear(vision.hidden, model.embed_dim, bias=False)
        self.text_head = nn.Linear(text.hidden, model.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(model.logit_scale_init))
        self.logit_bias = None

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor):
        """images [b, c, H, W], tokens [b, s] int, lengths [b] -> ([b, d], [b, d])."""
        image_emb = self.image_head(self.image_tower(images))  # [b, h] -> [b, d]
        text_emb = self.text_head(self.text_tower(tokens, lengths))  # [b, h] -> [b, d]
        return image_emb, text_emb

    @staticmethod
    def no_weight_decay(name: str, param: torch.Tensor) -> bool:
        """Norms, biases, position embeddings and the logit scale are not decayed."""
        return param.ndim < 2 or "position_embedding" in name or "logit" in name


def build_toy_dual_encoder(config) -> ToyDualEncoder:
    """Same full-size weights for any tp given `config.model.init_seed`."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(config.model.init_seed)
    try:
        return ToyDualEncoder(config)
    finally:
        torch.set_rng_state(generator_state)


def tiny_model_config(config) -> None:
    """Shrink `config.model` in place to a model that trains in milliseconds."""
    vision, text = config.model.vision, config.model.text
    vision.image_size, vision.patch_size, vision.channels = 8, 4, 3
    vision.hidden, vision.num_layers, vision.num_heads, vision.mlp_hidden = 16, 2, 2, 32
    text.vocab_size, text.vocab_pad_multiple, text.context_length = 29, 8, 6
    text.hidden, text.num_layers, text.num_heads, text.mlp_hidden = 16, 2, 2, 32
    config.model.embed_dim = 8
    config.model.logit_scale_init = math.log(10.0)
