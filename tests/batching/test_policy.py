"""extractor.batching.policy: windows in, packed batches out, with no thread and no process."""

from __future__ import annotations

import numpy as np

from extractor.batching.packing import window_flops, window_shapes
from extractor.batching.policy import BatchPolicy
from extractor.constants import MAX_TOKENS, N_SAMPLES, encoder_tokens, mel_frames

DIMS = (64, 2, 128)  # d_model, layers, mel bins


def windows(lengths, first_item=0):
    lengths = np.asarray(lengths, dtype=np.int64)
    items = np.arange(first_item, first_item + len(lengths), dtype=np.int64)
    return items, np.zeros(len(lengths), dtype=np.int64), lengths, [np.full(n, i, np.float32) for i, n in zip(items, lengths)]


def tokens_of(lengths) -> int:
    return int(window_shapes(np.asarray(lengths), padding_mask=True)[0].sum())


def test_the_first_pool_is_one_batch_then_pools_of_several():
    policy = BatchPolicy(DIMS, padding_mask=True, pool_batches=4)
    budget = 3 * MAX_TOKENS
    policy.add(*windows([N_SAMPLES, N_SAMPLES]))
    assert policy.tokens == 2 * MAX_TOKENS and not policy.ready(budget)
    policy.add(*windows([N_SAMPLES], first_item=2))
    assert policy.ready(budget)  # one batch's worth: the device starts as early as it can
    assert sum(b.size for b in policy.take(budget, max_windows=64)) == 3 and policy.tokens == 0
    policy.add(*windows([N_SAMPLES] * 6, first_item=3))
    assert not policy.ready(budget)  # from now on, a pool of four batches before sorting
    policy.add(*windows([N_SAMPLES] * 6, first_item=9))
    assert policy.ready(budget)


def test_batches_are_sorted_longest_first_within_the_budget_and_hold_every_window_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(400, N_SAMPLES, size=300)
    policy = BatchPolicy(DIMS, padding_mask=True)
    for k in range(0, 300, 50):  # blocks as the decoders send them
        policy.add(*windows(lengths[k : k + 50], first_item=k))
    budget = 8 * MAX_TOKENS
    batches = policy.take(budget, max_windows=40)
    seen = np.concatenate([b.items for b in batches])
    assert sorted(seen.tolist()) == list(range(300))
    longest = [int(b.tokens.max()) for b in batches]
    assert longest == sorted(longest, reverse=True)
    for b in batches:
        assert b.size <= 40 and b.size * b.max_tokens <= budget or b.size == 1
        assert b.audio_samples == int(lengths[b.items].sum())
        assert all(np.all(s == i) for s, i in zip(b.samples, b.items))  # each window keeps its own samples
    real = encoder_tokens(mel_frames(lengths))
    assert sum(b.flops for b in batches) == np.float64(window_flops(real, mel_frames(lengths), *DIMS).sum())


def test_without_the_mask_every_window_costs_a_full_window_but_counts_its_real_flops():
    policy = BatchPolicy(DIMS, padding_mask=False)
    policy.add(*windows([16_000, 32_000]))
    assert policy.tokens == 2 * MAX_TOKENS
    (batch,) = policy.take(2 * MAX_TOKENS, max_windows=8)
    assert batch.tokens.tolist() == [MAX_TOKENS, MAX_TOKENS]
    n_mel = mel_frames(np.array([16_000, 32_000]))
    assert batch.flops == float(window_flops(encoder_tokens(n_mel), n_mel, *DIMS).sum())


def test_dropped_rows_leave_the_pool_and_its_token_count():
    policy = BatchPolicy(DIMS, padding_mask=True)
    policy.add(*windows([16_000, 20_000, 24_000]))
    policy.drop({1})
    assert policy.tokens == tokens_of([16_000, 24_000])
    (batch,) = policy.take(10 * MAX_TOKENS, max_windows=8)
    assert sorted(batch.items.tolist()) == [0, 2]
    assert policy.take(10 * MAX_TOKENS, max_windows=8) == []  # taken: empty
