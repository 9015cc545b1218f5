"""The caps of the contract on what a task carries: the server refuses more, and a worker
(the local one, or `conveyor.worker.Worker`) checks them before it sends."""

from __future__ import annotations

KIB = 1024
MIB = 1024 * KIB

MAX_PARAMETERS_BYTES = 1 * MIB  # a TaskRequest's parameters, encoded
MAX_RESULT_BYTES = 1 * MIB  # an attempt's result, encoded as a google.protobuf.Value
MAX_DETAIL_BYTES = 64 * KIB  # a progress report's detail, encoded as a Struct
MAX_MESSAGE = 4096  # characters of a progress message, or of an error's message
MAX_JSON_DEPTH = 32  # nesting of parameters, results and details (protobuf parses 100 levels)
MAX_ERROR_TYPE = 256  # characters of an error's type (an exception's qualified class name)
# A failed attempt's traceback, UTF-8: its last 16 KiB are kept (the exception and the
# innermost frames), enough for any sane stack, and small beside what a task may carry.
MAX_TRACEBACK_BYTES = 16 * KIB
MAX_RETRY_DELAY = 366 * 24 * 3600.0  # seconds a handler may put off its next attempt
