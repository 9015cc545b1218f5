// A conveyor worker in JavaScript (@grpc/grpc-js), written from the comments of
// protos/conveyor/v1/worker_service.proto alone: the session stream, Report, Renew,
// Finish and Drain.
//
//   node worker.js --server 127.0.0.1:50051 [--worker-id ID] [--slots N]
//
// It runs three task types: node.greet (reports progress, returns a greeting),
// node.fail (fails with error code GREETING_REFUSED, not to be retried) and node.wait
// (runs until it is told to stop, then ends with error code STOPPED). SIGTERM drains.
"use strict";

const os = require("os");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.join(__dirname, "..", "..", "protos");
const definition = protoLoader.loadSync("conveyor/v1/worker_service.proto", {
  includeDirs: [PROTOS],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const conveyor = grpc.loadPackageDefinition(definition).conveyor.v1;

function option(name, fallback) {
  const index = process.argv.indexOf(name);
  return index >= 0 ? process.argv[index + 1] : fallback;
}

const server = option("--server", "127.0.0.1:50051");
const workerId = option("--worker-id", `${os.hostname()}/${process.pid}/node`);
const slots = Number(option("--slots", "4"));
const client = new conveyor.WorkerService(server, grpc.credentials.createInsecure());

// --- google.protobuf.Value and Struct, as plain JavaScript ---------------------------
// (proto-loader names the fields of the well-known types in camelCase, whatever keepCase.)
function fromValue(value) {
  switch (value.kind) {
    case "numberValue": return value.numberValue;
    case "stringValue": return value.stringValue;
    case "boolValue": return value.boolValue;
    case "structValue": return fromStruct(value.structValue);
    case "listValue": return value.listValue.values.map(fromValue);
    default: return null;
  }
}
function fromStruct(struct) {
  const out = {};
  for (const [key, value] of Object.entries(struct.fields || {})) out[key] = fromValue(value);
  return out;
}
function toValue(data) {
  if (data === null || data === undefined) return { nullValue: "NULL_VALUE" };
  if (typeof data === "number") return { numberValue: data };
  if (typeof data === "string") return { stringValue: data };
  if (typeof data === "boolean") return { boolValue: data };
  if (Array.isArray(data)) return { listValue: { values: data.map(toValue) } };
  return { structValue: toStruct(data) };
}
function toStruct(data) {
  const fields = {};
  for (const [key, value] of Object.entries(data)) fields[key] = toValue(value);
  return { fields };
}
const seconds = (duration) => Number(duration.seconds) + duration.nanos / 1e9;
const call = (method, request) =>
  new Promise((resolve, reject) =>
    client[method](request, (error, answer) => (error ? reject(error) : resolve(answer))));

// --- the handlers -----------------------------------------------------------------------
class Failure extends Error {
  constructor(code, message, noRetry) {
    super(message);
    this.code = code;
    this.noRetry = noRetry;
  }
}
const handlers = {
  async "node.greet"(attempt) {
    const name = attempt.parameters.name || "world";
    await attempt.report({ progress: 0.5, message: `greeting ${name}` });
    return { greeting: `hello, ${name}`, attempt: attempt.number };
  },
  async "node.fail"(attempt) {
    throw new Failure("GREETING_REFUSED", `no greeting for ${attempt.parameters.name}`, true);
  },
  async "node.wait"(attempt) {
    await attempt.report({ message: "waiting to be stopped" });
    const reason = await attempt.stopped;
    throw new Failure("STOPPED", `stopped: ${reason}`, false);
  },
};

// --- the session ------------------------------------------------------------------------
const held = new Map(); // task_id -> {lease, stop}
let renewing = null;
let draining = false;

function run(assignment) {
  const task = assignment.task;
  const lease = { task_id: task.task_id, lease_id: assignment.lease_id };
  let stop;
  const stopped = new Promise((resolve) => (stop = resolve));
  held.set(task.task_id, { lease, stop });
  const attempt = {
    number: task.attempt,
    parameters: fromStruct(task.parameters || { fields: {} }),
    stopped,
    report: ({ progress, message }) =>
      call("Report", { lease, progress, message }).catch(() => {}), // progress is best effort
  };
  Promise.resolve()
    .then(() => handlers[task.task_type](attempt))
    .then(
      (result) => ({ lease, result: toValue(result) }),
      (error) => ({
        lease,
        error: {
          code: error.code && /^[A-Z][A-Z0-9_]*$/.test(error.code) ? error.code : "HANDLER_ERROR",
          message: String(error.message).slice(0, 4096),
          no_retry: Boolean(error.noRetry),
        },
      }),
    )
    .then((finish) => finishUntilAnswered(finish))
    .finally(() => held.delete(task.task_id));
}

async function finishUntilAnswered(request) {
  for (let delay = 100; ; delay = Math.min(delay * 2, 5000)) {
    try {
      return await call("Finish", request);
    } catch (error) {
      if (error.code !== grpc.status.UNAVAILABLE) return null; // LEASE_NOT_HELD: it is over
      await new Promise((resolve) => setTimeout(resolve, Math.random() * delay));
    }
  }
}

function connect() {
  const held_leases = [...held.values()].map((attempt) => attempt.lease);
  const stream = client.Connect({
    worker_id: workerId,
    task_types: Object.keys(handlers),
    slots,
    held: held_leases,
    batch_assignments: true, // the attempts of one claim round come in one message
  });
  stream.on("data", (message) => {
    if (message.welcome) {
      const every = seconds(message.welcome.renew_interval) * 1000;
      clearInterval(renewing);
      renewing = setInterval(renew, every);
      console.error(`worker ${workerId}: connected to ${server}`);
      if (draining) call("Drain", { worker_id: workerId }).catch(() => {});
    } else if (message.assignments) {
      message.assignments.assignments.forEach(run);
    } else if (message.stop) {
      const attempt = held.get(message.stop.task_id);
      if (attempt && attempt.lease.lease_id === message.stop.lease_id) attempt.stop(message.stop.reason);
    }
  });
  stream.on("error", (error) => {
    if (error.code === grpc.status.INVALID_ARGUMENT || error.code === grpc.status.ABORTED) {
      console.error(`worker ${workerId}: refused: ${error.details}`);
      process.exit(2);
    }
    setTimeout(connect, 100 + Math.random() * 1000); // the connection broke: come back
  });
  stream.on("end", () => {
    clearInterval(renewing);
    if (draining) process.exit(0); // drained: the server ended the stream with OK
  });
}

async function renew() {
  if (held.size === 0) return;
  try {
    const answer = await call("Renew", { leases: [...held.values()].map((a) => a.lease) });
    for (const lost of answer.lost) held.get(lost.task_id)?.stop("its lease was lost");
  } catch (_) {
    // the session's end says why
  }
}

process.on("SIGTERM", () => {
  draining = true;
  call("Drain", { worker_id: workerId }).catch(() => {});
});
connect();
