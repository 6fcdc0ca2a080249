"""The associative recall task of single-token keys and values (memtx/data/kv_recall.py): the
generator's promises, the answers and the loss mask read back from the tokens alone."""

import numpy as np
import pytest

from memtx.data import kv_recall
from memtx.data.kv_recall import KEY_BASE, VALUE_BASE, KVSpec


def entries(*pairs):
    """A document from (key index, value index) pairs."""
    return bytes(b for k, v in pairs for b in (KEY_BASE + k, VALUE_BASE + v))


def test_documents_are_deterministic_and_keep_their_promises():
    spec = KVSpec()
    docs = [kv_recall.make_document(3, i, spec) for i in range(40)]
    assert docs == [kv_recall.make_document(3, i, spec) for i in range(40)]
    assert len(set(docs)) == 40
    far = near = 0
    for text in docs:
        assert len(text) == spec.length
        kv_recall.check_document(text, spec)  # entries only; values repeat; every query is near or far
        ids = np.frombuffer(text, np.uint8)
        assert ((ids[0::2] >= KEY_BASE) & (ids[0::2] < VALUE_BASE)).all() and (ids[1::2] >= VALUE_BASE).all()
        found = kv_recall.answers(text)
        far += sum(a.distance is not None and a.distance >= spec.gap for a in found)
        near += sum(a.distance is not None and a.distance <= spec.near_max for a in found)
    assert far > 300 and near > 300  # both kinds are plentiful


def test_answers_and_the_loss_mask_are_read_from_the_tokens():
    text = entries((1, 5), (2, 7), (1, 5), (3, 0), (2, 7))
    found = kv_recall.answers(text)
    assert [(a.offset, a.key - KEY_BASE, a.value - VALUE_BASE, a.distance) for a in found] == [
        (1, 1, 5, None), (3, 2, 7, None), (5, 1, 5, 4), (7, 3, 0, None), (9, 2, 7, 6)]
    # Loss on the queries' values only; the same from bytes, a list or an int array with BOS.
    expected = [0, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert kv_recall.answer_mask(text).tolist() == expected
    assert kv_recall.answer_mask(np.frombuffer(text, np.uint8).astype(np.int32)).tolist() == expected
    assert kv_recall.answer_mask(np.array([257, *text], np.int32)).tolist() == [0, *expected]


def test_check_document_catches_a_changed_value_a_mid_distance_query_and_a_stray_token():
    spec = KVSpec(near_max=4, gap=8, num_keys=8)
    kv_recall.check_document(entries((1, 5), (2, 7), (1, 5), *[(3, 1)] * 3, (2, 7)), spec)  # near, then far (10)
    with pytest.raises(ValueError, match="defined as"):
        kv_recall.check_document(entries((1, 5), (2, 7), (1, 6)), spec)
    with pytest.raises(ValueError, match="neither near"):
        kv_recall.check_document(entries((1, 5), (2, 7), (3, 1), (1, 5)), spec)  # 6 tokens back
    with pytest.raises(ValueError, match="not a run of key-value entries"):
        kv_recall.check_document(entries((1, 5)) + b"x" + entries((2, 7)), spec)


def test_long_documents_with_few_keys_keep_their_promises():
    """Once every key is defined every entry is a query: near or far still, and far ones reach
    well beyond the gap."""
    spec = KVSpec(length=2048, num_keys=30, near_max=10, gap=40)
    for i in range(3):
        text = kv_recall.make_document(7, i, spec)
        kv_recall.check_document(text, spec)
        found = kv_recall.answers(text)
        assert sum(a.distance is None for a in found) == 30  # every key defined once
        assert max(a.distance or 0 for a in found) > 3 * spec.gap


def test_long_range_keys_spread_their_distances_log_uniformly():
    """The size curve's documents: the planned keys reach past far_max's 2/3 and spread evenly
    over log-distance; the random keys keep to the few-hundred-token scale of their process."""
    spec = KVSpec(length=8192, long_keys=32, far_max=6144)
    long_range, other = [], []
    for i in range(4):
        text = kv_recall.make_document(2, i, spec)
        kv_recall.check_document(text, spec)
        for a in kv_recall.answers(text):
            if a.distance is not None:
                (long_range if a.key - KEY_BASE >= 32 else other).append(a.distance)
    long_range = np.array(long_range)
    assert len(long_range) > 400 and long_range.min() >= spec.gap and long_range.max() <= spec.far_max + 2
    middle = np.sqrt(spec.gap * spec.far_max)  # the log-scale midpoint (543 tokens)
    lower, upper = (long_range < middle).sum(), (long_range >= middle).sum()
    assert 0.5 < upper / lower < 1.5  # even in log-distance, less those that ran past the end
    assert (long_range > 4128).sum() >= 10  # beyond a 4,096-entry store and its segment
    assert max(other) < 2000
    # Without long-range keys the documents are those of the random process alone.
    assert kv_recall.make_document(2, 0, KVSpec(length=512)) == kv_recall.make_document(
        2, 0, KVSpec(length=512, far_max=6144))


def test_bad_specs_are_refused():
    for bad, match in ((dict(near_max=40, gap=40), "near_max < gap"), (dict(num_keys=65), "1-64 keys"),
                       (dict(num_keys=20, gap=48), "must exceed gap / 2"), (dict(far_prob=1.5), "far_prob"),
                       (dict(long_keys=40, far_max=4096), "num_keys - long_keys"),
                       (dict(long_keys=8), "far_max"), (dict(long_keys=64, far_max=4096), "long_keys")):
        with pytest.raises(ValueError, match=match):
            KVSpec(**bad)
