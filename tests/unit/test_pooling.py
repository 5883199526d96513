"""Pooling positions, padding masks and sequence padding, on hand-made token ids.

The tower-level checks (a padded batch pools the same vectors as each caption alone, under
tp=1, 2 and 4 with sequence parallelism) are in tests/distributed/test_towers_tp.py.
"""

import pytest
import torch

from megatron_ibxl.models.pooling import (
    check_lengths,
    key_padding_mask,
    pad_sequence,
    padded_length,
    pool_at_lengths,
    pool_mean,
)

EOT = 50256  # GPT-2 end-of-text, the highest id of the vocabulary


def _position_coded_hidden(s: int, b: int, h: int = 3) -> torch.Tensor:
    """[s, b, h] whose every entry at (position p, sequence i) is 100 * i + p, so a pooled
    row tells which position it came from."""
    positions = torch.arange(s)[:, None, None]
    sequences = torch.arange(b)[None, :, None]
    return (100 * sequences + positions).float().expand(s, b, h)


def test_pools_end_of_text_when_padding_reuses_its_id():
    # Captions padded with the end-of-text id itself; lengths count the real tokens,
    # end-of-text included, as the data pipeline reports them.
    tokens = torch.tensor(
        [
            [320, 1125, 286, EOT, EOT, EOT],  # "a photo of" + end-of-text, 2 padding ids
            [64, EOT, EOT, EOT, EOT, EOT],  # one word
            [11, 12, 13, 14, 15, EOT],  # fills the context exactly
        ]
    )
    lengths = torch.tensor([4, 2, 6])
    pooled = pool_at_lengths(_position_coded_hidden(6, 3), lengths)
    # Expected positions: the end-of-text token of each caption, index length - 1.
    assert pooled[:, 0].tolist() == [3.0, 100 + 1.0, 200 + 5.0]
    assert all(tokens[i, n - 1] == EOT for i, n in enumerate(lengths.tolist()))


def test_pools_last_token_of_a_truncated_caption():
    # Cut at the context length: no end-of-text at all, and a high id (EOT - 1) mid-caption
    # where an argmax over ids would pool instead.
    tokens = torch.tensor([[320, EOT - 1, 286, 1125, 7, 9]])
    lengths = torch.tensor([6])
    pooled = pool_at_lengths(_position_coded_hidden(6, 1), lengths)
    assert pooled[0, 0].item() == 5.0
    assert tokens.argmax(dim=1).item() == 1  # the position the argmax rule would have used


def test_pooling_ignores_sequence_padding_rows():
    # Sequence parallelism pads 6 positions to 8 (tp=4); pooling reads the same rows.
    hidden = _position_coded_hidden(6, 2)
    lengths = torch.tensor([6, 3])
    padded = pad_sequence(hidden, padded_length(6, 4))
    assert padded.shape == (8, 2, 3)
    assert torch.equal(padded[6:], torch.zeros(2, 2, 3))
    assert torch.equal(pool_at_lengths(padded, lengths), pool_at_lengths(hidden, lengths))


def test_key_padding_mask_marks_positions_at_or_after_length():
    mask = key_padding_mask(torch.tensor([3, 1, 4]), 4)
    assert mask.shape == (3, 1, 1, 4)
    expected = [
        [False, False, False, True],
        [False, True, True, True],
        [False, False, False, False],
    ]
    assert mask[:, 0, 0].tolist() == expected


def test_padded_length():
    # 11 caption tokens under tp=4 become 12; 10 image tokens under tp=2 stay 10.
    assert [padded_length(s, m) for s, m in ((11, 4), (12, 4), (1, 4), (10, 2), (9, 1))] == [
        12,
        12,
        4,
        10,
        9,
    ]


def test_mean_pool_skips_class_token_and_padding():
    # Rows: class token (0), patches 1..4, then 3 padding rows; the mean over the patches of
    # sequence 0 is (1 + 2 + 3 + 4) / 4 = 2.5.
    hidden = pad_sequence(_position_coded_hidden(5, 2), 8)
    pooled = pool_mean(hidden, start=1, count=4)
    assert pooled[:, 0].tolist() == [2.5, 102.5]


@pytest.mark.parametrize("lengths", [[0, 3], [3, 7]])
def test_lengths_out_of_range_are_rejected(lengths):
    with pytest.raises(ValueError, match=r"text lengths must be in 1\.\.6"):
        check_lengths(torch.tensor(lengths), 6)
