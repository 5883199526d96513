"""megatron-ibxl: a training engine for large dual-tower image-text contrastive models.

Shape notation used throughout the package (each module that uses it repeats it):

    b   pairs per data-parallel rank per micro-batch
    B   pairs in the contrastive batch (b * dp, times accumulation under global negatives)
    s   sequence length (patches or tokens; s/tp when sequence parallel)
    h   hidden width of a tower (h/tp when tensor-parallel sharded)
    d   shared embedding width
    n   attention heads (n/tp per tensor-parallel rank)

Megatron-core layers take activations as [s, b, h].
"""

__version__ = "0.1.0"
