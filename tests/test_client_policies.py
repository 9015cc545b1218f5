"""The client's I/O-free parts: deadlines, retry and polling policies, watch states, error map."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from conveyor import (
    AlreadyExists,
    ConveyorError,
    DeadlineExceeded,
    EventKind,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    RpcError,
    Task,
    TaskCancelled,
    TaskFailed,
    TaskStatus,
    Unauthenticated,
    Unavailable,
    WaitTimeout,
)
from conveyor._deadline import Deadline
from conveyor._polling import Polling, PollingPolicy
from conveyor._retry import STREAM_RETRY, UNARY_RETRY, Backoff
from conveyor._watching import AllTasksWatch, TaskWatch, WatchSettings
from conveyor.errors import from_rpc_error, outcome
from conveyor.v1 import task_pb2
from conveyor.v1 import task_service_pb2 as pb

CODE = grpc.StatusCode


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeRpcError(grpc.RpcError):
    """A failed call as grpc reports it, with google.rpc.Status details when given."""

    def __init__(self, code: grpc.StatusCode, message: str = "", *details: Message) -> None:
        self._code, self._message = code, message
        status = status_pb2.Status(code=code.value[0], message=message)
        for detail in details:
            packed = any_pb2.Any()
            packed.Pack(detail)
            status.details.append(packed)
        self._metadata = (
            (("grpc-status-details-bin", status.SerializeToString()),) if details else ()
        )

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    # grpc gives (key, value) pairs, as here; types-grpcio has objects with .key and .value.
    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:  # type: ignore[override]
        return self._metadata


def state(
    revision: int, status: task_pb2.TaskStatus.ValueType = task_pb2.TASK_STATUS_RUNNING
) -> task_pb2.TaskResponse:
    return task_pb2.TaskResponse(task_id="t", task_type="sleep", status=status, revision=revision)


def response(
    kind: pb.WatchEventType.ValueType,
    revision: int,
    status: task_pb2.TaskStatus.ValueType = task_pb2.TASK_STATUS_RUNNING,
) -> pb.WatchResponse:
    if kind == pb.WATCH_EVENT_TYPE_HEARTBEAT:
        return pb.WatchResponse(type=kind, revision=revision)
    return pb.WatchResponse(type=kind, task=state(revision, status), revision=revision)


def task_watch(reconnect_timeout: float = 30.0, timeout: float | None = None) -> TaskWatch:
    return TaskWatch("t", WatchSettings(10.0, reconnect_timeout, timeout))


CURRENT, CHANGED, REMOVED, HEARTBEAT = (
    pb.WATCH_EVENT_TYPE_CURRENT,
    pb.WATCH_EVENT_TYPE_CHANGED,
    pb.WATCH_EVENT_TYPE_REMOVED,
    pb.WATCH_EVENT_TYPE_HEARTBEAT,
)
COMPLETED = task_pb2.TASK_STATUS_COMPLETED


# -- deadline, retry ----------------------------------------------------------------


def test_a_deadline_counts_down_and_caps() -> None:
    clock = Clock()
    deadline = Deadline(10, clock=clock)
    assert (deadline.remaining(), deadline.cap(30), deadline.cap(4), deadline.cap(None)) == (
        10,
        10,
        4,
        10,
    )
    clock.now += 12
    assert (deadline.remaining(), deadline.expired) == (0, True)
    endless = Deadline(None, clock=clock)
    assert (endless.remaining(), endless.cap(5), endless.cap(None), endless.expired) == (
        None,
        5,
        None,
        False,
    )


def test_retry_delays_are_jittered_below_a_ceiling_that_doubles_up_to_five_seconds() -> None:
    backoff = Backoff(UNARY_RETRY, Deadline(None), jitter=lambda: 1.0)
    ceilings = [backoff.delay_after(FakeRpcError(CODE.UNAVAILABLE)) for _ in range(8)]
    assert ceilings == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    jittered = Backoff(UNARY_RETRY, Deadline(None), jitter=lambda: 0.25)
    assert jittered.delay_after(FakeRpcError(CODE.UNAVAILABLE)) == 0.025


def test_only_unavailable_is_retried_for_calls_and_only_transport_codes_for_streams() -> None:
    for code in CODE:
        backoff = Backoff(UNARY_RETRY, Deadline(None))
        retried = backoff.delay_after(FakeRpcError(code)) is not None
        assert retried == (code is CODE.UNAVAILABLE)
    assert STREAM_RETRY.codes == {CODE.UNAVAILABLE, CODE.INTERNAL, CODE.CANCELLED}


REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: "
    "Failed to connect to remote host: Connection refused"
)


def test_a_refused_first_try_is_given_up_at_once_only_when_asked() -> None:
    patient = Backoff(UNARY_RETRY, Deadline(None))
    assert patient.delay_after(FakeRpcError(CODE.UNAVAILABLE, REFUSED)) is not None
    hasty = Backoff(UNARY_RETRY, Deadline(None), retry_refused=False)
    assert hasty.delay_after(FakeRpcError(CODE.UNAVAILABLE, REFUSED)) is None
    # Only the first try: a server that answered once may be restarting, and is waited for.
    later = Backoff(UNARY_RETRY, Deadline(None), retry_refused=False)
    assert later.delay_after(FakeRpcError(CODE.UNAVAILABLE, "shutting down")) is not None
    assert later.delay_after(FakeRpcError(CODE.UNAVAILABLE, REFUSED)) is not None


def test_a_watch_refused_before_it_heard_the_server_gives_up_at_once_only_when_asked() -> None:
    refused = FakeRpcError(CODE.UNAVAILABLE, REFUSED)
    assert TaskWatch("t", WatchSettings(10.0, 30.0, None)).broken(refused) >= 0
    hasty = WatchSettings(10.0, 30.0, None, retry_refused=False)
    with pytest.raises(Unavailable):
        TaskWatch("t", hasty).broken(refused)
    heard = TaskWatch("t", hasty)
    heard.receive(response(HEARTBEAT, 3))
    assert heard.broken(refused) >= 0  # it was under way: it reconnects


def test_retrying_stops_when_the_next_try_would_start_past_the_deadline() -> None:
    clock = Clock()
    backoff = Backoff(UNARY_RETRY, Deadline(1.0, clock=clock), jitter=lambda: 1.0)
    assert backoff.next_delay() == 0.1
    clock.now += 0.95
    assert backoff.next_delay() is None


def test_a_deadline_that_cuts_retries_short_reports_what_they_were_retrying() -> None:
    backoff = Backoff(UNARY_RETRY, Deadline(None))
    late = FakeRpcError(CODE.DEADLINE_EXCEEDED)
    assert backoff.reported(late) is late  # nothing was retried: the call was slow
    down = FakeRpcError(CODE.UNAVAILABLE)
    backoff.delay_after(down)
    assert backoff.reported(late) is down
    denied = FakeRpcError(CODE.PERMISSION_DENIED)
    assert backoff.reported(denied) is denied


# -- polling ------------------------------------------------------------------------


def running_task() -> Task:
    return Task._from_proto(state(1))


def test_polling_pauses_grow_by_half_up_to_thirty_seconds_less_the_time_spent() -> None:
    clock = Clock()
    polling = Polling("t", Deadline(None, clock=clock), PollingPolicy(), 5.0, clock=clock)
    pauses = []
    for _ in range(12):
        polling.start()
        clock.now += 0.25  # the Get takes a quarter of a second
        pauses.append(polling.pause())
    expected = [min(1.0 * 1.5**n, 30.0) - 0.25 for n in range(12)]
    assert pauses == pytest.approx(expected)


def test_polling_stops_at_its_deadline_with_the_last_state_seen() -> None:
    clock = Clock()
    polling = Polling("t", Deadline(2.0, clock=clock), PollingPolicy(), 5.0, clock=clock)
    assert polling.start() == 2.0  # the Get may not outlast the wait
    assert not polling.ended(running_task())
    clock.now += 0.2
    assert polling.pause() == pytest.approx(0.8)
    clock.now += 0.8
    assert polling.start() == pytest.approx(1.0)
    clock.now += 0.2
    assert polling.pause() == pytest.approx(0.8)  # not 1.3 s: the deadline comes first
    clock.now += 0.8
    with pytest.raises(WaitTimeout) as caught:
        polling.start()
    assert caught.value.task == running_task()


def test_a_get_cut_short_by_the_wait_deadline_is_a_wait_timeout_and_by_its_own_is_not() -> None:
    clock = Clock()
    polling = Polling("t", Deadline(2.0, clock=clock), PollingPolicy(), 5.0, clock=clock)
    polling.start()
    with pytest.raises(WaitTimeout):
        polling.timed_out(DeadlineExceeded("slow"))
    patient = Polling("t", Deadline(60.0, clock=clock), PollingPolicy(), 5.0, clock=clock)
    assert patient.start() == 5.0
    patient.timed_out(DeadlineExceeded("slow"))  # the Get's own timeout: the caller re-raises


@pytest.mark.parametrize(
    "policy", [{"initial": 0}, {"multiplier": 0.9}, {"initial": 5, "maximum": 1}]
)
def test_a_polling_policy_that_makes_no_sense_is_refused(policy: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PollingPolicy(**policy)


# -- the watch of one task ----------------------------------------------------------


def test_a_watch_resumes_after_the_last_revision_seen_heartbeats_included() -> None:
    watch = task_watch()
    assert not watch.request().HasField("since_revision")
    assert watch.receive(response(CURRENT, 5)) is not None
    assert watch.request().since_revision == 5
    assert watch.receive(response(HEARTBEAT, 9)) is None
    assert watch.request().since_revision == 9
    assert watch.request().heartbeat_interval == duration_pb2.Duration(seconds=10)


def test_a_watch_passes_nothing_on_twice() -> None:
    watch = task_watch()
    watch.receive(response(CURRENT, 5))
    assert watch.broken(FakeRpcError(CODE.OUT_OF_RANGE)) == 0.0
    assert not watch.request().HasField("since_revision")  # ask for the current state
    assert watch.receive(response(CURRENT, 5)) is None  # seen
    assert watch.request().since_revision == 5  # the stream delivered: resume again
    newer = watch.receive(response(CHANGED, 7))
    assert newer is not None and newer.revision == 7


def test_a_watch_ends_with_the_terminal_state_or_the_removal() -> None:
    watch = task_watch()
    watch.receive(response(CURRENT, 5))
    final = watch.receive(response(CHANGED, 6, COMPLETED))
    assert watch.done and final is not None and watch.final() is final
    removed = task_watch()
    removed.receive(response(CURRENT, 6, COMPLETED))
    removal = pb.WatchResponse(type=REMOVED, task=state(6, COMPLETED), revision=8)
    assert removed.receive(removal) is None  # its last state was passed on already
    assert removed.done


def test_a_watch_that_ends_without_the_terminal_state_asks_for_the_current_state() -> None:
    watch = task_watch()
    watch.receive(response(CURRENT, 5))
    assert 0.0 <= watch.broken(None) <= STREAM_RETRY.initial  # the first backoff, jittered
    assert not watch.request().HasField("since_revision")
    with pytest.raises(ConveyorError, match="ended before the task did"):
        watch.final()


def test_a_broken_watch_backs_off_until_its_reconnect_time_is_spent() -> None:
    watch = task_watch(reconnect_timeout=0.5)
    with pytest.raises(Unavailable) as caught:
        for _ in range(50):
            watch.broken(FakeRpcError(CODE.UNAVAILABLE, "gone"))
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_a_watch_gives_up_at_once_on_an_error_that_a_retry_cannot_mend() -> None:
    with pytest.raises(NotFound):
        task_watch().broken(FakeRpcError(CODE.NOT_FOUND, "no such task"))


def test_a_wait_polls_only_when_the_server_refuses_to_let_it_watch() -> None:
    watch = task_watch(timeout=10)
    for refusal in (CODE.UNIMPLEMENTED, CODE.PERMISSION_DENIED, CODE.RESOURCE_EXHAUSTED):
        assert isinstance(watch.fallback(from_rpc_error(FakeRpcError(refusal)), 5.0), Polling)
    with pytest.raises(WaitTimeout):
        watch.fallback(DeadlineExceeded("late"), 5.0)
    with pytest.raises(Unavailable):
        watch.fallback(Unavailable("down"), 5.0)


# -- the watch of many tasks --------------------------------------------------------


def all_tasks_watch(since: int) -> AllTasksWatch:
    return AllTasksWatch(
        task_pb2.TaskFilter(task_type="sleep"), since, WatchSettings(10.0, 30.0, None)
    )


def page(revision: int, *revisions: int, token: str = "") -> pb.ListResponse:
    tasks = [
        task_pb2.TaskResponse(task_id=f"t{r}", status=COMPLETED, revision=r) for r in revisions
    ]
    return pb.ListResponse(tasks=tasks, revision=revision, next_page_token=token)


def test_a_watch_of_many_tasks_lists_them_again_when_its_revision_is_out_of_range() -> None:
    watch = all_tasks_watch(since=10)
    assert watch.relist_request() is None
    assert watch.broken(FakeRpcError(CODE.OUT_OF_RANGE)) == 0.0
    relist = watch.relist_request()
    assert relist is not None and relist.filter.task_type == "sleep"
    first = watch.relisted(page(30, 5, 12, token="more"))  # 5 was seen; 12 was not
    last = watch.relisted(page(31, 25, 31))  # 31 came after the first page: the watch has it
    assert [(e.task.task_id, e.revision) for e in first + last] == [("t12", 12), ("t25", 25)]
    assert watch.relist_request() is None
    assert watch.request().since_revision == 30


def test_a_watch_of_many_tasks_can_start_with_a_list_and_go_on_from_its_revision() -> None:
    running = task_pb2.TaskFilter(statuses=[task_pb2.TASK_STATUS_RUNNING], task_type="sleep")
    watch = AllTasksWatch(
        task_pb2.TaskFilter(task_type="sleep"), None, WatchSettings(10.0, 30.0, None), running
    )
    first_list = watch.relist_request()
    assert first_list is not None and first_list.filter == running
    first = watch.relisted(page(30, 5, 12, token="more"))
    last = watch.relisted(page(32, 25, 31))  # 31 came after the first page: the watch has it
    assert [(e.kind, e.revision) for e in first + last] == [
        (EventKind.CURRENT, 5),
        (EventKind.CURRENT, 12),
        (EventKind.CURRENT, 25),
    ]
    assert watch.relist_request() is None
    assert watch.request().since_revision == 30  # the first page's: nothing missed between
    assert watch.request().filter.task_type == "sleep" and not watch.request().filter.statuses
    watch.broken(FakeRpcError(CODE.OUT_OF_RANGE))
    again = watch.relist_request()  # later, a relist of the changes, by the watch's filter
    assert again is not None and not again.filter.statuses
    assert [e.kind for e in watch.relisted(page(40, 35))] == [EventKind.CHANGED]


def test_a_server_whose_revisions_went_back_is_listed_afresh() -> None:
    watch = all_tasks_watch(since=500)
    watch.broken(FakeRpcError(CODE.OUT_OF_RANGE))
    watch.relist_request()
    events = watch.relisted(page(8, 3, 8))
    assert [e.revision for e in events] == [3, 8]
    assert watch.request().since_revision == 8


def test_a_watch_of_many_tasks_skips_heartbeats_and_what_it_saw() -> None:
    watch = all_tasks_watch(since=10)
    assert watch.receive(response(HEARTBEAT, 12)) is None
    assert watch.receive(response(CHANGED, 11)) is None
    event = watch.receive(response(CHANGED, 13))
    assert event is not None and event.revision == 13
    assert watch.request().since_revision == 13


# -- a newer server's statuses and event types --------------------------------------

# A status this client has never seen, such as a newer server's PAUSED; an event type too.
NEW_STATUS = task_pb2.TaskStatus.ValueType(9)
NEW_EVENT = pb.WatchEventType.ValueType(9)


def test_a_status_not_known_is_unknown_keeps_its_number_and_is_not_terminal() -> None:
    task = Task._from_proto(state(4, NEW_STATUS))
    assert task.status is TaskStatus.UNKNOWN
    assert (task.raw_status, task.status_label) == (NEW_STATUS, "UNKNOWN(9)")
    assert not task.status.terminal
    unset = Task._from_proto(task_pb2.TaskResponse(task_id="t"))  # TASK_STATUS_UNSPECIFIED
    assert unset.status is TaskStatus.UNKNOWN
    terminal = {status for status in TaskStatus if status.terminal}
    assert terminal == {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}
    known = Task._from_proto(state(4, COMPLETED))
    assert (known.raw_status, known.status_label) == (COMPLETED, "COMPLETED")


def test_a_watch_goes_on_through_a_status_not_known_until_a_terminal_one() -> None:
    watch = task_watch()
    paused = watch.receive(response(CURRENT, 5, NEW_STATUS))
    assert paused is not None and paused.status is TaskStatus.UNKNOWN
    assert not watch.done
    with pytest.raises(ConveyorError, match="ended before the task did"):
        watch.final()
    final = watch.receive(response(CHANGED, 6, COMPLETED))
    assert watch.done and final is not None and watch.final() is final


def test_a_watch_skips_an_event_type_not_known_but_counts_its_revision() -> None:
    watch = task_watch()
    watch.receive(response(CURRENT, 5))
    assert watch.receive(response(NEW_EVENT, 6, COMPLETED)) is None  # not taken for a state
    assert not watch.done
    assert watch.request().since_revision == 6  # read past it: a resume starts after it
    assert watch.receive(pb.WatchResponse(type=NEW_EVENT)) is None  # no task, no revision
    assert watch.request().since_revision == 6
    later = watch.receive(response(CHANGED, 7, COMPLETED))
    assert watch.done and later is not None and later.revision == 7
    first = task_watch()
    assert first.receive(pb.WatchResponse(type=NEW_EVENT)) is None
    assert not first.request().HasField("since_revision")  # 0 is no revision to resume from


def test_a_watch_of_many_tasks_skips_an_event_type_not_known_but_counts_its_revision() -> None:
    watch = all_tasks_watch(since=10)
    assert watch.receive(response(NEW_EVENT, 11)) is None
    assert watch.receive(pb.WatchResponse(type=NEW_EVENT)) is None
    assert watch.request().since_revision == 11
    event = watch.receive(response(CHANGED, 12, NEW_STATUS))
    assert event is not None and event.kind is EventKind.CHANGED
    assert event.task.status is TaskStatus.UNKNOWN and event.task.raw_status == NEW_STATUS


def test_polling_goes_on_through_a_status_not_known_and_names_it_on_timing_out() -> None:
    clock = Clock()
    polling = Polling("t", Deadline(2.0, clock=clock), PollingPolicy(), 5.0, clock=clock)
    polling.start()
    assert not polling.ended(Task._from_proto(state(4, NEW_STATUS)))
    clock.now += 3
    with pytest.raises(WaitTimeout, match=r"last seen UNKNOWN\(9\)"):
        polling.start()
    assert polling.ended(Task._from_proto(state(5, COMPLETED)))


def test_a_watch_the_server_keeps_ending_in_a_status_not_known_says_so() -> None:
    """A server ends the watch of a task at its end: a newer server's end looks like this."""
    watch = task_watch(reconnect_timeout=0.5)
    watch.receive(response(CURRENT, 5, NEW_STATUS))
    with pytest.raises(ConveyorError, match="status 9, a status this client does not know"):
        for _ in range(50):
            watch.broken(None)
            watch.receive(response(CURRENT, 5, NEW_STATUS))
    known = task_watch(reconnect_timeout=0.5)
    known.receive(response(CURRENT, 5))
    with pytest.raises(Unavailable, match="kept ending the watch early"):
        for _ in range(50):
            known.broken(None)


# -- the error map ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (CODE.INVALID_ARGUMENT, InvalidArgument),
        (CODE.NOT_FOUND, NotFound),
        (CODE.ALREADY_EXISTS, AlreadyExists),
        (CODE.FAILED_PRECONDITION, FailedPrecondition),
        (CODE.RESOURCE_EXHAUSTED, ResourceExhausted),
        (CODE.UNAVAILABLE, Unavailable),
        (CODE.DEADLINE_EXCEEDED, DeadlineExceeded),
        (CODE.UNAUTHENTICATED, Unauthenticated),
        (CODE.PERMISSION_DENIED, PermissionDenied),
        (CODE.OUT_OF_RANGE, OutOfRange),
        (CODE.INTERNAL, RpcError),
        (CODE.UNIMPLEMENTED, RpcError),
    ],
)
def test_each_code_maps_to_its_class(code: grpc.StatusCode, cls: type[RpcError]) -> None:
    error = from_rpc_error(FakeRpcError(code, "why"))
    assert type(error) is cls
    assert (error.code, error.message, str(error)) == (code, "why", "why")
    assert cls.grpc_status_code in (code, None)


def test_the_details_of_the_status_reach_the_error() -> None:
    violation = error_details_pb2.BadRequest.FieldViolation(field="task.priority", description="x")
    invalid = from_rpc_error(
        FakeRpcError(
            CODE.INVALID_ARGUMENT, "bad", error_details_pb2.BadRequest(field_violations=[violation])
        )
    )
    assert isinstance(invalid, InvalidArgument)
    assert invalid.field_violations == (FieldViolation("task.priority", "x"),)
    full = from_rpc_error(
        FakeRpcError(
            CODE.RESOURCE_EXHAUSTED,
            "full",
            error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="conveyor.v1"),
            error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=500_000_000)),
        )
    )
    assert isinstance(full, ResourceExhausted)
    assert (full.reason, full.domain, full.retry_delay) == ("QUEUE_FULL", "conveyor.v1", 0.5)


def test_a_task_that_ended_badly_is_an_exception_that_carries_it() -> None:
    failed = Task._from_proto(
        task_pb2.TaskResponse(
            task_id="t",
            task_type="fail",
            status=task_pb2.TASK_STATUS_FAILED,
            error=task_pb2.TaskError(code="HANDLER_ERROR", message="boom"),
        )
    )
    with pytest.raises(TaskFailed, match="HANDLER_ERROR: boom"):
        outcome(failed)
    cancelled = Task._from_proto(
        task_pb2.TaskResponse(task_id="t", status=task_pb2.TASK_STATUS_CANCELLED)
    )
    with pytest.raises(TaskCancelled, match="no reason given"):
        outcome(cancelled)
    assert outcome(Task._from_proto(state(3, COMPLETED))) is None
    assert TaskStatus.COMPLETED.terminal and not TaskStatus.RUNNING.terminal
