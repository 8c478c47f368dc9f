"""The planner's plans, read without starting a process: what each operation will do, in order, and
what undoes it when any of its steps fails."""

import pytest

from sleepd.daemon import planner
from sleepd.daemon.errors import Code, SleepdError
from sleepd.daemon.plans import (CancelOffload, CancelRestore, Drop, FinishRestore, KeepAwake, MakeRoom, Materialize,
                                 Offload, Overlapped, Pause, Quiesce, Release, Remap, Resume, ResumeIfAwake, TagsAwake,
                                 Unclaim, Unmap, WakeAgain)
from sleepd.daemon.regions import RegionState
from sleepd.daemon.rules import Action, SleepRules
from sleepd.daemon.views import ModelView, Policy, RankView, RegionView

MiB = 1 << 20
MAPPED, OFFLOADED, DISCARDED = RegionState.MAPPED, RegionState.OFFLOADED, RegionState.DISCARDED
RULES = SleepRules()
ROOMY = planner.PoolRoom(available=1 << 40, budget=1 << 40)


def region(id, tag, state=MAPPED, size=8 * MiB, device=0, persist=False, backed_up=None, holds=None):
    backed_up = state is OFFLOADED if backed_up is None else backed_up
    holds = state is MAPPED if holds is None else holds
    return RegionView(id, tag, size, size, device, state, persist, backed_up, holds)


def model(name="qwen", ranks=None, paused=False, owner=0, policy=None, idle=0.0, needs_controller=False,
          controller_pid=0):
    ranks = ranks if ranks is not None else [rank(0, region(1, "weights"), region(2, "kv_cache"))]
    regions = [r for k in ranks for r in k.regions]
    sleeping = paused or any(r.state is not MAPPED for r in regions)
    return ModelView(name, owner, sleeping, ranks, policy or Policy(), idle, needs_controller, controller_pid, paused)


def rank(number, *regions, device=0, orphaned=False, returning=False):
    return RankView(number, device, 1000 + number, list(regions), orphaned, returning)


def actions(plan):
    return [step.do for step in plan.steps]


def failing_at_each_step(plan):
    """{failed action: the compensations run, in order}."""
    return {type(step.do).__name__: plan.compensations(index) for index, step in enumerate(plan.steps)}


# ---- sleep ----

def test_a_level_1_sleep_quiesces_offloads_the_weights_unmaps_both_and_releases():
    qwen = model(ranks=[rank(0, region(1, "weights"), region(2, "kv_cache")),
                        rank(1, region(3, "weights", device=1), region(4, "kv_cache", device=1), device=1)])
    plan = planner.sleep(qwen, 1, planner.sleep_work(qwen, 1, [], {}, RULES, ROOMY))
    after = ((1, OFFLOADED), (2, DISCARDED), (3, OFFLOADED), (4, DISCARDED))
    assert actions(plan) == [Quiesce("qwen", 1), Offload("qwen", (1, 3)), Unmap("qwen", after, (0, 1)),
                             Release("qwen", (1, 2, 3, 4))]
    assert plan.counts == {"qwen": {"bytes_offloaded": 16 * MiB, "bytes_discarded": 16 * MiB, "region_count": 4}}
    assert [(r.kind, r.bytes) for r in plan.reserve] == [("host_pool", 16 * MiB)]


def test_each_failure_point_of_a_sleep_puts_the_model_back_as_it_was():
    qwen = model()
    plan = planner.sleep(qwen, 1, planner.sleep_work(qwen, 1, [], {}, RULES, ROOMY))
    resume, cancel, remap = Resume("qwen", (1, 2)), CancelOffload("qwen", (1,)), Remap("qwen", (1, 2), (0,))
    assert failing_at_each_step(plan) == {
        "Quiesce": [resume],
        "Offload": [cancel, resume],
        "Unmap": [remap, cancel, resume],  # the unmap may have happened in part: every rank asked maps again
        "Release": [],  # once the daemon lets go of the memory, the sleep has happened
    }


def test_a_paused_model_is_not_quiesced_again_and_an_asleep_one_is_left_alone():
    half = model(ranks=[rank(0, region(1, "weights"), region(2, "kv_cache", DISCARDED))], paused=True)
    plan = planner.sleep(half, 1, planner.sleep_work(half, 1, [], {}, RULES, ROOMY))
    assert actions(plan) == [Offload("qwen", (1,)), Unmap("qwen", ((1, OFFLOADED),), (0,)), Release("qwen", (1,))]
    asleep = model(ranks=[rank(0, region(1, "weights", OFFLOADED), region(2, "kv_cache", DISCARDED))], paused=True)
    assert planner.sleep(asleep, 1, planner.sleep_work(asleep, 1, [], {}, RULES, ROOMY)) is None


def test_level_0_only_quiesces_and_an_orphaned_rank_is_not_asked():
    qwen = model()
    assert actions(planner.sleep(qwen, 0, planner.sleep_work(qwen, 0, [], {}, RULES, ROOMY))) == [Quiesce("qwen", 0)]
    two = model(ranks=[rank(0, region(1, "weights")), rank(1, region(2, "weights", persist=True), orphaned=True)])
    plan = planner.sleep(two, 2, planner.sleep_work(two, 2, [], {}, RULES, ROOMY))
    assert Unmap("qwen", ((1, DISCARDED), (2, DISCARDED)), (0,)) in actions(plan)


def test_a_short_pool_discards_what_some_rule_discards_largest_first_or_refuses():
    qwen = model(ranks=[rank(0, region(1, "weights", size=8 * MiB), region(2, "kv_cache", size=4 * MiB))])
    short = planner.PoolRoom(available=9 * MiB, budget=64 * MiB)
    explicit = {"kv_cache": Action.OFFLOAD}
    work = planner.sleep_work(qwen, 1, ["weights"], explicit, RULES, short, discard_if_short=True)
    # kv_cache was asked to be offloaded: weights goes instead, as level 2's rule discards weights
    assert [(r.id, a) for r, a in work] == [(1, Action.DISCARD), (2, Action.OFFLOAD)]
    two_caches = model(ranks=[rank(0, region(1, "kv_cache", size=8 * MiB), region(2, "cache", size=2 * MiB))])
    rules = SleepRules({1: {"kv_cache": Action.OFFLOAD, "cache": Action.OFFLOAD}, 2: {"kv_cache": Action.DISCARD}})
    work = planner.sleep_work(two_caches, 1, [], {}, rules, short, discard_if_short=True)
    assert [(r.id, a) for r, a in work] == [(1, Action.DISCARD), (2, Action.OFFLOAD)]
    assert planner.demoted(work, 1, {}, rules) == ["kv_cache"]
    with pytest.raises(SleepdError) as refused:
        planner.sleep_work(two_caches, 1, [], {}, rules, short, discard_if_short=False)
    assert refused.value.code is Code.RESOURCE_EXHAUSTED and "never discards" in refused.value.message


def test_unknown_tags_and_ranks_still_handing_back_are_refused():
    with pytest.raises(SleepdError) as unknown:
        planner.sleep_work(model(), 1, ["lora"], {}, RULES, ROOMY)
    assert unknown.value.code is Code.NOT_FOUND and "its tags: kv_cache, weights" in unknown.value.message
    returning = model(ranks=[rank(0, region(1, "weights"), returning=True)])
    for check in (lambda: planner.check_ready(returning, "sleep"), lambda: planner.wake(returning, [], False)):
        with pytest.raises(SleepdError) as waiting:
            check()
        assert waiting.value.code is Code.FAILED_PRECONDITION and "qwen rank 0 (pid 1000)" in waiting.value.message


# ---- wake ----

def test_a_wake_makes_room_restores_remaps_runs_the_tags_hooks_and_then_the_models():
    qwen = model(ranks=[rank(0, region(1, "weights", OFFLOADED), region(2, "kv_cache", DISCARDED))], paused=True)
    plan = planner.wake(qwen, [], evict=True)
    assert actions(plan) == [MakeRoom("qwen", ((0, 16 * MiB),), True), Materialize("qwen", (1, 2)),
                             Remap("qwen", (1, 2), (0,)), TagsAwake("qwen", (1, 2), (0,)),
                             FinishRestore("qwen", (1, 2)), ResumeIfAwake("qwen")]
    assert [(r.kind, r.bytes) for r in plan.reserve] == [("device", 16 * MiB)]


def test_each_failure_point_of_a_wake_leaves_the_model_asleep_with_its_backups():
    qwen = model(ranks=[rank(0, region(1, "weights", OFFLOADED), region(2, "kv_cache", DISCARDED))], paused=True)
    plan = planner.wake(qwen, [], evict=False)
    cancel = CancelRestore("qwen", (1, 2))
    unmap = Unmap("qwen", ((1, OFFLOADED), (2, DISCARDED)), (0,))  # each back to the state it slept in
    assert failing_at_each_step(plan) == {
        "MakeRoom": [],  # models evicted for room stay asleep: they were asleep-able, and the room is real
        "Materialize": [cancel],
        "Remap": [unmap, cancel],
        "TagsAwake": [unmap, cancel],
        "FinishRestore": [],  # mapped and restored: the wake has happened
        "ResumeIfAwake": [],
    }


def test_waking_some_tags_wakes_only_them_and_an_awake_model_only_resumes():
    qwen = model(ranks=[rank(0, region(1, "weights", OFFLOADED), region(2, "kv_cache", DISCARDED))], paused=True)
    assert Materialize("qwen", (1,)) in actions(planner.wake(qwen, ["weights"], False))
    assert actions(planner.wake(model(), [], False)) == [ResumeIfAwake("qwen")]


# ---- swap ----

def swap_models():
    target = model("llama", [rank(0, region(10, "weights", OFFLOADED, size=32 * MiB))], paused=True, owner=7)
    awake = model("qwen", [rank(0, region(1, "weights", size=40 * MiB), region(2, "kv_cache", size=24 * MiB))])
    paused = model("phi", [rank(0, region(5, "weights", size=16 * MiB))], paused=True)
    return target, awake, paused


def test_a_swap_quiesces_the_victims_sends_them_out_in_batches_beside_the_restores_then_remaps_the_target():
    target, awake, paused = swap_models()
    plan = planner.swap(target, [awake, paused], RULES, ROOMY, batch_bytes=32 * MiB)
    quiesce, overlapped, *coming_in = actions(plan)
    assert quiesce == Quiesce("qwen", 1)  # phi is paused already
    assert isinstance(overlapped, Overlapped) and overlapped.incoming == Materialize("llama", (10,))
    assert [step.do for step in overlapped.outgoing] == [
        Offload("qwen", (1,)), Unmap("qwen", ((1, OFFLOADED),), (0,)), Release("qwen", (1,)),  # 40 MiB: one batch
        Unmap("qwen", ((2, DISCARDED),), (0,)), Release("qwen", (2,)),
        Offload("phi", (5,)), Unmap("phi", ((5, OFFLOADED),), (0,)), Release("phi", (5,))]
    assert coming_in == [Remap("llama", (10,), (0,)), TagsAwake("llama", (10,), (0,)), FinishRestore("llama", (10,)),
                         ResumeIfAwake("llama")]
    assert plan.set_aside == ("llama", ((0, 32 * MiB),)) and plan.put_back == ("qwen", "phi")
    assert {r.model: (r.kind, r.bytes) for r in plan.reserve} == {
        "llama": ("device", 32 * MiB), "qwen": ("host_pool", 40 * MiB), "phi": ("host_pool", 16 * MiB)}
    mine = model("llama", target.ranks, paused=True, owner=awake.owner_uid)  # what the uid's victims free is its own
    assert planner.swap(mine, [awake], RULES, ROOMY, 32 * MiB).reserve[0].bytes == 0


def test_each_failure_point_of_a_swap_releases_the_targets_memory_first_then_wakes_the_victims_again():
    target, awake, paused = swap_models()
    plan = planner.swap(target, [awake, paused], RULES, ROOMY, batch_bytes=32 * MiB)
    outgoing = plan.steps[1].do.outgoing
    cancel_target, resume = CancelRestore("llama", (10,)), Resume("qwen", (1, 2))
    assert plan.compensations(0) == [resume]
    for within, step in enumerate(outgoing):
        undone = [undo for inner in reversed(outgoing[:within + 1]) for undo in inner.undo]
        assert plan.compensations(1, within) == [cancel_target, *undone, resume], type(step.do).__name__
    everything = [cancel_target, WakeAgain("phi", (5,)), Remap("phi", (5,), (0,)), CancelOffload("phi", (5,)),
                  WakeAgain("qwen", (2,)), Remap("qwen", (2,), (0,)), WakeAgain("qwen", (1,)),
                  Remap("qwen", (1,), (0,)), CancelOffload("qwen", (1,)), resume]
    assert plan.compensations(1, None) == everything  # the restores failed after every victim went out
    assert plan.compensations(2) == [Unmap("llama", ((10, OFFLOADED),), (0,)), *everything]
    assert plan.compensations(3) == plan.compensations(2)
    assert plan.compensations(4) == plan.compensations(5) == []  # the target is awake: the swap has happened


def test_a_swap_is_refused_before_anything_moves_where_the_pool_or_the_room_is_short():
    target, awake, paused = swap_models()
    with pytest.raises(SleepdError) as pool:  # each victim fits alone, not both
        planner.swap(target, [awake, paused], RULES, planner.PoolRoom(available=50 * MiB, budget=64 * MiB), 64 * MiB)
    assert pool.value.code is Code.RESOURCE_EXHAUSTED and "need 56.0 MiB of host pool" in pool.value.message
    names = ["cuda:0"]
    assert planner.swap_shortfall(target, [paused], {0: 32 * MiB}, {0: 8 * MiB}, names) == \
        "swap to llama: needs 32.0 MiB on cuda:0; sleeping phi leaves it 8.0 MiB short"
    assert planner.swap_shortfall(target, [awake], {0: 32 * MiB}, {0: 8 * MiB}, names) is None
    pinned = model("pinned", [rank(0, region(7, "weights"))], policy=Policy(pinned=True))
    with pytest.raises(SleepdError, match="pinned is pinned"):
        planner.swap_shortfall(target, [pinned], {0: 32 * MiB}, {0: 64 * MiB}, names)


def test_victims_are_chosen_in_eviction_order_until_the_target_fits():
    target, awake, paused = swap_models()
    assert planner.choose_victims([paused, awake], {0: 32 * MiB}, {0: 0}) == [paused, awake]
    assert planner.choose_victims([awake, paused], {0: 32 * MiB}, {0: 0}) == [awake]
    assert planner.choose_victims([awake, paused], {0: 32 * MiB}, {0: 40 * MiB}) == []


def test_eviction_order_is_priority_then_longest_idle_among_the_models_the_caller_may_evict():
    requester = model("me")
    candidates = [
        model("busy_low", idle=1.0, policy=Policy(priority=0)),
        model("idle_low", idle=50.0, policy=Policy(priority=0)),
        model("high", idle=99.0, policy=Policy(priority=5)),
        model("pinned", policy=Policy(pinned=True)),
        model("level0", policy=Policy(eviction_level=0)),
        model("elsewhere", [rank(0, region(1, "weights", device=1), device=1)]),
        model("asleep", [rank(0, region(1, "weights", OFFLOADED))]),
        model("returning", [rank(0, region(1, "weights"), returning=True)]),
        model("others", owner=1000),
        model("own_sleep", needs_controller=True),
        model("own_sleep_controlled", needs_controller=True, controller_pid=42, idle=10.0),
    ]
    order = planner.eviction_order(requester, [requester, *candidates], {0: 1}, lambda owner: owner == 0)
    assert order == ["idle_low", "own_sleep_controlled", "busy_low", "high"]
    assert "others" in planner.eviction_order(requester, candidates, {0: 1}, lambda owner: True)


# ---- idle sleep, a session's end, a restart ----

def test_idle_sleep_is_due_for_awake_models_idle_past_their_policy():
    due = model("due", idle=11.0, policy=Policy(idle_seconds=10.0))
    not_yet = model("not_yet", idle=9.0, policy=Policy(idle_seconds=10.0))
    never = model("never", idle=1e6)
    asleep = model("asleep", [rank(0, region(1, "weights", OFFLOADED))], idle=99.0, policy=Policy(idle_seconds=1.0))
    assert [m.name for m in planner.idle_due([due, not_yet, never, asleep])] == ["due"]


def test_an_ended_rank_keeps_only_its_persistent_regions():
    qwen = model(ranks=[rank(0, region(1, "weights", persist=True), region(2, "kv_cache"))])
    assert actions(planner.reclaim(qwen, 0)) == [Drop("qwen", (2,))]


def test_after_a_restart_what_was_handed_back_is_awake_and_the_rest_asleep():
    recovered = rank(0, region(1, "weights", MAPPED, backed_up=True, holds=True),  # copied out, kept mapped
                     region(2, "kv_cache", MAPPED, holds=False),  # recorded mapped, not handed back
                     region(3, "lora", MAPPED, holds=True), returning=True)
    plan = planner.hand_back_finished(model(ranks=[recovered]), 0)
    assert actions(plan) == [KeepAwake("qwen", (1,)), Unclaim("qwen", (2,)), Pause("qwen")]
    everything_back = rank(0, region(1, "weights", MAPPED, holds=True), returning=True)
    assert Pause("qwen") not in actions(planner.hand_back_finished(model(ranks=[everything_back]), 0))


def test_a_rank_that_never_came_back_keeps_only_persistent_regions_with_a_backup():
    gone = rank(0, region(1, "weights", MAPPED, persist=True, backed_up=True, holds=False),
                region(2, "lora", OFFLOADED, persist=True), region(3, "cache", MAPPED, persist=True, holds=False),
                region(4, "kv_cache", MAPPED, holds=False), orphaned=True, returning=True)
    assert actions(planner.expired(model(ranks=[gone]), 0)) == [Drop("qwen", (3, 4)), Unclaim("qwen", (1,))]
