import pytest
import torch

from core.sequence_layout import SequenceLayout


@pytest.mark.parametrize("cp, balanced", [(1, False), (2, False), (2, True), (4, True), (3, True)])
def test_shard_unshard_round_trip_and_positions(cp, balanced):
    layout = SequenceLayout(24, cp, balanced)
    x = torch.arange(2 * 24).reshape(2, 24)
    pieces = [layout.shard(x, 1, r) for r in range(cp)]
    assert torch.equal(layout.unshard(pieces, 1), x)
    for r, piece in enumerate(pieces):  # a rank's tokens are the ones at its positions
        assert torch.equal(piece[0], layout.positions(r))
    every = torch.cat([layout.positions(r) for r in range(cp)]).sort().values
    assert torch.equal(every, torch.arange(24))


def test_balanced_layout_is_megatrons():
    layout = SequenceLayout(16, 4, balanced=True)  # 8 chunks of 2
    assert layout.chunk_ids(0) == (0, 7) and layout.chunk_ids(3) == (3, 4)
    assert layout.positions(1).tolist() == [2, 3, 12, 13]


def test_balanced_layout_evens_the_causal_work():
    layout = SequenceLayout(64, 4, balanced=True)
    work = [int((layout.positions(r)[:, None] >= torch.arange(64)[None, :]).sum())
            for r in range(4)]
    assert len(set(work)) == 1  # every rank sees the same number of (query, key) pairs
    contiguous = SequenceLayout(64, 4, balanced=False)
    skew = [int((contiguous.positions(r)[:, None] >= torch.arange(64)[None, :]).sum())
            for r in range(4)]
    assert skew[-1] > 3 * skew[0]


def test_a_length_that_does_not_split_names_the_nearest_ones():
    with pytest.raises(ValueError, match=r"sequence length 30 does not split into 8 equal chunks "
                                         r"\(2\*cp with cp=4\); the nearest lengths that do are "
                                         r"24 and 32"):
        SequenceLayout(30, 4, balanced=True)
