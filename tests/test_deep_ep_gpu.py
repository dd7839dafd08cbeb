"""GPU: ncclep.deep_ep on ncclep's CUDA kernels (NCCL pools of 2 and 4 GPUs).

The shim against the ncclep Group ops it runs on, on the same inputs: LL dispatch bit-exact (rows,
counts, scales in DeepEP's layouts) and combine equal to the Group's with the same weights, with
and without hooks; no host synchronisation on the LL path (``torch.cuda.set_sync_debug_mode``);
LL and HT ``num_worst_tokens`` calls captured in CUDA graphs; ``async_finish`` events on the
communication stream; HT exact-size and worst-case dispatch and combine; a Buffer given a gloo
group with CUDA tensors (what vLLM passes); the LL byte plan against the C library's.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import gpu_pool

import ncclep
from ncclep import _native, deep_ep, fp8
from ncclep.bench.timing import capture_graph
from ncclep.deep_ep import budget
from ncclep.workloads import make_routing

pytestmark = pytest.mark.gpu

EXPERTS, T, HIDDEN, TOPK = 32, 64, 2048, 8
WORLDS = [pytest.param(2, id="2gpu"), pytest.param(4, id="4gpu")]


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _inputs(seed: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 131 + dist.get_rank())
    x = (torch.randn(tokens, HIDDEN, generator=g) * 3).to(torch.bfloat16)
    idx, w = make_routing(
        "random", tokens, EXPERTS, TOPK, world_size=dist.get_world_size(), generator=g, masked=5
    )
    return x.to(_device()), idx.to(_device()), w.to(_device())


def _ll_buffer(**kwargs: Any) -> deep_ep.Buffer:
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(T, HIDDEN, dist.get_world_size(), EXPERTS)
    return deep_ep.Buffer(
        dist.group.WORLD, 0, hint, low_latency_mode=True, explicitly_destroy=True, backend="cuda", **kwargs
    )


def _deepep_scales(out: ncclep.LLDispatchOutput, round_scale: bool, use_ue8m0: bool) -> torch.Tensor:
    assert out.scales is not None
    if use_ue8m0:
        return fp8.column_major(fp8.pack_ue8m0(out.scales))
    return fp8.column_major(fp8.scales_to_float(out.scales) if round_scale else out.scales)


def ll_matches_group() -> list[str]:
    buffer = _ll_buffer()
    group = ncclep.Group(EXPERTS, T, HIDDEN, mode="ll", max_topk=TOPK, backend="cuda")
    problems = []
    for i, (use_fp8, round_scale, use_ue8m0) in enumerate(
        [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    ):
        for hook in (False, True):
            x, idx, w = _inputs(i, [T, 0, 17, 1][(i + dist.get_rank()) % 4])
            recv, count, handle, _, receive = buffer.low_latency_dispatch(
                x,
                idx,
                T,
                EXPERTS,
                use_fp8=use_fp8,
                round_scale=round_scale,
                use_ue8m0=use_ue8m0,
                return_recv_hook=hook,
            )
            if hook:
                receive()
            ref = group.ll_dispatch(x, idx, w, use_fp8=use_fp8, ue8m0=round_scale)
            assert isinstance(ref, ncclep.LLDispatchOutput)
            if not torch.equal(count, ref.expert_counts):
                problems.append(
                    f"case {i} hook={hook}: counts {count.tolist()} != {ref.expert_counts.tolist()}"
                )
                continue
            rows = recv[0] if use_fp8 else recv
            want_scales = _deepep_scales(ref, round_scale, use_ue8m0) if use_fp8 else None
            for e, n in enumerate(ref.expert_counts.tolist()):
                if not torch.equal(rows[e, :n].view(torch.uint8), ref.x[e, :n].view(torch.uint8)):
                    problems.append(f"case {i} hook={hook}: expert {e} rows differ")
                if want_scales is not None and not torch.equal(recv[1][e, :n], want_scales[e, :n]):
                    problems.append(f"case {i} hook={hook}: expert {e} scales differ")
            y_rows = (torch.randn(ref.x.shape, device=_device()) * 2).to(torch.bfloat16)
            y, _, finish = buffer.low_latency_combine(y_rows, idx, w, handle, return_recv_hook=hook)
            if hook:
                finish()
            want = group.ll_combine(y_rows, ref.handle)
            assert isinstance(want, torch.Tensor)
            if not torch.allclose(y.float(), want.float(), rtol=2**-7, atol=1e-3):
                problems.append(
                    f"case {i} hook={hook}: combine differs by {(y.float() - want.float()).abs().max()}"
                )
    group.check()
    group.close()
    buffer.destroy()
    return problems


def ll_without_host_sync_and_in_graphs() -> list[str]:
    buffer = _ll_buffer()
    x, idx, w = _inputs(7, T - 3)
    problems = []

    def step(weights_at_dispatch: bool, hook: bool) -> torch.Tensor:
        recv, _, handle, _, receive = buffer.low_latency_dispatch(
            x,
            idx,
            T,
            EXPERTS,
            use_fp8=True,
            round_scale=True,
            use_ue8m0=True,
            return_recv_hook=hook,
            topk_weights=w if weights_at_dispatch else None,
        )
        if receive is not None:
            receive()
        q, s = recv
        values = fp8.dequantize(q, fp8.unpack_ue8m0(s.contiguous()))
        out = torch.empty_like(x)
        y, _, finish = buffer.low_latency_combine(
            values.to(torch.bfloat16), idx, w, handle, out=out, return_recv_hook=hook
        )
        if finish is not None:
            finish()
        return y

    eager = step(True, False).clone()  # also makes the group: host synchronisation allowed here
    step(False, False)  # and the weights of ones a dispatch without weights carries
    torch.cuda.synchronize()
    results = {}
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call below raises
    try:
        for weights_at_dispatch in (False, True):
            for hook in (False, True):
                results[(weights_at_dispatch, hook)] = step(weights_at_dispatch, hook)
    except RuntimeError as exc:
        problems.append(f"the LL path synchronised with the host: {exc}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for (weights_at_dispatch, hook), y in results.items():
        if not torch.equal(y, eager):
            problems.append(f"weights_at_dispatch={weights_at_dispatch} hook={hook}: result differs")
    graph, captured = capture_graph(lambda: step(True, True))
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    if not torch.equal(captured, eager):
        problems.append("graph replay differs from eager")
    buffer.destroy()
    return problems


def async_events() -> list[str]:
    buffer = _ll_buffer()
    x, idx, w = _inputs(3, T)
    problems = []
    compute = torch.cuda.current_stream()
    comm = buffer.get_comm_stream()
    if comm == compute:
        problems.append("the communication stream is the current stream")
    recv, _, handle, event, _ = buffer.low_latency_dispatch(
        x, idx, T, EXPERTS, use_fp8=False, async_finish=True
    )
    if not isinstance(event.event, deep_ep.EventHandle) or event.event.event is None:
        problems.append("async_finish gave no CUDA event")
    event.current_stream_wait()
    y, event, _ = buffer.low_latency_combine(recv, idx, w, handle, async_finish=True)
    with event:
        pass  # overlap window; leaving it waits for the event
    sync_recv, _, sync_handle, _, _ = buffer.low_latency_dispatch(x, idx, T, EXPERTS, use_fp8=False)
    sync_y, _, _ = buffer.low_latency_combine(sync_recv, idx, w, sync_handle)
    if not torch.equal(y, sync_y):
        problems.append("async combine differs from the synchronous one")
    # HT with previous_event and async_finish on the comm stream
    layout = buffer.get_dispatch_layout(idx, EXPERTS, previous_event=buffer.capture(), async_finish=True)
    layout[4].current_stream_wait()
    out = buffer.dispatch(
        x,
        num_tokens_per_rank=layout[0],
        is_token_in_rank=layout[3],
        num_tokens_per_expert=layout[2],
        topk_idx=idx,
        topk_weights=w,
        previous_event=buffer.capture(),
        async_finish=True,
        allocate_on_comm_stream=True,
    )
    out[5].current_stream_wait()
    combined, _, event = buffer.combine(out[0], out[4], async_finish=True)
    event.current_stream_wait()
    times = layout[3].sum(dim=1, keepdim=True).float()
    if not torch.allclose(combined.float(), x.float() * times, rtol=2**-7, atol=1e-2):
        problems.append("async HT round trip differs")
    buffer.destroy()
    return problems


def stream_order() -> list[str]:
    """Calls on one stream record no events; a call on another stream (a hook included) waits for
    the last launch, and from then on the Buffer records events; results match."""
    buffer = _ll_buffer()
    x, idx, w = _inputs(7, T)
    problems = []
    recv, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, T, EXPERTS, use_fp8=False)
    want, _, _ = buffer.low_latency_combine(recv, idx, w, handle)
    for _ in range(3):
        recv, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, T, EXPERTS, use_fp8=True)
        buffer.low_latency_combine(recv[0].to(torch.bfloat16), idx, w, handle)
    if buffer._streams.record:
        problems.append("launches on one stream recorded events")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000)  # the side stream is busy: the next launch must still follow it
        recv, _, handle, _, hook = buffer.low_latency_dispatch(
            x, idx, T, EXPERTS, use_fp8=False, return_recv_hook=True
        )
    hook()  # on the current stream
    y, _, hook = buffer.low_latency_combine(recv, idx, w, handle, return_recv_hook=True)
    with torch.cuda.stream(side):
        hook()
        side_y = y.clone()
    torch.cuda.current_stream().wait_stream(side)
    if not torch.equal(side_y, want):
        problems.append("calls across streams differ from calls on one")
    if not buffer._streams.record:
        problems.append("a second stream did not turn event recording on")
    layout = buffer.get_dispatch_layout(idx, EXPERTS)
    with torch.cuda.stream(side):
        side.wait_stream(torch.cuda.current_stream())
        out = buffer.dispatch(
            x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2]
        )
        combined, _, _ = buffer.combine(out[0], out[4])
    torch.cuda.current_stream().wait_stream(side)
    if not torch.allclose(
        combined.float(), x.float() * layout[3].sum(dim=1, keepdim=True), rtol=2**-7, atol=1e-2
    ):
        problems.append("HT round trip on a side stream differs")
    buffer.destroy()
    return problems


def ht_matches_group() -> list[str]:
    world = dist.get_world_size()
    buffer = deep_ep.Buffer(dist.group.WORLD, 1 << 30, 0, explicitly_destroy=True, backend="cuda")
    problems = []
    x, idx, w = _inputs(11, [200, 0, 77, 128][dist.get_rank() % 4])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, EXPERTS)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, recv_idx, recv_w, per_expert_list, handle, _ = buffer.dispatch(
        x, **layout, topk_idx=idx, topk_weights=w
    )
    group = buffer.groups[0]
    if group.backend != "cuda" or group.max_tokens_per_rank != 256:
        problems.append(f"HT group {group!r}")
    ref = ncclep.Group(EXPERTS, group.max_tokens_per_rank, HIDDEN, mode="ht", max_topk=8, backend="cuda")
    want = ref.ht_dispatch(x, idx, w)
    assert isinstance(want, ncclep.HTDispatchOutput)
    n = int(want.num_recv)
    if recv_x.shape[0] != n or not torch.equal(recv_x, want.x[:n]):
        problems.append(f"exact-size rows: {recv_x.shape[0]} vs {n}")
    if not torch.equal(recv_idx, want.topk_idx[:n].long()) or not torch.equal(recv_w, want.topk_weights[:n]):
        problems.append("received ids or weights differ")
    if per_expert_list != want.expert_counts.tolist():
        problems.append(f"per-expert list {per_expert_list} != {want.expert_counts.tolist()}")
    rows = (recv_x.float() * 2).to(torch.bfloat16)
    y, _, _ = buffer.combine(rows, handle)
    full = torch.zeros_like(want.x)
    full[:n] = rows
    ref_y, _ = ref.ht_combine(full, want.handle)
    if not torch.equal(y, ref_y):
        problems.append("combine differs from the Group's")

    worst = group.max_tokens_per_rank * world  # N rows: no copy at combine

    def worst_step() -> torch.Tensor:
        out = buffer.dispatch(x, **layout, topk_idx=idx, topk_weights=w, num_worst_tokens=worst)
        return buffer.combine((out[0].float() * 2).to(torch.bfloat16), out[4])[0]

    graph, captured = capture_graph(worst_step)
    graph.replay()
    torch.cuda.synchronize()
    if not torch.equal(captured, y):
        problems.append("num_worst_tokens round trip in a CUDA graph differs")
    ref.check()
    ref.close()
    buffer.destroy()
    return problems


def gloo_group_with_cuda_tensors() -> list[str]:
    gloo = dist.new_group(backend="gloo")
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(T, HIDDEN, dist.get_world_size(), EXPERTS)
    buffer = deep_ep.Buffer(gloo, 0, hint, low_latency_mode=True, explicitly_destroy=True)
    x, idx, w = _inputs(5, T)
    recv, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, T, EXPERTS, use_fp8=False)
    y, _, _ = buffer.low_latency_combine(recv, idx, w, handle)
    problems = []
    group = buffer.groups[0]
    if group.device.type != "cuda" or "nccl" not in str(dist.get_backend(group.process_group)):
        problems.append(f"the LL group runs on {group.device} over {dist.get_backend(group.process_group)}")
    weight = torch.where(idx >= 0, w, 0.0).sum(dim=1, keepdim=True)
    if not torch.allclose(y.float(), x.float() * weight, rtol=2**-6, atol=1e-2):
        problems.append("round trip over a gloo group's ranks differs")
    buffer.destroy()
    return problems


@pytest.mark.parametrize("world", WORLDS)
def test_ll_matches_the_group_ops(world: int) -> None:
    for problems in gpu_pool(world).run(ll_matches_group):
        assert problems == []


@pytest.mark.parametrize("world", WORLDS)
def test_ll_has_no_host_sync_and_captures(world: int) -> None:
    for problems in gpu_pool(world).run(ll_without_host_sync_and_in_graphs):
        assert problems == []


@pytest.mark.parametrize("world", WORLDS)
def test_async_finish_events(world: int) -> None:
    for problems in gpu_pool(world).run(async_events):
        assert problems == []


@pytest.mark.parametrize("world", WORLDS)
def test_streams_are_ordered_and_free_on_one(world: int) -> None:
    for problems in gpu_pool(world).run(stream_order):
        assert problems == []


@pytest.mark.parametrize("world", WORLDS)
def test_ht_matches_the_group_ops(world: int) -> None:
    for problems in gpu_pool(world).run(ht_matches_group):
        assert problems == []


@pytest.mark.parametrize("world", WORLDS)
def test_gloo_group_with_cuda_tensors(world: int) -> None:
    for problems in gpu_pool(world).run(gloo_group_with_cuda_tensors):
        assert problems == []


def test_ll_byte_plan_is_the_c_librarys() -> None:
    if not _native.available():
        pytest.skip("needs the ncclep CUDA extension")
    c = _native.module()
    for args in [(256, 128, 7168, 8, 4), (64, 32, 2048, 16, 8), (288, 256, 4096, 9, 8), (16, 1, 128, 1, 2)]:
        experts, tokens, hidden, topk, world = args
        assert budget._ll_plan_bytes(*args) == c.window_bytes(0, experts, tokens, hidden, topk, world), args
