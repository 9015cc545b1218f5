"""`AsyncClient`: the asyncio client, on a `grpc.aio` channel and the generated stub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar, cast

import grpc

from conveyor import _requests
from conveyor._async_schedules import AsyncSchedules
from conveyor._base import ClientBase
from conveyor._polling import Polling
from conveyor._reloading import AsyncReloadingChannel
from conveyor._tracing import traced
from conveyor._watching import Watch
from conveyor.errors import DeadlineExceeded, RpcError, from_rpc_error, outcome
from conveyor.tasks import InputSent, Task, TaskCounts, TaskEvent, TaskStatus, TaskType
from conveyor.tls import Tls, chosen
from conveyor.v1 import task_service_pb2 as pb
from conveyor.v1.task_service_pb2_grpc import TaskServiceStub

Request = TypeVar("Request")
Response = TypeVar("Response")
Item = TypeVar("Item")


class AsyncClient(ClientBase):
    # unasync: async-only
    """An asyncio client of a conveyor server; `Client` is its blocking twin.

    `target` is the server's address (default: $CONVEYOR_SERVER, else 127.0.0.1:50051);
    or pass a `channel` of your own (for channel options), which `close` leaves open. `tls`
    (a `Tls`, or True for the system's roots) talks TLS; unset, $CONVEYOR_TLS_CA,
    $CONVEYOR_TLS_CERT and $CONVEYOR_TLS_KEY decide. `token` (default: $CONVEYOR_TOKEN)
    goes with every call as a bearer token. `timeout` is the default of every call's
    `timeout` (None: no limit), and also how long a broken watch keeps trying to
    reconnect; with `retry_refused=False`, a call or watch whose first try finds nothing
    listening at `target` raises Unavailable at once rather than retrying until then.
    Watches ask the server for a heartbeat after `heartbeat_interval` quiet seconds,
    which keeps proxies from closing idle streams and gives a recent revision to resume
    from. A watch left before its end
    keeps its stream open until it is closed: use `contextlib.aclosing` around it.
    """

    # unasync: sync-only
    # """A blocking client of a conveyor server; `AsyncClient` is its asyncio twin.
    #
    # `target` is the server's address (default: $CONVEYOR_SERVER, else 127.0.0.1:50051);
    # or pass a `channel` of your own (for channel options), which `close` leaves open;
    # give it grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, as the
    # client's own channel has. `tls` (a `Tls`, or True for the system's roots) talks TLS;
    # unset, $CONVEYOR_TLS_CA, $CONVEYOR_TLS_CERT and $CONVEYOR_TLS_KEY decide. `token`
    # (default: $CONVEYOR_TOKEN) goes with every call as a bearer token. `timeout`
    # is the default of every call's `timeout` (None: no limit), and also how long a
    # broken watch keeps trying to reconnect; with `retry_refused=False`, a call or watch
    # whose first try finds nothing listening at `target` raises Unavailable at once rather
    # than retrying until then. Watches ask the server for a heartbeat after
    # `heartbeat_interval` quiet seconds, which keeps proxies from closing idle streams and
    # gives a recent revision to resume from.
    # """
    # unasync: end

    def __init__(
        self,
        target: str | None = None,
        *,
        timeout: float | None = _requests.DEFAULT_TIMEOUT,
        heartbeat_interval: float = _requests.DEFAULT_HEARTBEAT,
        channel: grpc.aio.Channel | None = None,
        tls: Tls | bool | None = None,
        token: str | None = None,
        retry_refused: bool = True,
    ) -> None:
        super().__init__(
            target,
            channel,
            timeout=timeout,
            heartbeat_interval=heartbeat_interval,
            token=token,
            retry_refused=retry_refused,
        )
        if channel is None:
            channel = self._make_channel(chosen(tls), _requests.ASYNC_CHANNEL_OPTIONS)
        self._channel = channel
        self._stub = TaskServiceStub(self._channel)
        self.schedules = AsyncSchedules(self)  # the schedule calls: client.schedules.create ...

    def _make_channel(self, tls: Tls | None, options: Any) -> grpc.aio.Channel:
        """The client's own channel: plaintext, or TLS that follows its files (if it has any:
        the system's roots alone are read once)."""
        target = self._target
        if tls is None:
            return grpc.aio.insecure_channel(target, options=options)
        if tls.ca_file is None and tls.cert_file is None:
            return grpc.aio.secure_channel(target, tls.credentials(), options=options)
        return cast(
            grpc.aio.Channel,
            AsyncReloadingChannel(
                tls, lambda secure: grpc.aio.secure_channel(target, secure, options=options)
            ),
        )

    async def close(self) -> None:
        """Close the channel (unless it was passed in); calls under way are cancelled."""
        if self._own_channel:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def create(
        self,
        task_type: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        priority: int | None = None,
        timeout_seconds: float | None = None,
        max_attempts: int | None = None,
        labels: Mapping[str, str] | None = None,
        description: str = "",
        request_id: str | None = None,
        start_at: datetime | None = None,
        start_after_seconds: float | None = None,
        queue_timeout_seconds: float | None = None,
        timeout: float | None = None,
    ) -> Task:
        """Create a task and return it (CREATED). `timeout_seconds` bounds each attempt of the task.

        It starts at once, or not before `start_at` (an aware datetime) or
        `start_after_seconds` from now (at most 366 days ahead); with
        `queue_timeout_seconds`, a task whose first attempt has not started that long after
        it became runnable ends FAILED with error code QUEUE_TIMEOUT.

        A `request_id` is made up when none is given, which makes the call safe to retry:
        it is retried on UNAVAILABLE, and a retry never makes a second task. Pass
        `request_id=""` to opt out (no retry then). `timeout` bounds the whole call,
        retries included (default: the client's).
        """
        request = _requests.create_request(
            task_type,
            parameters,
            priority=priority,
            timeout_seconds=timeout_seconds,
            max_attempts=max_attempts,
            labels=labels,
            description=description,
            request_id=request_id,
            start_at=start_at,
            start_after_seconds=start_after_seconds,
            queue_timeout_seconds=queue_timeout_seconds,
        )
        response = await self._call(
            self._stub.Create, request, timeout, retry=bool(request.request_id)
        )
        return Task._from_proto(response.task)

    async def create_many(
        self, tasks: Iterable[Mapping[str, Any]], *, timeout: float | None = None
    ) -> list[Task]:
        """Create many tasks, in order; each item holds `create`'s arguments (`task_type` at least).

        They go to the server 1,000 to a BatchCreate, which stores all of a batch or none. Each
        task gets a request_id unless it has one, so that a batch is retried on UNAVAILABLE
        without making a task twice. `timeout` bounds each batch's call, retries included.
        """
        created: list[Task] = []
        for request in _requests.batch_requests(tasks):
            retry = all(one.request_id for one in request.requests)
            response = await self._call(self._stub.BatchCreate, request, timeout, retry=retry)
            created += (Task._from_proto(task) for task in response.tasks)
        return created

    async def get(
        self, task_id: str, *, include_attempts: bool = False, timeout: float | None = None
    ) -> Task:
        """The task as it stands; with `include_attempts`, its history of ended attempts too
        (`Task.attempts`). `timeout` bounds the whole call, retries included."""
        request = pb.GetRequest(task_id=task_id, include_attempts=include_attempts)
        response = await self._call(self._stub.Get, request, timeout, retry=True)
        return Task._from_proto(response.task, with_attempts=include_attempts)

    async def list(
        self,
        *,
        statuses: Iterable[TaskStatus] | None = None,
        task_type: str | None = None,
        labels: Mapping[str, str] | None = None,
        task_id_prefix: str | None = None,
        newest_first: bool = False,
        page_size: int | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Task]:
        """Every task that matches, oldest first (`newest_first`: the latest created first),
        fetched a page at a time as you iterate.

        A task matches when its status is one of `statuses` (any, if None), its type is
        `task_type`, it carries all of `labels` and its id starts with `task_id_prefix`
        (hex digits and '-', in either case). Newest first, a task created after the first
        page is not listed. `timeout` bounds the call for each page, retries included.
        """
        task_filter = _requests.task_filter(statuses, task_type, labels, task_id_prefix)
        request = _requests.list_request(task_filter, page_size, newest_first)
        async for page in self._pages(request, timeout):
            for task in page.tasks:
                yield Task._from_proto(task)

    async def cancel(self, task_id: str, *, reason: str = "", timeout: float | None = None) -> Task:
        """Cancel a task; returns it CANCELLED, or still RUNNING with `cancel_requested_at` set.

        A running task ends CANCELLED once its handler stops (watch or wait for that).
        Not retried. `timeout` bounds the call.
        """
        request = pb.CancelRequest(task_id=task_id, reason=reason)
        response = await self._call(self._stub.Cancel, request, timeout, retry=False)
        return Task._from_proto(response.task)

    async def pause(self, task_id: str, *, reason: str = "", timeout: float | None = None) -> Task:
        """Pause a task; returns it PAUSED if it was queued or waiting for input (it leaves
        the queue, keeping its place for `resume`). A running task whose handler can park is
        returned RUNNING with `pause_requested_at` set, and becomes PAUSED at the handler's
        next pause point; one whose handler cannot is returned RUNNING, unchanged. Not
        retried. `timeout` bounds the call."""
        request = pb.PauseRequest(task_id=task_id, reason=reason)
        response = await self._call(self._stub.Pause, request, timeout, retry=False)
        return Task._from_proto(response.task)

    async def resume(self, task_id: str, *, timeout: float | None = None) -> Task:
        """Queue a PAUSED task again, where it stood, or let its parked handler run on;
        withdraw a pause its handler has not reached; any other task is returned as it
        stands. Not retried. `timeout` bounds the call."""
        request = pb.ResumeRequest(task_id=task_id)
        response = await self._call(self._stub.Resume, request, timeout, retry=False)
        return Task._from_proto(response.task)

    async def send_input(
        self,
        task_id: str,
        data: Mapping[str, Any],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> InputSent:
        """Send an input (a dict of JSON values) to a task: kept with it, in order, for its
        handler (`ctx.wait_for_input`, `ctx.inputs`); a task waiting for input runs again.

        A `request_id` is made up when none is given, so the call is retried on UNAVAILABLE
        and a retry never keeps the input twice (`request_id=""`: no retry). `timeout`
        bounds the whole call.
        """
        request = _requests.send_input_request(task_id, data, request_id)
        response = await self._call(
            self._stub.SendInput, request, timeout, retry=bool(request.request_id)
        )
        return InputSent(response.sequence, Task._from_proto(response.task))

    async def cancel_matching(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        task_type: str | None = None,
        task_id_prefix: str | None = None,
        statuses: Iterable[TaskStatus] | None = None,
        reason: str = "",
        dry_run: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Cancel every unfinished task that matches (labels, type or id prefix: at least
        one), each as `cancel` would; how many were cancelled, or with `dry_run`, would be.

        The tasks are those that match when the server takes the call. Not retried (a
        dry run is). `timeout` bounds the call.
        """
        request = _requests.cancel_matching_request(
            task_type, labels, task_id_prefix, statuses, reason, dry_run
        )
        response = await self._call(self._stub.CancelMatching, request, timeout, retry=dry_run)
        return response.count

    async def rerun(
        self, task_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> Task:
        """Create a new task (CREATED) from the request of a task that ended, with
        `rerun_of` naming it; FailedPrecondition if it has not ended.

        The new task has the ended one's type, parameters, priority, timeouts, attempts and
        labels, and starts at once. A `request_id` is made up when none is given, so the
        call is retried on UNAVAILABLE and a retry never makes a second task
        (`request_id=""`: no retry). `timeout` bounds the whole call, retries included.
        """
        request = _requests.rerun_request(task_id, request_id)
        response = await self._call(
            self._stub.Rerun, request, timeout, retry=bool(request.request_id)
        )
        return Task._from_proto(response.task)

    async def delete(self, task_id: str, *, timeout: float | None = None) -> Task:
        """Delete a task that ended: it is gone from get, list and watches (NotFound from
        then on), watchers get a REMOVED event, and its request_id is free again. Returns
        its last state; FailedPrecondition if it has not ended. Not retried. `timeout`
        bounds the call."""
        request = pb.DeleteRequest(task_id=task_id)
        response = await self._call(self._stub.Delete, request, timeout, retry=False)
        return Task._from_proto(response.task)

    async def list_task_types(self, *, timeout: float | None = None) -> tuple[TaskType, ...]:
        """The task types the server knows, by name, each with the workers that serve it
        now: the server's own handlers, and this tenant's connected workers. `timeout`
        bounds the whole call, retries included."""
        request = pb.ListTaskTypesRequest()
        response = await self._call(self._stub.ListTaskTypes, request, timeout, retry=True)
        return tuple(TaskType._from_proto(task_type) for task_type in response.task_types)

    async def count_tasks(
        self,
        *,
        statuses: Iterable[TaskStatus] | None = None,
        task_type: str | None = None,
        timeout: float | None = None,
    ) -> TaskCounts:
        """How many tasks there are by type and status (of `statuses` and `task_type` only,
        if given), counted by the server without listing them. `timeout` bounds the whole
        call, retries included."""
        task_filter = _requests.task_filter(statuses, task_type, None)
        request = pb.CountTasksRequest(filter=task_filter)
        response = await self._call(self._stub.CountTasks, request, timeout, retry=True)
        return TaskCounts._from_proto(response)

    async def revision(self, *, timeout: float | None = None) -> int:
        """The server's latest revision: a `watch_all` from it sees every change made after.

        `timeout` bounds the whole call, retries included.
        """
        response = await self._call(
            self._stub.List, _requests.REVISION_REQUEST, timeout, retry=True
        )
        return response.revision

    async def watch(self, task_id: str, *, timeout: float | None = None) -> AsyncIterator[Task]:
        """The task's states: the current one, then each change, ending after the terminal one.

        A broken stream is re-opened with backoff (for up to the client's timeout) and
        resumes after the last revision seen: no state is missed or repeated. `timeout`
        bounds the whole watch (None: until the task ends); DeadlineExceeded when it passes.
        """
        async for task in self._follow(self._task_watch(task_id, timeout)):
            yield task

    async def watch_all(
        self,
        *,
        statuses: Iterable[TaskStatus] | None = None,
        task_type: str | None = None,
        labels: Mapping[str, str] | None = None,
        task_id_prefix: str | None = None,
        since_revision: int | None = None,
        start_with: Iterable[TaskStatus] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[TaskEvent]:
        """Each change to a task that matches (the filters of `list`), as a TaskEvent.

        It starts after `since_revision` (default: the latest revision when iteration
        begins) and never ends on its own. With `start_with` (statuses, such as RUNNING;
        not with `since_revision`), it first passes on the matching tasks in those
        statuses as they stand, as CURRENT events, then every change after the List that
        read them: none is missed between. It resumes like `watch`; when the server's
        history no longer reaches back, it lists the matching tasks again and passes on
        (as CHANGED) those that changed meanwhile. `timeout` bounds the whole watch.
        """
        start = _requests.start_statuses(statuses, start_with, since_revision)
        if since_revision is None and start is None:
            since_revision = await self.revision(timeout=timeout)
        watch = self._all_tasks_watch(
            statuses, task_type, labels, task_id_prefix, since_revision, start, timeout
        )
        async for event in self._follow(watch):
            yield event

    async def wait(self, task_id: str, *, timeout: float | None = None) -> Task:
        """The task in its terminal state, once it has one.

        It watches the task, and polls instead (see `poll`) if the server refuses to let
        it watch. `timeout` bounds the whole wait (None: no limit); WaitTimeout, a
        TimeoutError, when it passes.
        """
        watch = self._task_watch(task_id, timeout)
        try:
            async for _ in self._follow(watch):
                pass
        except RpcError as error:
            return await self._poll(watch.fallback(error, self._timeout))
        return watch.final()

    async def poll(
        self,
        task_id: str,
        *,
        timeout: float | None = None,
        initial: float = 1.0,
        multiplier: float = 1.5,
        maximum: float = 30.0,
    ) -> Task:
        """The task in its terminal state, found by getting it again and again.

        The first pause is `initial` seconds, each next one `multiplier` times longer, at most
        `maximum`, counted from the start of each Get. `timeout` bounds the whole wait
        (None: no limit); WaitTimeout, a TimeoutError, when it passes.
        """
        return await self._poll(self._polling(task_id, timeout, initial, multiplier, maximum))

    async def result(self, task_id: str, *, timeout: float | None = None) -> Any:
        """The result of the task once it COMPLETED; TaskFailed or TaskCancelled otherwise.

        `timeout` bounds the whole wait, as in `wait`.
        """
        return outcome(await self.wait(task_id, timeout=timeout))

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        timeout: float | None,
        *,
        retry: bool,
    ) -> Response:
        """One unary call, retried on UNAVAILABLE if `retry`, within `timeout` (or the default)."""
        deadline = self._deadline(timeout)
        backoff = self._backoff(retry, deadline)
        while True:
            try:
                metadata = traced(self._metadata)
                return await method(request, timeout=deadline.remaining(), metadata=metadata)
            except grpc.RpcError as error:
                delay = backoff.delay_after(error)
                if delay is None:
                    reported = backoff.reported(error)
                    raise from_rpc_error(reported) from reported
            await asyncio.sleep(delay)

    async def _pages(
        self, request: pb.ListRequest, timeout: float | None
    ) -> AsyncIterator[pb.ListResponse]:
        while True:
            page = await self._call(self._stub.List, request, timeout, retry=True)
            yield page
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def _follow(self, watch: Watch[Item]) -> AsyncIterator[Item]:
        """Drive a watch: open the stream, pass on what it yields, re-open it when it breaks."""
        while not watch.done:
            if (relist := watch.relist_request()) is not None:
                async for page in self._pages(relist, watch.deadline.cap(self._timeout)):
                    for listed in watch.relisted(page):
                        yield listed
            call = self._stub.Watch(
                watch.request(), timeout=watch.deadline.remaining(), metadata=traced(self._metadata)
            )
            error = None
            try:
                async for response in call:
                    item = watch.receive(response)
                    if item is not None:
                        yield item
                    if watch.done:
                        return
            except grpc.RpcError as caught:
                error = caught
            finally:
                call.cancel()
            await asyncio.sleep(watch.broken(error))

    async def _poll(self, polling: Polling) -> Task:
        while True:
            timeout = polling.start()
            try:
                task = await self.get(polling.task_id, timeout=timeout)
            except DeadlineExceeded as error:
                polling.timed_out(error)
                raise
            if polling.ended(task):
                return task
            await asyncio.sleep(polling.pause())
