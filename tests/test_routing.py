import pytest
import torch

from moe_tut.routing import SKEWS, RoutingPlan, RoutingStats, parse_skew, simulate_routing


def make_plan(T, E, k, skew="uniform", seed=0):
    ids, w = simulate_routing(T, E, k, skew, seed=seed)
    return ids, w, RoutingPlan.build(ids, w, E)


@pytest.mark.parametrize("skew", SKEWS)
def test_routing_shapes_and_weights(skew):
    ids, w = simulate_routing(100, 8, 2, skew, seed=3)
    assert ids.shape == w.shape == (100, 2)
    assert ids.min() >= 0 and ids.max() < 8
    assert torch.allclose(w.sum(1), torch.ones(100))  # softmax over the top-k
    assert (ids[:, 0] != ids[:, 1]).all()  # k distinct experts per token


def test_routing_is_reproducible_and_seed_dependent():
    a = simulate_routing(64, 8, 2, "zipf", seed=1)
    b = simulate_routing(64, 8, 2, "zipf", seed=1)
    c = simulate_routing(64, 8, 2, "zipf", seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_skew_orders_imbalance():
    # More skew, more imbalance: uniform < zipf < hot, and all_to_one sends every token to expert 0.
    stats = {s: RoutingStats.from_ids(simulate_routing(4096, 16, 2, s, seed=0)[0], 16) for s in SKEWS}
    assert stats["uniform"].imbalance < 1.2
    assert stats["uniform"].imbalance < stats["zipf"].imbalance < stats["hot"].imbalance
    assert stats["all_to_one"].tokens_per_expert[0] == 4096
    ids, _ = simulate_routing(50, 8, 1, "all_to_one")
    assert (ids == 0).all()  # top-1: literally all tokens to one expert


def test_zipf_exponent():
    flat = RoutingStats.from_ids(simulate_routing(4096, 16, 2, "zipf:0", seed=0)[0], 16)
    steep = RoutingStats.from_ids(simulate_routing(4096, 16, 2, "zipf:2", seed=0)[0], 16)
    assert flat.imbalance < 1.2 < steep.imbalance


@pytest.mark.parametrize("bad", ["zipff", "hot:2", "zipf:-1", ""])
def test_bad_skew(bad):
    with pytest.raises(ValueError, match="skew|zipf"):
        parse_skew(bad)


def test_stats_by_hand():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1]])
    s = RoutingStats.from_ids(ids, 4)
    assert s.tokens_per_expert == [3, 2, 1, 0]
    assert (s.rows, s.max_load, s.active_experts, s.empty_experts) == (6, 3, 3, 1)
    assert s.mean_load == 1.5 and s.imbalance == 2.0
    assert (s.padded_rows, s.wasted_rows) == (12, 6) and s.wasted_fraction == 0.5


@pytest.mark.parametrize("T,E,k,skew", [
    (1, 4, 2, "uniform"),       # a single token
    (37, 7, 3, "zipf"),         # prime E, odd T
    (64, 8, 8, "uniform"),      # top-k = E: every expert gets every token
    (50, 16, 1, "all_to_one"),  # 15 empty experts
    (200, 8, 2, "hot"),
])
def test_plan_invariants(T, E, k, skew):
    ids, w, plan = make_plan(T, E, k, skew)
    N = T * k
    assert plan.expert_offsets[0] == 0 and plan.expert_offsets[-1] == N
    assert torch.equal(plan.expert_offsets[1:] - plan.expert_offsets[:-1], plan.expert_counts)
    assert torch.equal(plan.expert_counts.long(), torch.bincount(ids.flatten(), minlength=E))
    # sorted_slots is a permutation; slot_to_sorted is its inverse
    assert torch.equal(torch.sort(plan.sorted_slots.long()).values, torch.arange(N))
    assert torch.equal(plan.sorted_slots[plan.slot_to_sorted.long()].long(), torch.arange(N))
    # rows of expert e really belong to e, and tokens keep their order within an expert (stable sort)
    flat = ids.flatten()
    for e in range(E):
        lo, hi = plan.expert_offsets[e].item(), plan.expert_offsets[e + 1].item()
        slots = plan.sorted_slots[lo:hi].long()
        assert (flat[slots] == e).all()
        assert torch.equal(slots, torch.sort(slots).values)
    assert torch.equal(plan.sorted_token_ids.long(), plan.sorted_slots.long() // k)
    assert torch.equal(plan.sorted_weights, w.flatten()[plan.sorted_slots.long()])
    assert all(t.dtype == torch.int32 for t in (plan.sorted_slots, plan.slot_to_sorted, plan.expert_offsets))


@pytest.mark.parametrize("block_m", [1, 4, 16, 64])
def test_block_map_covers_every_row_once(block_m):
    ids, w, plan = make_plan(53, 6, 2, "zipf")
    bm = plan.block_map(block_m)
    n = int(bm.num_blocks)
    assert n <= bm.max_blocks
    assert (bm.block_expert[n:] == -1).all() and (bm.block_expert[:n] >= 0).all()
    covered = torch.zeros(plan.num_rows, dtype=torch.int64)
    for b in range(n):
        e, start = bm.block_expert[b].item(), bm.block_row_start[b].item()
        end = min(start + block_m, plan.expert_offsets[e + 1].item())
        assert plan.expert_offsets[e] <= start < end  # never an empty block, never crossing experts
        covered[start:end] += 1
    assert (covered == 1).all()


def test_block_map_with_empty_experts():
    ids = torch.tensor([[2], [2], [2]])
    plan = RoutingPlan.build(ids, torch.ones(3, 1), 5)
    bm = plan.block_map(2)
    assert int(bm.num_blocks) == 2
    assert bm.block_expert[:2].tolist() == [2, 2] and bm.block_row_start[:2].tolist() == [0, 2]


@pytest.mark.parametrize("ids,w,E,err,msg", [
    (torch.tensor([[0, 9]]), torch.ones(1, 2), 4, ValueError, r"in \[0, 4\)"),
    (torch.tensor([[0, -1]]), torch.ones(1, 2), 4, ValueError, r"in \[0, 4\)"),
    (torch.tensor([0, 1]), torch.ones(2), 4, ValueError, r"\[T, k\]"),
    (torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), 4, TypeError, "integer"),
    (torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.int64), 4, TypeError, "floating"),
])
def test_plan_bad_inputs(ids, w, E, err, msg):
    with pytest.raises(err, match=msg):
        RoutingPlan.build(ids, w, E)


def test_simulate_bad_inputs():
    with pytest.raises(ValueError, match="top_k=5 is larger"):
        simulate_routing(4, 4, 5)
    with pytest.raises(ValueError, match="num_tokens"):
        simulate_routing(0, 4, 1)


def test_deferred_plan_builds_on_first_read():
    ids, w = simulate_routing(9, 6, 2, "zipf", seed=3)
    eager = RoutingPlan.build(ids, w, 6)
    plan = RoutingPlan.build(ids, w, 6, defer=True)
    assert eager.is_built and not plan.is_built
    assert plan.num_rows == 18 and plan.topk_ids is ids  # what needs no sorting does not sort
    assert not plan.is_built
    assert torch.equal(plan.expert_offsets, eager.expert_offsets)  # the first read builds all of them
    assert plan.is_built
    for name in ("sorted_slots", "sorted_token_ids", "sorted_weights", "slot_to_sorted", "expert_counts"):
        assert torch.equal(getattr(plan, name), getattr(eager, name)), name
    assert plan.sorted_slots is plan.sorted_slots  # built once
    assert plan.stats().as_dict() == eager.stats().as_dict()


def test_deferred_plan_still_checks_its_inputs_at_build():
    ids, w = simulate_routing(4, 6, 2, seed=0)
    with pytest.raises(ValueError, match="must be in"):
        RoutingPlan.build(ids + 6, w, 6, defer=True)
    with pytest.raises(ValueError, match="method must be one of"):
        RoutingPlan.build(ids, w, 6, method="fast", defer=True)
