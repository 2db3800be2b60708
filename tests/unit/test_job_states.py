"""The job state machine as data: the table, its named moves, and what follows from them."""

from __future__ import annotations

from posttrain.domain.jobs import (
    LEASED,
    LEASED_STATUSES,
    MOVE_SOURCES,
    MOVE_TARGETS,
    TERMINAL,
    TRANSITIONS,
    JobStatus,
    Move,
    sources_of,
)

EDGES = {(source, target) for source, targets in TRANSITIONS.items() for target in targets}


def test_the_statuses_are_the_five_of_the_llama_stack_spec_and_the_two_of_a_pause():
    assert {s.value for s in JobStatus} == {"scheduled", "in_progress", "completed", "failed", "cancelled",
                                            "pausing", "paused"}


def test_every_status_has_a_row_and_every_target_is_a_status():
    assert set(TRANSITIONS) == set(JobStatus)
    assert all(target in JobStatus for _, target in EDGES)
    assert all(source != target for source, target in EDGES)


def test_terminal_statuses_are_exactly_those_with_no_way_out():
    assert TERMINAL == {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}
    assert {s for s, targets in TRANSITIONS.items() if not targets} == TERMINAL


def test_every_status_is_reachable_from_scheduled():
    reached, frontier = {JobStatus.SCHEDULED}, [JobStatus.SCHEDULED]
    while frontier:
        for target in TRANSITIONS[frontier.pop()]:
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(JobStatus)


def test_sources_of_agrees_with_the_table():
    for target in JobStatus:
        assert sources_of(target) == {source for source, t in EDGES if t == target}
    assert sources_of(JobStatus.SCHEDULED) == {JobStatus.IN_PROGRESS, JobStatus.PAUSED}  # a requeue, a resume
    assert sources_of(JobStatus.CANCELLED) == {JobStatus.SCHEDULED, JobStatus.IN_PROGRESS, JobStatus.PAUSING,
                                               JobStatus.PAUSED}


def test_each_named_move_is_in_the_table_and_the_moves_name_every_edge():
    assert set(MOVE_TARGETS) == set(Move)
    named = set()
    for move in Move:
        assert move.sources, f"{move.value} can start from nowhere"
        assert move.sources == sources_of(move.target) & MOVE_SOURCES.get(move, frozenset(JobStatus))
        for source in move.sources:
            assert move.target in TRANSITIONS[source]
            named.add((source, move.target))
    assert named == EDGES
    # Moves sharing a target start from disjoint statuses, so an edge names exactly one move.
    for move in Move:
        for other in Move:
            if other is not move and other.target is move.target:
                assert not move.sources & other.sources, (move, other)


def test_moves_read_as_their_names():
    assert Move.CLAIM.target is JobStatus.IN_PROGRESS and Move.CLAIM.sources == {JobStatus.SCHEDULED}
    assert Move.COMPLETE.target is JobStatus.COMPLETED
    assert Move.FAIL.target is JobStatus.FAILED
    assert Move.CANCEL.target is JobStatus.CANCELLED
    assert Move.REQUEUE.target is JobStatus.SCHEDULED and Move.REQUEUE.sources == {JobStatus.IN_PROGRESS}
    assert Move.PAUSE.target is JobStatus.PAUSING and Move.PAUSE.sources == {JobStatus.IN_PROGRESS}
    assert Move.HOLD.target is JobStatus.PAUSED and Move.HOLD.sources == {JobStatus.SCHEDULED}
    assert Move.PARK.target is JobStatus.PAUSED and Move.PARK.sources == {JobStatus.PAUSING}
    assert Move.RESUME.target is JobStatus.SCHEDULED and Move.RESUME.sources == {JobStatus.PAUSED}


def test_a_lease_lives_in_the_status_a_claim_moves_to_and_the_launcher_s_moves_start_there():
    assert LEASED is Move.CLAIM.target is JobStatus.IN_PROGRESS
    assert LEASED_STATUSES == {LEASED, JobStatus.PAUSING}  # a pausing job's trainer still runs under its lease
    for move in (Move.COMPLETE, Move.FAIL):
        assert move.sources == LEASED_STATUSES
    assert Move.REQUEUE.sources == {LEASED} and Move.PARK.sources == {JobStatus.PAUSING}
    assert not LEASED_STATUSES & TERMINAL
