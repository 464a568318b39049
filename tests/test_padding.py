"""bert_padding.unpad_input / pad_input contract."""

from __future__ import annotations

import torch

from bert_padding import pad_input, unpad_input


def _mask(rows):
    S = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (S - len(r)) for r in rows], dtype=torch.long)


MASK = _mask([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 1, 1, 0, 1], [1, 1, 1, 1, 1]])


def test_unpad_input_returns_real_tokens_in_row_major_order():
    B, S = MASK.shape
    hidden = torch.randn(B, S, 6)
    unpadded, indices, cu_seqlens, max_seqlen = unpad_input(hidden, MASK)
    assert unpadded.shape == (int(MASK.sum()), 6)
    torch.testing.assert_close(unpadded, hidden[MASK.bool()])
    assert indices.dtype == torch.int64
    assert torch.equal(indices, torch.nonzero(MASK.flatten()).flatten())
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 3, 4, 7, 12]
    assert isinstance(max_seqlen, int) and max_seqlen == 5


def test_unpad_input_accepts_bool_mask_and_extra_dims():
    B, S = MASK.shape
    hidden = torch.randn(B, S, 3, 2)
    unpadded, indices, cu, mx = unpad_input(hidden, MASK.bool())
    assert unpadded.shape == (int(MASK.sum()), 3, 2)
    torch.testing.assert_close(unpadded, hidden[MASK.bool()])
    assert mx == 5


def test_pad_input_puts_rows_back_with_zeros_at_pads():
    B, S = MASK.shape
    hidden = torch.randn(B, S, 4)
    unpadded, indices, _, _ = unpad_input(hidden, MASK)
    padded = pad_input(unpadded, indices, B, S)
    assert padded.shape == (B, S, 4)
    torch.testing.assert_close(padded[MASK.bool()], hidden[MASK.bool()])
    assert torch.all(padded[~MASK.bool()] == 0)
    # round trip of a zero-padded tensor is exact
    zp = hidden * MASK[..., None]
    assert torch.equal(pad_input(unpad_input(zp, MASK)[0], indices, B, S), zp)


def test_pad_input_with_extra_dims():
    B, S = MASK.shape
    x = torch.randn(int(MASK.sum()), 2, 3)
    _, indices, _, _ = unpad_input(torch.zeros(B, S, 1), MASK)
    padded = pad_input(x, indices, B, S)
    assert padded.shape == (B, S, 2, 3)
    torch.testing.assert_close(padded[MASK.bool()], x)


def test_all_padding_row_gives_zero_length_entry():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    hidden = torch.randn(3, 3, 2)
    unpadded, indices, cu, mx = unpad_input(hidden, mask)
    assert cu.tolist() == [0, 2, 2, 3]
    assert unpadded.shape == (3, 2)
    assert mx == 2
    padded = pad_input(unpadded, indices, 3, 3)
    assert torch.all(padded[1] == 0)


def test_unpad_and_pad_preserve_dtype():
    for dt in (torch.float32, torch.float64, torch.bfloat16):
        h = torch.randn(*MASK.shape, 4).to(dt)
        u, idx, _, _ = unpad_input(h, MASK)
        assert u.dtype == dt
        assert pad_input(u, idx, *MASK.shape).dtype == dt


def test_unpad_input_gradcheck():
    B, S = MASK.shape
    hidden = torch.randn(B, S, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h: unpad_input(h, MASK)[0], (hidden,))
    # gradient is 1 at real tokens, 0 at pads
    u = unpad_input(hidden, MASK)[0]
    (g,) = torch.autograd.grad(u.sum(), hidden)
    assert torch.equal(g, MASK[..., None].double().expand_as(g))


def test_pad_input_gradcheck():
    B, S = MASK.shape
    _, indices, _, _ = unpad_input(torch.zeros(B, S, 1), MASK)
    x = torch.randn(int(MASK.sum()), 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pad_input(t, indices, B, S), (x,))


def test_unpad_input_with_known_lengths_matches_reading_them_from_the_mask():
    B, S = MASK.shape
    hidden = torch.randn(B, S, 3)
    read = unpad_input(hidden, MASK)
    known = unpad_input(hidden, MASK, lengths=(int(MASK.sum()), int(MASK.sum(-1).max())))
    for a, b in zip(read, known):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_read_batch_returns_the_lengths_unpadding_needs():
    from modeling_mosaic_bert import read_batch

    ids = torch.randint(0, 64, MASK.shape)
    float_mask = MASK.float()  # any 0/1 dtype
    lengths, labelled = read_batch(float_mask, ids, None, None, 64, 2, 0, True)
    assert lengths == MASK.sum(-1).tolist() and labelled == 0
    labels = torch.where(MASK.bool(), ids, -100)
    labels[0, 0] = -100
    _, labelled = read_batch(MASK, ids, None, labels, 64, 2, 64, True)
    assert labelled == int((labels != -100).sum())
