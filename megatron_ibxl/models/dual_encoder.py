"""The dual encoder: image tower, text tower, projection heads and a learnable temperature.

Shapes: `b` pairs per rank per micro-batch, `h` a tower's hidden width, `d` the shared
embedding width, `c` channels, `s` tokens per caption.

Both embeddings leave L2-normalised and replicated over the tensor-parallel ranks. The heads
and the temperature are small replicated parameters; the towers are sharded by Megatron-core
tensor parallelism (and sequence parallelism when `parallel.sequence_parallel`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from torch import nn

from megatron_ibxl.config import RunConfig
from megatron_ibxl.models.cpu_support import allow_megatron_on_cpu
from megatron_ibxl.models.init import init_parameters
from megatron_ibxl.models.layer_specs import LayerBackend, select_layer_backend
from megatron_ibxl.models.text import TextTower
from megatron_ibxl.models.vision import VisionTower

logger = logging.getLogger(__name__)


class DualEncoder(nn.Module):
    """CLIP-style dual encoder.

    Attributes:
        image_tower, text_tower: the towers (pooled `[b, h]` outputs).
        image_head, text_head: `nn.Linear(h, d, bias=False)`, Xavier-uniform initialised.
        logit_scale: `[]` log inverse temperature (CLIP: ln(1/0.07); SigLIP: ln 10).
        logit_bias: `[]` learnable bias of the sigmoid loss, None for InfoNCE.
        logit_scale_max: the clamp of `logit_scale` (ln 100).
    """

    def __init__(self, config: RunConfig, tp: int, backend: LayerBackend):
        super().__init__()
        model, loss = config.model, config.loss
        self.backend = backend
        self.image_tower = VisionTower(model, config.parallel, tp, backend)
        self.text_tower = TextTower(model, config.parallel, tp, backend)
        self.image_head = nn.Linear(model.vision.hidden, model.embed_dim, bias=False)
        self.text_head = nn.Linear(model.text.hidden, model.embed_dim, bias=False)
        sigmoid = loss.kind == "sigmoid"
        scale_init = loss.sigmoid_logit_scale_init if sigmoid else model.logit_scale_init
        self.logit_scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(loss.sigmoid_bias_init))) if sigmoid else None
        )
        self.logit_scale_max = float(model.logit_scale_max)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images `[b, c, H, W]` -> L2-normalised `[b, d]`, replicated over tp."""
        pooled = self.image_tower(images)  # [b, h]
        return F.normalize(self.image_head(pooled), dim=-1)  # [b, h] @ [h, d] -> [b, d]

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens `[b, s]`, lengths `[b]` (real tokens, end-of-text included; pooled at
        lengths - 1) -> L2-normalised `[b, d]`, replicated over tp."""
        pooled = self.text_tower(tokens, lengths)  # [b, h]
        return F.normalize(self.text_head(pooled), dim=-1)  # [b, h] @ [h, d] -> [b, d]

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_emb `[b, d]`, text_emb `[b, d]`), both L2-normalised."""
        return self.encode_image(images), self.encode_text(tokens, lengths)

    def scale(self) -> torch.Tensor:
        """exp(clamp(logit_scale, max=logit_scale_max)), a `[]` tensor. The gradient flows
        while logit_scale is at or below the limit and is zero above it."""
        return torch.exp(torch.clamp(self.logit_scale, max=self.logit_scale_max))


def build_dual_encoder(config: RunConfig, backend: LayerBackend | None = None) -> DualEncoder:
    """Build the dual encoder of `config` for the current Megatron-core parallel state.

    Needs `parallel_state` initialised (tp is read from it). Parameters are fp32 on CPU; the
    full-size weights depend only on `config.model.init_seed`, not on tp. Moving the model to
    a GPU and to bf16 is the caller's.

    Args:
        config: the run configuration (model, parallel.sequence_parallel / recompute, loss.kind).
        backend: force `te` or `local` layers; chosen from the machine when None.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    backend = backend or select_layer_backend()
    allow_megatron_on_cpu()
    if config.parallel.tp_comm_overlap:
        # Transformer Engine's userbuffers are sized for one hidden width and the towers have
        # two; overlap of tensor-parallel collectives with GEMMs is not wired up yet.
        logger.warning("parallel.tp_comm_overlap=true is not applied to the towers yet")
    model = DualEncoder(config, tp, backend)
    layers = {
        "image_tower.": config.model.vision.num_layers,
        "text_tower.": config.model.text.num_layers,
    }
    init_parameters(model, config.model.init_seed, layers)
    logger.info(
        "dual encoder built: %s layers, tp=%d, sequence_parallel=%s, recompute=%s",
        backend,
        tp,
        config.parallel.sequence_parallel,
        config.parallel.recompute,
    )
    return model
