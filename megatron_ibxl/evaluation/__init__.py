"""Zero-shot classification and image-text retrieval, distributed over data-parallel ranks.

`megatron-ibxl eval` runs `entry.run`; the training loop calls `evaluate_zero_shot`. The
core (`run_evaluation`) takes any `EvalTowers`, so tests can evaluate a model whose right
answers are known.
"""

from megatron_ibxl.evaluation.embed import EvalShard, EvalTowers
from megatron_ibxl.evaluation.entry import (
    EvalData,
    evaluate_zero_shot,
    load_eval_data,
    run_evaluation,
    towers_from_model,
)

__all__ = [
    "EvalData",
    "EvalShard",
    "EvalTowers",
    "evaluate_zero_shot",
    "load_eval_data",
    "run_evaluation",
    "towers_from_model",
]
