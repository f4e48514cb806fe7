#!/usr/bin/env node
// A hostagent client in Node.js: follows one agent's snapshot stream and fetches
// snapshots from its request endpoint, as docs/wire.md describes (section numbers below
// are that page's). It prints one line per accepted snapshot:
//
//   snapshot host=h1 epoch=3f2a... seq=7 via=stream enc=zlib bytes=46712 inflated=310211
//            time=1767000000.123 cells=8 threads=448 guests=200 free_pcpus=c0:40,c1:38 libvirt=up
//
// and one line for every other thing that happened: gap, stale, reset, dead, bad,
// reconnect (with --verbose also heartbeat and duplicate).
//
//   node client.mjs --stream tcp://10.0.0.5:6510 --request tcp://10.0.0.5:6511
//                   [--host NAME] [--count N] [--timeout S] [--max-bytes N]
//                   [--dead-after S] [--request-timeout S]
//                   [--server-key agent.key --client-key me.key_secret] [--verbose]
//                   [--dump DIR]
//
// --count N stops after N snapshots (default 0: run until killed); --timeout S gives up
// after S seconds (default 0: never); --max-bytes N is the frame and inflate limit
// (default 8 MiB); --dump DIR also writes each snapshot as DIR/<host>-<epoch>-<seq>.json.
// Exit status: 0 after --count snapshots, 1 when --timeout passes first
// or the fetch at start fails, 2 for bad arguments.

import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { decode, encode } from "@msgpack/msgpack";
import { Inflate } from "pako";
import * as zmq from "zeromq";

const VERSION = 1; // body and reply "v" (§4, §6)
const TOPIC_PREFIX = "hostagent."; // topics are "hostagent.<host>." (§4)
const MAX_SEQ = Number.MAX_SAFE_INTEGER; // 2^53 - 1: wire.MAX_SEQ (§4)
const DEFAULT_MAX_BYTES = 8 * 1024 * 1024; // wire.DEFAULT_MAX_MESSAGE_BYTES (§9)
const INFLATE_CHUNK_BYTES = 64 * 1024; // the inflater's output piece: memory stays <= limit + this
const RECONNECT_GRACE_MS = 500; // a drop libzmq does not retry by then is reconnected (§8)
const RECONNECT_MAX_MS = 30000; // waiting twice as long each time in a row, up to this

class WireError extends Error {}

// --- options ---------------------------------------------------------------------------

function options() {
  const spec = {
    stream: { type: "string" }, request: { type: "string" }, host: { type: "string" },
    count: { type: "string", default: "0" }, timeout: { type: "string", default: "0" },
    "max-bytes": { type: "string", default: String(DEFAULT_MAX_BYTES) },
    "dead-after": { type: "string", default: "5" },
    "request-timeout": { type: "string", default: "3" },
    "server-key": { type: "string" }, "client-key": { type: "string" },
    verbose: { type: "boolean", default: false }, dump: { type: "string" },
  };
  let values;
  try {
    ({ values } = parseArgs({ options: spec, strict: true }));
  } catch (err) {
    usage(err.message);
  }
  if (!values.stream) usage("--stream ENDPOINT is required");
  const number = (name, min) => {
    const n = Number(values[name]);
    if (!Number.isFinite(n) || n < min) usage(`--${name} ${values[name]}: must be a number >= ${min}`);
    return n;
  };
  if (Boolean(values["server-key"]) !== Boolean(values["client-key"])) {
    usage("--server-key and --client-key go together");
  }
  return {
    stream: values.stream, request: values.request ?? null, host: values.host ?? null,
    count: number("count", 0), timeout: number("timeout", 0),
    maxBytes: number("max-bytes", 1024), deadAfter: number("dead-after", 0.1),
    requestTimeout: number("request-timeout", 0.1), verbose: values.verbose,
    dump: values.dump ?? null,
    curve: values["server-key"] ? curveOptions(values["server-key"], values["client-key"]) : {},
  };
}

function usage(message) {
  process.stderr.write(`client.mjs: ${message}\n`);
  process.exit(2);
}

// A ZeroMQ certificate (as `hostagent keys` writes): `public-key = "<z85>"` and, in a
// .key_secret file, `secret-key = "<z85>"` (§10).
function certificateKey(path, name) {
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    usage(`${path}: ${err.message}`);
  }
  const m = text.match(new RegExp(`^\\s*${name}\\s*=\\s*"([^"]{40})"`, "m"));
  if (!m) usage(`${path}: no ${name} of 40 z85 characters`);
  return m[1];
}

function curveOptions(serverKeyFile, clientKeyFile) {
  return {
    curveServerKey: certificateKey(serverKeyFile, "public-key"),
    curvePublicKey: certificateKey(clientKeyFile, "public-key"),
    curveSecretKey: certificateKey(clientKeyFile, "secret-key"),
  };
}

// --- decoding (§3, §4) -----------------------------------------------------------------

function isMap(x) {
  return typeof x === "object" && x !== null && !Array.isArray(x) && !(x instanceof Uint8Array);
}

// One msgpack document, every length bounded by the payload's size.
function unpack(payload, maxBytes) {
  if (payload.length > maxBytes) {
    throw new WireError(`message of ${payload.length} bytes is over the limit of ${maxBytes} bytes`);
  }
  const n = payload.length;
  try {
    return decode(payload, { maxStrLength: n, maxBinLength: n, maxArrayLength: n, maxMapLength: n,
                             maxExtLength: 0 });
  } catch (err) {
    throw new WireError(`not valid msgpack: ${err.message}`);
  }
}

// zlib-inflate `data`, never producing more than `limit` bytes: the inflater hands its
// output over in pieces and the first piece over the limit stops it (a small message
// can inflate to gigabytes).
function inflateLimited(data, limit) {
  const inflater = new Inflate({ windowBits: 15, chunkSize: INFLATE_CHUNK_BYTES }); // zlib only
  const pieces = [];
  let total = 0;
  inflater.onData = (piece) => {
    total += piece.length;
    if (total > limit) throw new WireError(`body.data inflates to over the limit of ${limit} bytes`);
    pieces.push(piece);
  };
  inflater.onEnd = (status) => { inflater.err = status; inflater.msg = inflater.strm.msg; };
  inflater.push(data, true);
  if (inflater.err) throw new WireError(`body.data is not valid zlib: ${inflater.msg || inflater.err}`);
  if (!inflater.ended) throw new WireError("body.data is truncated zlib");
  const out = new Uint8Array(total);
  let at = 0;
  for (const piece of pieces) {
    out.set(piece, at);
    at += piece.length;
  }
  return out;
}

// The checks of wire.check_body: a version-1 body of a known kind, with a host, an
// epoch, a seq from 0 to 2^53 - 1 and a time. A 64-bit seq beyond 2^53 - 1 decodes to a
// double >= 2^53 here, so the range check holds after rounding too.
function checkBody(body) {
  if (!isMap(body)) throw new WireError("body is not a map");
  if (body.v !== VERSION) throw new WireError(`body.v = ${body.v}: only version ${VERSION} is understood`);
  if (body.kind !== "snapshot" && body.kind !== "heartbeat") {
    throw new WireError(`body.kind = ${JSON.stringify(body.kind)}: must be snapshot or heartbeat`);
  }
  for (const key of ["host", "epoch"]) {
    if (typeof body[key] !== "string" || body[key] === "") {
      throw new WireError(`body.${key}: must be a non-empty string`);
    }
  }
  if (!Number.isInteger(body.seq) || body.seq < 0 || body.seq > MAX_SEQ) {
    throw new WireError(`body.seq = ${body.seq}: must be an integer from 0 to ${MAX_SEQ}`);
  }
  if (typeof body.time !== "number" || !Number.isFinite(body.time)) {
    throw new WireError("body.time: must be a number");
  }
  if (body.kind === "snapshot") checkSnapshot(body.data, body);
  else if (body.data !== null) throw new WireError("body.data of a heartbeat must be nil");
  return body;
}

// The top of wire.check_snapshot (docs/schema.md, "What a subscriber accepts").
function checkSnapshot(data, body) {
  if (!isMap(data)) throw new WireError("body.data of a snapshot must be a map");
  if (data.schema !== 1) throw new WireError(`data.schema = ${data.schema}: only schema 1 is understood`);
  for (const key of ["topology", "config", "usage"]) {
    if (!isMap(data[key])) throw new WireError(`data.${key} is missing or not a map`);
  }
  for (const key of ["host", "epoch", "seq"]) {
    if (key in data && data[key] !== body[key]) {
      throw new WireError(`data.${key} = ${data[key]} but the message says ${body[key]}`);
    }
  }
}

// One stream message: [topic, msgpack(body)]; a compressed body has enc: "zlib" (which
// may come after data in the map) and data = bin zlib(msgpack(snapshot)).
function decodeStream(frames, maxBytes) {
  if (frames.length !== 2) throw new WireError(`stream message has ${frames.length} frames, expected 2`);
  const topic = frames[0];
  const prefix = Buffer.from(TOPIC_PREFIX);
  if (topic.length <= prefix.length + 1 || !topic.subarray(0, prefix.length).equals(prefix)
      || topic[topic.length - 1] !== 0x2e) {
    throw new WireError("topic is not hostagent.<host>.");
  }
  let host;
  try {
    host = new TextDecoder("utf-8", { fatal: true }).decode(topic.subarray(prefix.length, -1));
  } catch {
    throw new WireError("topic is not UTF-8");
  }
  const body = unpack(frames[1], maxBytes);
  const info = { bytes: frames[1].length, enc: "none", inflated: null };
  if (isMap(body) && "enc" in body) {
    if (body.enc !== "zlib") throw new WireError(`body.enc = ${JSON.stringify(body.enc)}: must be zlib`);
    if (!(body.data instanceof Uint8Array)) throw new WireError("body.data of a zlib body must be bin");
    const packed = inflateLimited(body.data, maxBytes);
    body.data = unpack(packed, maxBytes);
    delete body.enc;
    info.enc = "zlib";
    info.inflated = packed.length;
  }
  checkBody(body);
  if (body.host !== host) throw new WireError(`topic names host ${host} but the body says ${body.host}`);
  return { body, info };
}

// --- requests (§6) ---------------------------------------------------------------------

// One request on a fresh DEALER; the reply map, or a WireError.
async function request(opts, req) {
  const dealer = new zmq.Dealer({ linger: 0, maxMessageSize: opts.maxBytes,
                                  sendTimeout: opts.requestTimeout * 1000,
                                  receiveTimeout: opts.requestTimeout * 1000, ...opts.curve });
  dealer.connect(opts.request);
  try {
    await dealer.send(encode(req));
    let frames;
    try {
      frames = await dealer.receive();
    } catch (err) {
      if (err.code === "EAGAIN") throw new WireError(`${opts.request}: no reply within ${opts.requestTimeout} s`);
      throw err;
    }
    const reply = unpack(frames[frames.length - 1], opts.maxBytes);
    if (!isMap(reply) || reply.v !== VERSION || typeof reply.ok !== "boolean") {
      throw new WireError("reply is not a {v: 1, ok: bool, ...} map");
    }
    if (!reply.ok) throw new WireError(`${opts.request}: ${reply.error}`);
    return reply;
  } finally {
    dealer.close();
  }
}

// {op: "snapshot"}: the latest stream body plus ok (data never compressed).
async function fetchSnapshot(opts) {
  const reply = await request(opts, { op: "snapshot" });
  delete reply.ok;
  return checkBody(reply);
}

// --- the per-host rules (§5) -----------------------------------------------------------

class Follower {
  constructor(opts) {
    this.opts = opts;
    this.hosts = new Map(); // host -> {epoch, seq, stale, alive, lastSeen}
    this.snapshots = 0;
    this.reconnects = 0; // library reconnects since the last snapshot from the stream
  }

  say(event, fields) {
    const text = Object.entries(fields).map(([k, v]) => `${k}=${v}`).join(" ");
    process.stdout.write(`${event} ${text}\n`);
  }

  // Apply one checked body; returns "stale" when a snapshot must be fetched.
  feed(body, via, info = { bytes: null, enc: "none", inflated: null }) {
    const now = Date.now() / 1000;
    let st = this.hosts.get(body.host);
    if (st === undefined) {
      st = { epoch: body.epoch, seq: -1, stale: false, alive: true, lastSeen: now };
      this.hosts.set(body.host, st);
    }
    st.lastSeen = now;
    st.alive = true;
    if (body.epoch !== st.epoch) { // the agent restarted: forget everything
      this.say("reset", { host: body.host, epoch: body.epoch, was: st.epoch });
      Object.assign(st, { epoch: body.epoch, seq: -1, stale: false });
    }
    if (body.kind === "heartbeat") {
      if (this.opts.verbose) this.say("heartbeat", { host: body.host, seq: body.seq });
      if (body.seq > st.seq && (body.seq > 0 || st.seq >= 0) && !st.stale) {
        st.stale = true; // a snapshot was published that we did not get
        this.say("stale", { host: body.host, held: st.seq, heard: body.seq });
        return "stale";
      }
      return null;
    }
    if (body.seq <= st.seq) {
      if (this.opts.verbose) this.say("duplicate", { host: body.host, seq: body.seq, via });
      return null;
    }
    if (st.seq >= 0 && body.seq > st.seq + 1) {
      this.say("gap", { host: body.host, after: st.seq, got: body.seq });
    }
    st.seq = body.seq;
    st.stale = false;
    this.snapshots += 1;
    this.say("snapshot", { host: body.host, epoch: body.epoch, seq: body.seq, via, ...summary(body, info) });
    if (this.opts.dump) {
      const name = `${body.host}-${body.epoch}-${body.seq}.json`.replace(/[^\w.-]/g, "_");
      writeFileSync(join(this.opts.dump, name), JSON.stringify(body.data));
    }
    return null;
  }

  expire() {
    const now = Date.now() / 1000;
    for (const [host, st] of this.hosts) {
      if (st.alive && now - st.lastSeen > this.opts.deadAfter) {
        st.alive = false;
        this.say("dead", { host, seq: st.seq });
      }
    }
  }
}

function summary(body, info) {
  const { topology, usage } = body.data;
  const cells = Array.isArray(usage.cells) ? usage.cells : [];
  const libvirt = body.data.agent?.libvirt?.connected;
  return {
    enc: info.enc, bytes: info.bytes ?? "-", inflated: info.inflated ?? "-", time: body.time,
    cells: Array.isArray(topology.cells) ? topology.cells.length : 0,
    threads: Array.isArray(usage.threads) ? usage.threads.length : 0,
    guests: Array.isArray(usage.guests) ? usage.guests.length : 0,
    free_pcpus: cells.map((c) => `c${c.id}:${c.free_pcpus}`).join(",") || "-",
    libvirt: libvirt === undefined ? "-" : libvirt ? "up" : "down",
  };
}

// --- main ------------------------------------------------------------------------------

// libzmq drops a connection that breaks the protocol (a frame over maxMessageSize) and
// never retries it; any other drop is followed by its own retry (§8). Reconnects in a
// row with no snapshot in between wait twice as long each time.
function reconnectDropped(sub, endpoint, follower) {
  let timer = null;
  sub.events.on("disconnect", () => {
    clearTimeout(timer);
    const wait = Math.min(RECONNECT_MAX_MS, RECONNECT_GRACE_MS * 2 ** Math.min(follower.reconnects, 16));
    timer = setTimeout(() => {
      follower.reconnects += 1;
      follower.say("reconnect", { endpoint, in_a_row: follower.reconnects });
      try { sub.disconnect(endpoint); } catch { /* its session is already gone */ }
      sub.connect(endpoint);
    }, wait);
  });
  for (const retried of ["connect:retry", "connect:delay", "connect"]) {
    sub.events.on(retried, () => clearTimeout(timer));
  }
}

async function main() {
  const opts = options();
  const follower = new Follower(opts);
  if (opts.timeout > 0) {
    setTimeout(() => {
      process.stderr.write(`client.mjs: ${follower.snapshots} of ${opts.count} snapshots within ${opts.timeout} s\n`);
      process.exit(1);
    }, opts.timeout * 1000);
  }
  const done = () => opts.count > 0 && follower.snapshots >= opts.count;
  // Late join (§5): a fetch gives the picture now; the subscription that follows also
  // gets the agent's welcome re-publish of the same seq, dropped as a duplicate.
  if (opts.request) {
    try {
      follower.feed(await fetchSnapshot(opts), "fetch");
    } catch (err) {
      process.stderr.write(`client.mjs: fetch from ${opts.request} failed: ${err.message}\n`);
      process.exit(1);
    }
  }
  const sub = new zmq.Subscriber({
    linger: 0, maxMessageSize: opts.maxBytes, receiveHighWaterMark: 10000,
    heartbeatInterval: 1000, heartbeatTimeout: 3000, receiveTimeout: 250, ...opts.curve,
  });
  reconnectDropped(sub, opts.stream, follower);
  sub.connect(opts.stream);
  sub.subscribe(opts.host ? `${TOPIC_PREFIX}${opts.host}.` : TOPIC_PREFIX);
  while (!done()) {
    let frames;
    try {
      frames = await sub.receive();
    } catch (err) {
      if (err.code !== "EAGAIN") throw err;
      follower.expire();
      continue;
    }
    let decoded;
    try {
      decoded = decodeStream(frames, opts.maxBytes);
    } catch (err) {
      if (!(err instanceof WireError)) throw err;
      follower.say("bad", { reason: JSON.stringify(err.message) });
      continue;
    }
    if (decoded.body.kind === "snapshot") follower.reconnects = 0; // a whole snapshot got through
    if (follower.feed(decoded.body, "stream", decoded.info) === "stale" && opts.request) {
      try {
        follower.feed(await fetchSnapshot(opts), "fetch");
      } catch (err) {
        if (!(err instanceof WireError)) throw err;
        follower.say("fetch_failed", { reason: JSON.stringify(err.message) });
      }
    }
    follower.expire();
  }
  sub.close();
  process.exit(0);
}

await main();
