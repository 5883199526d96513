"""Data parallelism for the dual encoder: ZeRO-3 over the data-parallel ranks, or replicated.

`shard_model(model, config, ctx)` applies `parallel.zero` from outside the model and returns
the GradSync hooks that the train step calls around each micro-batch's backward.

zero 3 (FSDP2 over `ctx.mesh["dp"]`, composed with Megatron-core tensor parallelism):
  Each rank's tensor-parallel shard of a parameter (Megatron-core's, unchanged) is what FSDP2
  sees as "the" parameter; FSDP2 splits it along dim 0 into dp chunks (torch.chunk
  semantics, the last ones may be smaller or empty). Units, in this order: every transformer
  layer of each tower, then each tower (its embeddings and final norm), then the root (the
  heads). Scalar parameters (the logit scale and bias) cannot be sharded by FSDP2; they stay
  replicated and their gradients are all-reduced here.

  With gradient accumulation and `parallel.gather: step`, parameters are all-gathered once per
  optimizer step and kept for the remaining micro-batches (reshard_after_forward=False, and
  no reshard after any backward but the last); gradients accumulate unsharded and are
  reduce-scattered once, after the last micro-batch. `parallel.gather: microbatch` is the
  memory-lean alternative: parameters are re-gathered in every forward and backward and
  gradients reduce-scattered after every micro-batch, so neither full parameters nor full
  gradients outlive a layer.

  Overlap: each layer prefetches the next one's all-gather in forward and the previous one's
  in backward, and FSDP2 reduce-scatters a layer's gradients while backward continues. On GPUs
  these run on separate CUDA streams. Note: on CPU over gloo there are no streams, every
  collective blocks the process, so nothing overlaps there; the CPU path shows correctness,
  not speed.

zero 0 (replicated): parameters and optimizer state are replicated over dp; after the last
micro-batch every gradient is all-reduced over dp in fp32 buckets. With bf16 the same
replication goes through FSDP2 instead, as hybrid sharding whose shard groups have one rank
(mesh dims ("dp", "dp_shard") of sizes (dp, 1)): FSDP2 casts the fp32 master weights to bf16
per unit and all-reduces the fp32 gradients over dp. (Autocast cannot be used: Megatron-core's
linear layers run their backward outside it on CPU and mix bf16 and fp32 operands.)

Both: gradients of parameters marked `sequence_parallel` (norms and row-parallel biases under
sequence parallelism) are partial sums over the tensor-parallel ranks and are all-reduced over
the tp group once per step. Gradient convention (agreed with training/step.py): each rank's
local loss is scaled so that the SUM over dp of local gradients is the gradient of the global
mean loss, so every data-parallel reduction here is a sum, never an average.

Precision (`optimizer.precision`): `bf16` computes in bf16 from fp32 master weights and reduces
gradients in fp32 (FSDP2's MixedPrecisionPolicy, under zero 0 and zero 3); `fp32` computes in
fp32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from megatron_ibxl.config import RunConfig
from megatron_ibxl.parallel.setup import ParallelContext

logger = logging.getLogger(__name__)

_BUCKET_BYTES = 64 * 1024 * 1024
"""Gradients all-reduced together under zero 0 (fp32 elements x 4 bytes)."""

_TP_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")
"""Megatron-core's marks of a tensor-parallel parameter, copied onto FSDP2's sharded ones."""

_KEPT_ATTRIBUTES = (*_TP_ATTRIBUTES, "sequence_parallel", "unpadded_rows", "allreduce")


@dataclass(frozen=True)
class ParamPlacement:
    """Where one parameter's pieces live, as the optimizer, clipping and checkpoints see it."""

    tp_dim: int | None
    """Dimension split over the tensor-parallel ranks (Megatron's `partition_dim`), or None
    when the parameter is replicated over tp."""
    dp_sharded: bool
    """True when FSDP2 splits this rank's tensor-parallel shard along dim 0 over dp."""
    sequence_parallel: bool
    """True when its gradient is a partial sum over tp (norms under sequence parallelism)."""
    full_shape: tuple[int, ...]
    """Shape of the whole parameter: independent of tp and dp."""


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `tensor`: the local shard of a DTensor, else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def param_placement(param: torch.Tensor, tp: int) -> ParamPlacement:
    """The placement of `param` from its Megatron-core attributes and its DTensor-ness.

    Raises ValueError for an interleaved tensor-parallel split (partition_stride > 1), whose
    pieces are not contiguous boxes of the full tensor.
    """
    tp_sharded = bool(getattr(param, "tensor_model_parallel", False)) and tp > 1
    tp_dim = int(param.partition_dim) if tp_sharded else None
    if tp_sharded and int(getattr(param, "partition_stride", 1)) != 1:
        raise ValueError(
            f"parameter of shape {tuple(param.shape)} is split over tp with partition_stride="
            f"{param.partition_stride}; only contiguous tensor-parallel splits are supported"
        )
    shape = list(param.shape)  # a DTensor's shape is its tp shard's shape
    if tp_dim is not None:
        shape[tp_dim] *= tp
    return ParamPlacement(
        tp_dim=tp_dim,
        dp_sharded=_dp_sharded(param),
        sequence_parallel=bool(getattr(param, "sequence_parallel", False)) and tp > 1,
        full_shape=tuple(shape),
    )


_MESHES: dict[tuple, DeviceMesh] = {}


def layout_mesh(ctx: ParallelContext) -> DeviceMesh:
    """A device mesh with dimensions ("tp", "dp") over this pipeline stage's ranks.

    Ranks are laid out tp fastest (r = dp_rank * tp + tp_rank within a stage), so the mesh is
    that grid transposed. tp comes first because a parameter is cut by tp before FSDP2 cuts
    this rank's chunk by dp: DTensor applies placements in mesh order. Built once per process
    group and cached; the first call is collective.
    """
    key = (id(dist.distributed_c10d._get_default_group()), ctx.tp, ctx.dp, ctx.pp_rank)
    if key not in _MESHES:
        first = ctx.pp_rank * ctx.tp * ctx.dp
        grid = torch.arange(first, first + ctx.tp * ctx.dp).reshape(ctx.dp, ctx.tp)  # [dp, tp]
        _MESHES[key] = DeviceMesh(ctx.device.type, grid.T, mesh_dim_names=("tp", "dp"))
    return _MESHES[key]


def as_piece(local: torch.Tensor, placement: ParamPlacement, mesh: DeviceMesh) -> DTensor:
    """This rank's piece (`local`) of a parameter-shaped tensor as a DTensor of the full shape
    on `layout_mesh`, placed [Shard(tp_dim) or Replicate(), Shard(0) or Replicate()]. No copy
    and no communication; uneven dp chunks follow torch.chunk, as FSDP2's do."""
    tp_place = Shard(placement.tp_dim) if placement.tp_dim is not None else Replicate()
    dp_place = Shard(0) if placement.dp_sharded else Replicate()
    shape = torch.Size(placement.full_shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, mesh, [tp_place, dp_place], run_check=False, shape=shape, stride=stride
    )


def reshard_parameters(model: nn.Module) -> None:
    """Register the sharded parameters again (zero 3), dropping gathered copies.

    With `parallel.gather: step` a forward outside training (evaluation) leaves the gathered
    parameters in place; they would go stale once the sharded ones change (an optimizer step,
    a checkpoint load). Checkpointing and clipping call this first; it does nothing when the
    model is already sharded or not FSDP2-wrapped.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_parameters(model: nn.Module, ctx: ParallelContext) -> dict[str, torch.Tensor]:
    """Every parameter of `model` as its whole tensor (all tp and dp pieces), on every rank.
    Collective; for tests and exports of small models, not for the 30B one."""
    reshard_parameters(model)
    mesh = layout_mesh(ctx)
    return {
        name: as_piece(local_tensor(p).detach(), param_placement(p, ctx.tp), mesh).full_tensor()
        for name, p in model.named_parameters()
    }


def _dp_sharded(param: torch.Tensor) -> bool:
    """True for an FSDP2 parameter that is really split: a Shard placement on a mesh dimension
    of more than one rank (not the one-rank shard groups of zero 0 with bf16)."""
    if not isinstance(param, DTensor):
        return False
    mesh_sizes = param.device_mesh.shape
    return any(
        isinstance(place, Shard) and mesh_sizes[dim] > 1
        for dim, place in enumerate(param.placements)
    )


class GradSync:
    """Gradient synchronisation hooks around the micro-batches of one optimizer step.

    The train step calls `before_backward(index, count)` before micro-batch `index` (0-based)
    of `count` runs its forward with gradients, and `after_backward()` after its backward
    (after every micro-batch or only after the last: both work). Everything that crosses
    ranks happens after the last micro-batch, except FSDP2's own per-layer reduce-scatter.
    """

    def __init__(self, model: nn.Module, config: RunConfig, ctx: ParallelContext):
        self.model = model
        self.uses_fsdp = isinstance(model, FSDPModule)
        self.gather = config.parallel.gather
        self.ctx = ctx
        self._is_last = True
        params = dict(model.named_parameters())
        self._sequence_parallel = [
            p for p in params.values() if param_placement(p, ctx.tp).sequence_parallel
        ]
        # FSDP2 reduces its own parameters; the rest (all of them without FSDP2, else the
        # scalars it leaves alone) are all-reduced over dp here.
        self._dp_reduced = [p for p in params.values() if not isinstance(p, DTensor)]

    def before_backward(self, index: int, count: int) -> None:
        """Turn FSDP2's reduce-scatter on for the last micro-batch only (gather=step), and keep
        gathered parameters until it has run."""
        self._is_last = index == count - 1
        if self.uses_fsdp and self.gather == "step":
            self.model.set_requires_gradient_sync(self._is_last)
            self.model.set_reshard_after_backward(self._is_last)

    def after_backward(self) -> None:
        """After the last micro-batch: all-reduce (SUM) replicated gradients over dp, then
        sequence-parallel gradients over tp."""
        if not self._is_last:
            return
        if self.ctx.dp > 1:
            _all_reduce_grads(self._dp_reduced, self.ctx.dp_group)
        if self._sequence_parallel:
            _all_reduce_grads(self._sequence_parallel, self.ctx.tp_group)


def shard_model(model: nn.Module, config: RunConfig, ctx: ParallelContext) -> GradSync:
    """Apply `parallel.zero` and `optimizer.precision` to `model` in place; return its hooks.

    Args:
        model: a dual encoder on `ctx.device` in fp32, tensor-parallel already (Megatron-core
            layers); each tower holds a block whose `layers` are the FSDP units.
        config: reads parallel.zero, parallel.gather and optimizer.precision.
        ctx: the layout; FSDP2 shards over `ctx.mesh["dp"]`.

    Returns the GradSync for train_step. Afterwards, under zero 3, the parameters are DTensors
    sharded over dp (Megatron's tensor-parallel attributes are kept on them).
    """
    if config.parallel.zero == 3:
        _fully_shard(model, config, ctx.mesh["dp"])
    elif config.optimizer.precision == "bf16":
        _fully_shard(model, config, _replicate_mesh(ctx))
    logger.info(
        "data parallel: zero=%d gather=%s precision=%s over dp=%d (tp=%d)",
        config.parallel.zero,
        config.parallel.gather,
        config.optimizer.precision,
        ctx.dp,
        ctx.tp,
    )
    return GradSync(model, config, ctx)


def _replicate_mesh(ctx: ParallelContext) -> DeviceMesh:
    """("dp", "dp_shard") of sizes (dp, 1) within each tp / pp coordinate: FSDP2's hybrid
    sharding over it replicates over dp and shards over one rank, i.e. shards nothing."""
    grid = torch.arange(ctx.world_size).reshape(ctx.pp, ctx.dp, 1, ctx.tp)
    names = ("pp", "dp", "dp_shard", "tp")
    return DeviceMesh(ctx.device.type, grid, mesh_dim_names=names)["dp", "dp_shard"]


def _transformer_layers(tower: nn.Module) -> list[nn.Module]:
    """The layers of the tower's transformer block (Megatron's TransformerBlock.layers)."""
    for module in tower.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    raise ValueError(f"{type(tower).__name__} holds no block with a `layers` list to shard")


def _fully_shard(model: nn.Module, config: RunConfig, mesh: DeviceMesh) -> None:
    """FSDP2 units bottom-up: layers, towers, root; then sum reductions and prefetching."""
    reshard_after_forward = config.parallel.gather == "microbatch"
    compute = torch.bfloat16 if config.optimizer.precision == "bf16" else torch.float32
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    attributes = _kept_attributes(model)

    towers = [model.image_tower, model.text_tower]
    units: list[list[nn.Module]] = []
    for tower in towers:
        layers = _transformer_layers(tower)
        for layer in layers:
            fully_shard(
                layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy
            )
        fully_shard(tower, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
        units.append(layers)

    # The root keeps the heads; scalars (logit scale and bias) are not shardable by FSDP2.
    scalars = {p for p in model.parameters() if p.ndim == 0}
    root_policy = MixedPrecisionPolicy(
        param_dtype=compute, reduce_dtype=torch.float32, output_dtype=torch.float32
    )
    fully_shard(model, mesh=mesh, mp_policy=root_policy, ignored_params=scalars or None)

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    for layers in units:
        _set_prefetch(layers)
    _restore_attributes(model, attributes)


def _set_prefetch(layers: list[nn.Module]) -> None:
    """Layer i gathers layer i+1 in forward and layer i-1 in backward, so that a layer's
    all-gather runs while its neighbour computes."""
    for index, layer in enumerate(layers):
        if index + 1 < len(layers):
            layer.set_modules_to_forward_prefetch([layers[index + 1]])
        if index > 0:
            layer.set_modules_to_backward_prefetch([layers[index - 1]])


def _kept_attributes(model: nn.Module) -> dict[str, dict[str, object]]:
    attributes = {}
    for name, param in model.named_parameters():
        attributes[name] = {
            key: getattr(param, key) for key in _KEPT_ATTRIBUTES if hasattr(param, key)
        }
    return attributes


def _restore_attributes(model: nn.Module, attributes: dict[str, dict[str, object]]) -> None:
    """FSDP2 replaces each parameter by a new DTensor parameter; give it Megatron's marks."""
    for name, param in model.named_parameters():
        for key, value in attributes[name].items():
            setattr(param, key, value)


def _all_reduce_grads(params: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    """SUM-all-reduce the local gradients of `params` over `group`, in flat fp32 buckets."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        bucket.append(grad)
        size += grad.numel() * 4
        if size >= _BUCKET_BYTES:
            _all_reduce_bucket(bucket, group)
            bucket, size = [], 0
    if bucket:
        _all_reduce_bucket(bucket, group)


def _all_reduce_bucket(grads: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    flat = torch.cat([g.reshape(-1).float() for g in grads])  # n x [numel_i] -> [sum numel]
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for grad in grads:
        count = grad.numel()
        grad.copy_(flat[offset : offset + count].view_as(grad))
        offset += count
