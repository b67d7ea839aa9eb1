"""Schedule maths against hand-computed values and properties over random valid schemes."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamdit_core.schedule import (
    Partition,
    default_chunk_sizes,
    inference_sigmas,
    next_inference_sigmas,
    sample_chunk_size,
    time_shift,
    training_sigmas,
    uniform_sigmas,
    warm_start_steps,
)


def test_partition_sizes_and_errors():
    p = Partition(K=1, N=3, c=2, s=2)
    assert (p.B, p.T) == (7, 6)
    with pytest.raises(ValueError, match="N=0"):
        Partition(K=0, N=0, c=2, s=1)
    with pytest.raises(ValueError, match="c=0"):
        Partition(c=0)
    with pytest.raises(ValueError, match="B=16.*K=0.*c=3"):
        Partition.from_buffer(16, 3)
    assert Partition.from_buffer(16, 4, s=2) == Partition(K=0, N=4, c=4, s=2)


def test_paper_figure2_levels_by_hand():
    # K=1, c=2, s=2, N=3 → T=6. Position p=0 (cleanest) at m=0: u=(2·2+0)/6=4/6 → σ=2/6.
    p = Partition(K=1, N=3, c=2, s=2)
    expected_m0 = [0, 2 / 6, 2 / 6, 4 / 6, 4 / 6, 6 / 6, 6 / 6]
    expected_m1 = [0, 1 / 6, 1 / 6, 3 / 6, 3 / 6, 5 / 6, 5 / 6]
    assert torch.allclose(inference_sigmas(p, 0), torch.tensor(expected_m0, dtype=torch.float64))
    assert torch.allclose(inference_sigmas(p, 1), torch.tensor(expected_m1, dtype=torch.float64))
    # after the last micro-step the cleanest chunk is at 0 and every other one has moved by 1/6
    assert torch.allclose(
        next_inference_sigmas(p, 1), torch.tensor([0, 0, 0, 2 / 6, 2 / 6, 4 / 6, 4 / 6], dtype=torch.float64)
    )


def test_distilled_student_levels_by_hand():
    p = Partition(K=0, N=8, c=2, s=1)
    expected = [k / 8 for k in range(1, 9) for _ in range(2)]
    assert torch.allclose(inference_sigmas(p, 0), torch.tensor(expected, dtype=torch.float64))


def test_uniform_and_diagonal_special_cases():
    uniform = Partition(K=0, N=1, c=16, s=8)  # c = B: ordinary T2V
    for m in range(8):
        sig = inference_sigmas(uniform, m)
        assert torch.all(sig == sig[0]) and torch.isclose(sig[0], torch.tensor(1 - m / 8, dtype=torch.float64))
    assert torch.allclose(inference_sigmas(uniform, 3), uniform_sigmas(8)[3].expand(16))
    diagonal = Partition(K=0, N=16, c=1, s=1)  # FIFO: every frame at its own level
    sig = inference_sigmas(diagonal, 0)
    assert torch.allclose(sig, torch.arange(1, 17, dtype=torch.float64) / 16)


def test_time_shift_properties():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(time_shift(s, 1.0), s)
    shifted = time_shift(s, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and torch.all(shifted[1:-1] > s[1:-1])
    assert torch.isclose(time_shift(0.5, 3.0), torch.tensor(0.75, dtype=torch.float64))  # 1.5/2
    with pytest.raises(ValueError, match="shift"):
        time_shift(0.5, 0.0)


def _life_of_a_frame(p: Partition, shift: float) -> list[float]:
    """Follow one frame from entry to exit through the staircase; return its σ before each call, plus the end."""
    pos, m, levels = p.N - 1, 0, []
    while True:
        levels.append(float(inference_sigmas(p, m, shift)[p.K + pos * p.c]))
        nxt = float(next_inference_sigmas(p, m, shift)[p.K + pos * p.c])
        m += 1
        if m == p.s:
            m = 0
            if pos == 0:
                levels.append(nxt)
                return levels
            pos -= 1


schemes = st.builds(
    lambda K, N, c, s: Partition(K=K, N=N, c=c, s=s),
    st.integers(0, 3),
    st.integers(1, 8),
    st.integers(1, 4),
    st.integers(1, 5),
)


@settings(max_examples=60, deadline=None)
@given(p=schemes, shift=st.sampled_from([1.0, 2.0, 5.0]))
def test_every_frame_takes_exactly_T_calls_from_1_to_0(p, shift):
    life = _life_of_a_frame(p, shift)
    assert len(life) == p.T + 1
    assert life[0] == pytest.approx(1.0) and life[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(life, life[1:]))
    expected = uniform_sigmas(p.T, shift).tolist()
    assert life == pytest.approx(expected)


@settings(max_examples=60, deadline=None)
@given(p=schemes, shift=st.sampled_from([1.0, 3.0]))
def test_levels_monotone_and_references_fixed(p, shift):
    for m in range(p.s):
        sig = inference_sigmas(p, m, shift)
        assert sig.shape == (p.B,)
        assert torch.all(sig[: p.K] == 0)
        assert torch.all(sig[1:] >= sig[:-1])
        assert torch.all(next_inference_sigmas(p, m, shift) <= sig)
        assert torch.all(next_inference_sigmas(p, m, shift)[: p.K] == 0)


@settings(max_examples=40, deadline=None)
@given(p=schemes, seed=st.integers(0, 2**31))
def test_training_levels_in_their_bands(p, seed):
    g = torch.Generator().manual_seed(seed)
    sig = training_sigmas(p, g, batch=4)
    assert sig.shape == (4, p.B)
    assert torch.all(sig[:, : p.K] == 0)
    for pos in range(p.N):  # pos from the clean end; band from the noisy end is i = N-1-pos
        i = p.N - 1 - pos
        chunk = sig[:, p.K + pos * p.c : p.K + (pos + 1) * p.c]
        assert torch.all(chunk == chunk[:, :1])
        u = 1 - chunk[:, 0].double()
        assert torch.all(u >= i / p.N - 1e-6) and torch.all(u < (i + 1) / p.N + 1e-6)


def test_chunk_size_mix():
    assert default_chunk_sizes(16) == (1, 2, 4, 8, 16)
    assert default_chunk_sizes(12) == (1, 2, 4, 12)
    g = torch.Generator().manual_seed(0)
    draws = [sample_chunk_size(16, (1, 2, 4, 8, 16), 0.3, g) for _ in range(4000)]
    share = draws.count(16) / len(draws)
    assert 0.27 < share < 0.33
    assert set(draws) == {1, 2, 4, 8, 16}
    assert all(sample_chunk_size(16, (2, 16), 1.0, g) == 16 for _ in range(20))
    with pytest.raises(ValueError, match="divisors of 16"):
        sample_chunk_size(16, (3,), 0.3, g)


def test_warm_start_steps():
    assert warm_start_steps(Partition(K=0, N=4, c=2, s=3)) == [9, 6, 3, 0]


@pytest.mark.parametrize(
    "frames,model_frames,lookahead",
    [(16, None, False), (16, 4, False), (10, 4, False), (16, 4, True), (10, 4, True), (16, 16, True)],
)
def test_frame_blocks_write_every_frame_once(frames, model_frames, lookahead):
    from streamdit_core.schedule import frame_blocks

    blocks = frame_blocks(frames, model_frames, lookahead)
    written = [f for _, _, w0, w1 in blocks for f in range(w0, w1)]
    assert written == list(range(frames))
    for i0, i1, w0, w1 in blocks:
        assert i0 <= w0 < w1 <= i1 and (model_frames is None or i1 - i0 <= model_frames)
        if lookahead and model_frames < frames and w0 > 0:
            assert w0 - i0 == model_frames // 2  # cleaner frames ahead of every written frame
    if model_frames and model_frames < frames:
        assert len(blocks) == -(-frames // (model_frames // 2 if lookahead else model_frames))


def test_frame_blocks_errors():
    from streamdit_core.schedule import frame_blocks

    with pytest.raises(ValueError, match="even model_frames"):
        frame_blocks(16, 3, lookahead=True)
    with pytest.raises(ValueError, match="model_frames must be >= 1"):
        frame_blocks(16, 0)
