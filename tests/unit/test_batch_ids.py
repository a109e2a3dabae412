"""A batch's ids: random version-4 UUIDs sharing 14 bytes, the last two the item's index."""

import uuid

import pytest

from notifications.services.messages import batch_id_range, batch_ids


def test_ids_are_version_4_share_their_head_and_end_in_their_index() -> None:
    ids = batch_ids(1000)
    assert all(i.version == 4 and i.variant == uuid.RFC_4122 for i in ids)
    assert len({i.bytes[:14] for i in ids}) == 1
    assert [int.from_bytes(i.bytes[14:], "big") for i in ids] == list(range(1000))
    low, high = batch_id_range(ids[0])
    assert all(low <= i <= high for i in ids) and sorted(ids) == ids


def test_two_batches_draw_different_heads_and_sizes_are_bounded() -> None:
    assert batch_ids(1)[0].bytes[:14] != batch_ids(1)[0].bytes[:14]
    low, high = batch_id_range(batch_ids(1)[0])
    assert not low <= batch_ids(1)[0] <= high
    with pytest.raises(ValueError):
        batch_ids(0)
    with pytest.raises(ValueError):
        batch_ids(65537)
