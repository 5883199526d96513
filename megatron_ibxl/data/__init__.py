"""Training and evaluation data: shards, DALI pipelines, tokenizer, demo dataset.

| module | role |
| --- | --- |
| `shards` | list shards (brace pattern or list file), index their samples, skip bad ones |
| `order` | the global sample order from the seed and the epoch, independent of the layout |
| `loader` | `build_train_loader`: micro-batches per data-parallel rank, exact resume |
| `eval_images` | `iter_eval_images`: resized, centre-cropped evaluation images from files |
| `backends` | DALI or the PIL fallback (`data.loader`), encoded bytes to normalised tensors |
| `dali_pipelines` | the DALI training and evaluation pipelines |
| `pil_transforms` | the fallback's crop, RandAugment and normalisation |
| `tokenizer` | byte-level BPE: load, train, `encode_batch` |
| `demo` | the scikit-learn digits as WebDataset shards (`make-demo-data`) |
| `writer` | write WebDataset shards |

Submodules are imported where used, so importing this package does not import DALI.
"""
