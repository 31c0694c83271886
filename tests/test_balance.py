"""Token-balanced micro-batches: same rows per optimizer step as a plain shuffle, split evenly, used by the trainer."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_rejection.balance import TokenBalancedSampler, balanced_chunks
from trl_rejection.config import RejectionSFTConfig
from trl_rejection.sampler import ModalityLengthGroupedSampler
from trl_rejection.testing.tiny import make_model, make_processor
from trl_rejection.trainer import RejectionSFTTrainer
from test_trainer import mix


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.data())
def test_balanced_chunks_split_every_row_once_and_evenly(batch_size, chunks, data):
    lengths = data.draw(st.lists(st.integers(1, 3000), min_size=batch_size * chunks, max_size=batch_size * chunks))
    block = data.draw(st.permutations(range(len(lengths))))
    bins = balanced_chunks(block, lengths, batch_size, chunks)
    assert sorted(i for b in bins for i in b) == sorted(block)
    assert [len(b) for b in bins] == [batch_size] * chunks
    loads = [sum(lengths[i] for i in b) for b in bins]
    # greedy with equal-size bins: no bin exceeds the lightest by more than the longest row
    assert max(loads) - min(loads) <= max(lengths)


def _gap(parts: list[list[int]], lengths: list[int]) -> int:
    loads = [sum(lengths[i] for i in p) for p in parts]
    return max(loads) - min(loads)


def test_balanced_chunks_beat_a_random_split():
    torch.manual_seed(0)
    lengths = (576 + torch.distributions.LogNormal(5.0, 0.8).sample((32 * 50,))).long().tolist()
    balanced_gaps, plain_gaps = [], []
    for step in range(50):
        block = list(range(step * 32, step * 32 + 32))
        plain = [block[:16], block[16:]]
        bins = balanced_chunks(block, lengths, 16, 2)
        balanced_gaps.append(_gap(bins, lengths))
        plain_gaps.append(_gap(plain, lengths))
        assert balanced_gaps[-1] <= max(lengths[i] for i in block)
    assert sum(balanced_gaps) * 3 < sum(plain_gaps), (sum(balanced_gaps), sum(plain_gaps))


def test_sampler_keeps_each_steps_rows_and_is_seeded():
    lengths = [(i * 37) % 101 + 1 for i in range(70)]
    sampler = TokenBalancedSampler(lengths, batch_size=4, chunks=3, seed=5)
    order = list(sampler)
    plain = torch.randperm(70, generator=torch.Generator().manual_seed(5)).tolist()
    assert sorted(order) == list(range(70))
    for start in range(0, 70, 12):  # the rows of each step (and of the trailing partial one) are the shuffle's
        assert sorted(order[start:start + 12]) == sorted(plain[start:start + 12])
    assert order[60:] == plain[60:]
    assert order != plain and order == list(TokenBalancedSampler(lengths, 4, 3, seed=5))
    sampler.set_epoch(1)
    assert list(sampler) != order


def _sampler(tmp_path, data=None, **kw):
    proc = make_processor("llava-1.5")
    args = RejectionSFTConfig(str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=1,
                              dataloader_num_workers=0, per_device_train_batch_size=2, **kw)
    trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=args,
                                  train_dataset=mix(6, 2) if data is None else data, processing_class=proc)
    return trainer, trainer._get_train_sampler()


def test_trainer_balances_micro_batches_only_where_it_can_matter(tmp_path):
    trainer, sampler = _sampler(tmp_path, gradient_accumulation_steps=2)
    assert isinstance(sampler, TokenBalancedSampler) and (sampler.batch_size, sampler.chunks) == (2, 2)
    assert sorted(sampler) == list(range(8))
    trainer.train()
    for kw in (dict(gradient_accumulation_steps=1), dict(gradient_accumulation_steps=2, balance_micro_batches=False),
               dict(gradient_accumulation_steps=2, padding_free=False)):
        assert not isinstance(_sampler(tmp_path, **kw)[1], TokenBalancedSampler), kw


def test_a_length_column_is_what_both_samplers_order_by(tmp_path):
    lengths = [5, 900, 7, 800, 6, 700, 8, 600]
    data = mix(6, 2).add_column("length", lengths)
    _, balanced = _sampler(tmp_path, data, gradient_accumulation_steps=2)
    _, grouped = _sampler(tmp_path, data, train_sampling_strategy="group_by_length")
    assert isinstance(balanced, TokenBalancedSampler) and balanced.lengths == lengths
    assert isinstance(grouped, ModalityLengthGroupedSampler) and grouped.lengths == lengths
    assert grouped.has_image == [True] * 8  # the modality split still read from the messages

