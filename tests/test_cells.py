"""The BConv-Cells alone and the state contract at cell level (docs/design.md §1, §2, §4): the equations, the
state carried between batches (reset, eval, batch slots, pooled and synced state), autograd, dtypes and devices,
size changes, copies, construction, torch.compile. The ladder and the wrapped model are other files
(tests/test_ladder.py, tests/test_wrapper.py).

Each test names the invariant it pins. Shapes, strides, batch-size sequences and
dtypes are drawn by hypothesis; tensors stay small so the file runs in seconds.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bconv.cells import BConvCell, BConvCellV2, StatefulCell
from conftest import free_port, single_thread

CELLS = [BConvCell, BConvCellV2]
MODES = ["per_sample", "pooled"]
FLOAT_DTYPES = [torch.float32, torch.float64]

# database=None: leave no .hypothesis folder in the checkout; failures print their example.
fast = settings(max_examples=25, deadline=None, database=None)

channels = st.integers(1, 6)
sizes = st.integers(1, 12)
strides = st.integers(1, 3)
batches = st.integers(1, 4)
seeds = st.integers(0, 2**16)
dtypes = st.sampled_from(FLOAT_DTYPES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are tiny: intra-op threads only add synchronisation, which on a
    # busy two-core machine costs several times the work itself.
    with single_thread():
        yield


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}


def _make(cls, c_in=3, c_out=4, stride=1, dtype=torch.float32, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(c_in, c_out, stride, **kwargs).to(dtype)


def _x(batch, c_in=3, h=6, w=6, dtype=torch.float32, requires_grad=False):
    return torch.randn(batch, c_in, h, w, dtype=dtype, requires_grad=requires_grad)


def _states(cell: StatefulCell) -> dict[str, torch.Tensor | None]:
    return {name: getattr(cell, name) for name in cell._state_names}


# -- reference equations, computed from the cells' weights with torch.nn.functional ---


def _ref_v1(cell, x, c_prev):
    gates = F.conv2d(x, cell.conv.weight, stride=cell.stride, padding=1)
    i, f, o, g = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _ref_v2(cell, x, c_prev, y_prev):
    s, (h, w) = cell.stride, x.shape[-2:]
    ho, wo = y_prev.shape[-2:]
    # ConvTranspose(k=3, p=1) gives (n - 1) * s - 1 + output_padding + 1 ... rows
    pad = (h - (ho - 1) * s - 1, w - (wo - 1) * s - 1)
    r = F.conv_transpose2d(y_prev, cell.recover.weight, stride=s, padding=1, output_padding=pad)
    assert r.shape == x.shape
    gates = F.conv2d(torch.cat([x, r], dim=1), cell.conv.weight, stride=s, padding=1)
    i, f, o, g = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _out_shape(cell, x):
    b, _, h, w = x.shape
    return (b, cell.out_channels, (h - 1) // cell.stride + 1, (w - 1) // cell.stride + 1)


# -- the equations ----------------------------------------------------------------------


@fast
@given(c_in=channels, c_out=channels, stride=strides, h=sizes, w=sizes, batch=batches,
       dtype=dtypes, seed=seeds)
def test_v1_output_follows_equations_over_batches(c_in, c_out, stride, h, w, batch, dtype, seed):
    cell = _make(BConvCell, c_in, c_out, stride, dtype, seed)
    x0 = _x(batch, c_in, h, w, dtype)
    c_prev = torch.zeros(_out_shape(cell, x0), dtype=dtype)
    with torch.no_grad():
        for _ in range(3):
            x = _x(batch, c_in, h, w, dtype)
            y_ref, c_prev = _ref_v1(cell, x, c_prev)
            torch.testing.assert_close(cell(x), y_ref, **_tol(dtype))
            torch.testing.assert_close(cell.c_prev, c_prev, **_tol(dtype))


@fast
@given(c_in=channels, c_out=channels, stride=strides, h=sizes, w=sizes, batch=batches,
       dtype=dtypes, seed=seeds)
def test_v2_output_follows_equations_over_batches(c_in, c_out, stride, h, w, batch, dtype, seed):
    cell = _make(BConvCellV2, c_in, c_out, stride, dtype, seed)
    shape = _out_shape(cell, _x(batch, c_in, h, w))
    c_prev = torch.zeros(shape, dtype=dtype)
    y_prev = torch.zeros(shape, dtype=dtype)
    with torch.no_grad():
        for _ in range(3):
            x = _x(batch, c_in, h, w, dtype)
            y_prev, c_prev = _ref_v2(cell, x, c_prev, y_prev)
            torch.testing.assert_close(cell(x), y_prev, **_tol(dtype))
            torch.testing.assert_close(cell.c_prev, c_prev, **_tol(dtype))
            torch.testing.assert_close(cell.y_prev, y_prev, **_tol(dtype))


def test_v1_state_dict_holds_conv_weight_only_and_gate_conv_has_paper_layout():
    cell = BConvCell(5, 7, stride=2)
    assert list(cell.state_dict()) == ["conv.weight"]
    assert cell.conv.weight.shape == (28, 5, 3, 3)
    assert (cell.conv.stride, cell.conv.padding, cell.conv.bias) == ((2, 2), (1, 1), None)


def test_v2_state_dict_holds_conv_and_recover_weights_only():
    cell = BConvCellV2(5, 7, stride=2)
    assert sorted(cell.state_dict()) == ["conv.weight", "recover.weight"]
    assert cell.conv.weight.shape == (28, 10, 3, 3)
    assert cell.recover.weight.shape == (7, 5, 3, 3)  # ConvTranspose: [in=out_ch, out=in_ch]
    assert cell.conv.bias is None and cell.recover.bias is None


@fast
@given(h=sizes, w=sizes, stride=st.integers(1, 4), seed=seeds)
def test_v2_recover_produces_input_spatial_size_exactly(h, w, stride, seed):
    cell = _make(BConvCellV2, 2, 3, stride, seed=seed)
    recovered = []
    cell.recover.register_forward_hook(lambda m, args, out: recovered.append(out.shape))
    for _ in range(2):
        x = _x(2, 2, h, w)
        y = cell(x)
        assert y.shape == _out_shape(cell, x)
    assert all(shape == x.shape for shape in recovered)


# -- reset, eval, batch slots -------------------------------------------------------------


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("mode", MODES)
def test_reset_restores_first_batch_output(cls, mode):
    cell = _make(cls, state_mode=mode)
    x = _x(3)
    first = cell(x)
    cell(_x(3))
    assert not torch.allclose(cell(x), first)
    cell.reset_state()
    assert all(v is None for v in _states(cell).values())
    torch.testing.assert_close(cell(x), first)


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("mode", MODES)
@fast
@given(batch=batches, seed=seeds)
def test_eval_output_independent_of_history_and_batch_companions(cls, mode, batch, seed):
    cell = _make(cls, seed=seed, state_mode=mode)
    alone = copy.deepcopy(cell).eval()
    for _ in range(2):
        cell(_x(batch + 1))
    cell.eval()
    x = _x(batch)
    y = cell(x)
    for k in range(batch):
        torch.testing.assert_close(y[k : k + 1], alone(x[k : k + 1]))


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("mode", MODES)
def test_eval_forward_between_training_batches_changes_nothing(cls, mode):
    with_eval = _make(cls, state_mode=mode)
    without = copy.deepcopy(with_eval)
    x1, x2, x_eval = _x(3), _x(3), _x(5, h=8)
    with_eval(x1)
    without(x1)
    before = {k: v.clone() for k, v in _states(with_eval).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new size in eval is no size change of the state
        with_eval.eval()(x_eval)
    for name, value in _states(with_eval).items():
        assert torch.equal(value, before[name])
    torch.testing.assert_close(with_eval.train()(x2), without(x2))


@pytest.mark.parametrize("cls", CELLS)
def test_unused_slots_persist_across_smaller_batch(cls):
    cell = _make(cls)
    cell(_x(4))
    before = {k: v.clone() for k, v in _states(cell).items()}
    cell(_x(2))
    for name, value in _states(cell).items():
        assert value.shape[0] == 4
        assert torch.equal(value[2:], before[name][2:])
        assert not torch.allclose(value[:2], before[name][:2])


@pytest.mark.parametrize("cls", CELLS)
def test_larger_batch_starts_new_slots_from_zero(cls):
    cell = _make(cls)
    fresh = copy.deepcopy(cell)
    continuing = copy.deepcopy(cell)
    x1, x2 = _x(2), _x(4)
    cell(x1)
    continuing(x1)
    y = cell(x2)
    # slots 2 and 3 had no history: the same as a fresh cell on those samples
    torch.testing.assert_close(y[2:], fresh(x2[2:]))
    # slots 0 and 1 continue from their state
    torch.testing.assert_close(y[:2], continuing(x2[:2]))
    for name, value in _states(cell).items():
        assert value.shape[0] == 4
        torch.testing.assert_close(value[2:], getattr(fresh, name))
        torch.testing.assert_close(value[:2], getattr(continuing, name))


@pytest.mark.parametrize("cls", CELLS)
@fast
@given(sizes_seq=st.lists(st.integers(1, 5), min_size=1, max_size=6), seed=seeds)
def test_any_batch_size_sequence_matches_per_slot_reference(cls, sizes_seq, seed):
    cell = _make(cls, dtype=torch.float64, seed=seed)
    # the reference: one batch-1 cell per slot, fed only that slot's samples
    slots = [copy.deepcopy(cell) for _ in range(max(sizes_seq))]
    with torch.no_grad():
        for batch in sizes_seq:
            x = _x(batch, dtype=torch.float64)
            y = cell(x)
            for k in range(batch):
                torch.testing.assert_close(y[k : k + 1], slots[k](x[k : k + 1]))
    for name, value in _states(cell).items():
        assert value.shape[0] == max(sizes_seq)  # every slot below the largest batch was used
        for k, ref in enumerate(slots):
            torch.testing.assert_close(value[k : k + 1], getattr(ref, name))


# -- pooled mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CELLS)
@fast
@given(first=batches, n1=batches, n2=batches, seed=seeds)
def test_pooled_state_is_batch_mean_and_next_output_independent_of_batch_size(
    cls, first, n1, n2, seed
):
    cell = _make(cls, dtype=torch.float64, seed=seed, state_mode="pooled")
    per_sample = copy.deepcopy(cell)
    per_sample.state_mode = "per_sample"
    x = _x(first, dtype=torch.float64)
    cell(x)
    per_sample(x)
    for name, value in _states(cell).items():
        assert value.shape == (1, *getattr(per_sample, name).shape[1:])
        torch.testing.assert_close(value, getattr(per_sample, name).mean(0, keepdim=True))
    sample = _x(1, dtype=torch.float64)
    a, b = copy.deepcopy(cell), copy.deepcopy(cell)
    y_a = a(torch.cat([sample, _x(n1 - 1, dtype=torch.float64)]))
    y_b = b(torch.cat([_x(n2 - 1, dtype=torch.float64), sample]))
    torch.testing.assert_close(y_a[:1], y_b[-1:])


def test_sync_state_averages_over_all_samples_of_all_ranks(tmp_path):
    """One process group of size 1 still runs the all_reduce path: the result is the plain batch mean."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        synced = BConvCell(3, 4, state_mode="pooled", sync_state=True).train()
        local = copy.deepcopy(synced)
        local.sync_state = False
        x = torch.randn(5, 3, 6, 6)
        synced(x)
        local(x)
        torch.testing.assert_close(synced.c_prev, local.c_prev)
    finally:
        dist.destroy_process_group()


# -- what the state is not ------------------------------------------------------------------


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("mode", MODES)
def test_state_never_enters_state_dict_buffers_or_parameters(cls, mode):
    cell = _make(cls, state_mode=mode)
    cell(_x(2))
    states = [v for v in _states(cell).values()]
    assert all(isinstance(v, torch.Tensor) for v in states)
    assert set(cell.state_dict()) == {n for n, _ in cell.named_parameters()}
    assert list(cell.named_buffers()) == []
    ids = {id(p) for p in cell.parameters()}
    assert not any(id(v) in ids for v in states)
    assert not any(isinstance(v, nn.Parameter) for v in states)
    cell.load_state_dict(_make(cls, seed=1).state_dict())  # strict, and keeps the state
    assert all(v is not None for v in _states(cell).values())


@pytest.mark.parametrize("cls", CELLS)
def test_model_level_walk_over_modules_resets_and_detaches_every_cell(cls):
    model = nn.Sequential(cls(3, 4, detach=False), nn.ReLU(), cls(4, 2, stride=2, detach=False))
    model(_x(2, requires_grad=True))
    cells = [m for m in model.modules() if isinstance(m, StatefulCell)]
    assert len(cells) == 2
    for m in cells:
        m.detach_state()
    assert all(v.grad_fn is None for m in cells for v in _states(m).values())
    for m in cells:
        m.reset_state()
    assert all(v is None for m in cells for v in _states(m).values())


# -- autograd ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CELLS)
def test_default_backward_never_reaches_earlier_batch_and_matches_manual_detach(cls):
    cell = _make(cls, dtype=torch.float64)
    x1, x2 = _x(2, dtype=torch.float64), _x(2, dtype=torch.float64)
    cell(x1).sum().backward()
    cell.zero_grad()
    cell(x2).sum().backward()  # would fail if batch 1's (freed) graph were reached
    got = {n: p.grad.clone() for n, p in cell.named_parameters()}

    ref = copy.deepcopy(cell)
    ref.zero_grad()
    ref.reset_state()
    zeros = torch.zeros(_out_shape(ref, x1), dtype=torch.float64)
    if cls is BConvCell:
        _, c1 = _ref_v1(ref, x1, zeros)
        y2, _ = _ref_v1(ref, x2, c1.detach())
    else:
        y1, c1 = _ref_v2(ref, x1, zeros, zeros)
        y2, _ = _ref_v2(ref, x2, c1.detach(), y1.detach())
    y2.sum().backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(got[n], p.grad)


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("mode", MODES)
def test_without_detach_gradients_flow_into_earlier_batch_until_detach_state(cls, mode):
    cell = _make(cls, detach=False, state_mode=mode)
    x1, x2, x3 = (_x(2, requires_grad=True) for _ in range(3))
    cell(x1)
    y2 = cell(x2)
    (g1,) = torch.autograd.grad(y2.sum(), [x1])
    assert g1.abs().sum() > 0
    cell.detach_state()
    y3 = cell(x3)
    g = torch.autograd.grad(y3.sum(), [x1, x2, x3], allow_unused=True)
    assert g[0] is None and g[1] is None and g[2].abs().sum() > 0


# -- dtype and device -------------------------------------------------------------------------


MOVES = {
    "double": (lambda m: m.double(), torch.float64),
    "half": (lambda m: m.half(), torch.float16),
    "to_float64": (lambda m: m.to(torch.float64), torch.float64),
    "to_cpu": (lambda m: m.to("cpu"), torch.float32),
    "double_then_float": (lambda m: m.double().float(), torch.float32),
}


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("move", sorted(MOVES))
def test_state_follows_module_dtype_and_device_moves(cls, move):
    fn, dtype = MOVES[move]
    cell = _make(cls)
    cell(_x(2))
    before = {k: v.clone() for k, v in _states(cell).items()}
    assert fn(cell) is cell
    for name, value in _states(cell).items():
        assert value.dtype == dtype and value.device.type == "cpu"
        torch.testing.assert_close(value, before[name].to(dtype), atol=1e-3, rtol=1e-3)


def _cpu_half_conv_supported() -> bool:
    try:
        BConvCellV2(1, 1, 2).half()(torch.zeros(1, 1, 3, 3, dtype=torch.float16))
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _cpu_half_conv_supported(), reason="no half convolution on this CPU build")
@pytest.mark.parametrize("cls", CELLS)
def test_half_forward_keeps_state_in_half(cls):
    cell = _make(cls).half()
    for _ in range(2):
        y = cell(_x(2, dtype=torch.float16))
    assert y.dtype == torch.float16
    assert all(v.dtype == torch.float16 for v in _states(cell).values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", CELLS)
def test_state_follows_cuda_and_back(cls):
    cell = _make(cls)
    cell(_x(2))
    cell.cuda()
    assert all(v.is_cuda for v in _states(cell).values())
    cell(_x(3).cuda())
    cell.cpu()
    assert all(v.device.type == "cpu" for v in _states(cell).values())


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_stores_state_in_compute_dtype_and_mixing_never_crashes(cls, mode):
    cell = _make(cls, state_mode=mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cell(_x(3))
    assert y.dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for v in _states(cell).values())
    y = cell(_x(2))  # full precision after a bf16 state: the state is cast up
    assert y.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in _states(cell).values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cell(_x(4))  # and down again
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in cell.parameters())


# -- size and channel changes -----------------------------------------------------------------


@pytest.mark.parametrize("cls", CELLS)
def test_spatial_size_change_warns_naming_sizes_and_resets(cls):
    cell = _make(cls)
    fresh = copy.deepcopy(cell)
    cell(_x(2, h=8, w=8))
    x = _x(2, h=10, w=6)
    with pytest.warns(UserWarning, match=r"8x8 to 10x6.*reset_state\(\).*on_size_change='raise'"):
        y = cell(x)
    torch.testing.assert_close(y, fresh(x))
    for name, value in _states(cell).items():
        torch.testing.assert_close(value, getattr(fresh, name))


@pytest.mark.parametrize("cls", CELLS)
def test_spatial_size_change_raises_with_raise_policy_and_keeps_state(cls):
    cell = _make(cls, stride=2, on_size_change="raise")
    cell(_x(2, h=8, w=8))
    before = {k: v.clone() for k, v in _states(cell).items()}
    with pytest.raises(ValueError, match=r"4x4 to 6x6.*reset_state\(\)"):
        cell(_x(2, h=12, w=12))
    for name, value in _states(cell).items():
        assert torch.equal(value, before[name])
    cell.reset_state()
    cell(_x(2, h=12, w=12))  # the documented way to change resolution
    assert all(v.shape[-2:] == (6, 6) for v in _states(cell).values())


@pytest.mark.parametrize("cls", CELLS)
def test_input_size_with_same_state_size_is_no_size_change_and_the_state_is_carried(cls):
    cell = _make(cls, stride=2, dtype=torch.float64, on_size_change="raise")
    fresh = copy.deepcopy(cell)
    x1, x2 = _x(2, h=7, w=7, dtype=torch.float64), _x(2, h=8, w=8, dtype=torch.float64)
    with torch.no_grad():
        y1 = cell(x1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no size change: neither a warning nor a reset
            y2 = cell(x2)  # both give a 4x4 state
        zeros = torch.zeros(_out_shape(cell, x1), dtype=torch.float64)
        if cls is BConvCell:
            y1_ref, c1 = _ref_v1(cell, x1, zeros)
            y2_ref, c2 = _ref_v1(cell, x2, c1)
        else:
            y1_ref, c1 = _ref_v2(cell, x1, zeros, zeros)
            y2_ref, c2 = _ref_v2(cell, x2, c1, y1_ref)  # the 4x4 y_prev recovered to the 8x8 input
        alone = fresh(x2)
    torch.testing.assert_close(y1, y1_ref, **_tol(torch.float64))
    torch.testing.assert_close(y2, y2_ref, **_tol(torch.float64))
    torch.testing.assert_close(cell.c_prev, c2, **_tol(torch.float64))  # the equations, from the 7x7 batch's state
    if cls is BConvCellV2:
        torch.testing.assert_close(cell.y_prev, y2_ref, **_tol(torch.float64))
    assert not torch.allclose(y2, alone), "the 8x8 batch read the state the 7x7 batch left"


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("shape", [(2, 5, 6, 6), (2, 1, 6, 6), (3, 6, 6), (1, 2, 3, 6, 6)])
def test_wrong_input_channels_or_rank_raise_clear_value_error(cls, shape):
    cell = _make(cls, c_in=3)
    with pytest.raises(ValueError, match=r"in_channels=3.*got \("):
        cell(torch.randn(shape))
    with pytest.raises(ValueError, match=r"in_channels=3"):
        cell.eval()(torch.randn(shape))


# -- copying and saving ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("detach", [True, False])
def test_deepcopy_and_torch_save_load_keep_state_and_continue_identically(cls, detach):
    cell = _make(cls, detach=detach)
    cell(_x(3, requires_grad=True))
    buffer = io.BytesIO()
    torch.save(cell, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(cell)
    x = _x(3)
    with torch.no_grad():
        expected = cell(x)
        for other in (copied, loaded):
            assert other._state_names == cell._state_names
            torch.testing.assert_close(other(x), expected)
            for name, value in _states(other).items():
                torch.testing.assert_close(value, getattr(cell, name))


# -- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0, 4), {}, "in_channels"),
        ((3, -1), {}, "out_channels"),
        ((3, 4, 0), {}, "stride"),
        ((3.0, 4), {}, "in_channels"),
        ((3, 4, True), {}, "stride"),
        ((3, 4), {"state_mode": "shared"}, "state_mode"),
        ((3, 4), {"on_size_change": "ignore"}, "on_size_change"),
        ((3, 4), {"detach": 1}, "detach"),
    ],
)
def test_constructor_rejects_invalid_arguments_with_value_error(cls, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(*args, **kwargs)


@pytest.mark.parametrize("cls", CELLS)
def test_extra_repr_shows_channels_stride_and_state_mode(cls):
    text = repr(cls(3, 4, 2, state_mode="pooled"))
    assert "in_channels=3, out_channels=4, stride=2, state_mode='pooled'" in text


@pytest.mark.slow  # compiling takes tens of seconds on CPU
@pytest.mark.parametrize("cls", CELLS)
def test_compiled_cell_matches_eager_over_batch_size_sequence(cls):
    cell = _make(cls)
    eager = copy.deepcopy(cell)
    compiled = torch.compile(cell)
    for batch in (3, 3, 5, 2):
        x = _x(batch)
        torch.testing.assert_close(compiled(x), eager(x))
