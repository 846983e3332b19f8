// The official phoenix client as the test suites drive it: sockets that `closeAll` ends,
// joins and pushes as promises, the next event that matches, and waiting for a condition.
import { Socket } from "phoenix";
import WebSocket from "ws";

const open = [];

/// A connected socket to the daemon at `base` (http://…), ended by `closeAll`.
export function connect(base, opts = {}) {
  const socket = new Socket(base.replace(/^http/, "ws") + "/socket", { transport: WebSocket, ...opts });
  socket.connect();
  open.push(socket);
  return socket;
}

export function closeAll() {
  open.forEach((s) => s.disconnect());
}

/// The join's reply, or a rejection carrying the refusal as `response`.
export function join(channel) {
  return new Promise((resolve, reject) => {
    channel
      .join()
      .receive("ok", resolve)
      .receive("error", (e) => reject(Object.assign(new Error(`join refused: ${JSON.stringify(e)}`), { response: e })))
      .receive("timeout", () => reject(new Error("join timed out")));
  });
}

/// The refusal of a join that must be refused (its automatic rejoins stopped).
export function refusal(channel) {
  return new Promise((resolve, reject) => {
    channel
      .join()
      .receive("ok", () => reject(new Error("join should have been refused")))
      .receive("error", (e) => {
        channel.leave();
        resolve(e);
      });
  });
}

/// `{status, response}` of a push.
export function push(channel, event, payload) {
  return new Promise((resolve) => {
    channel
      .push(event, payload)
      .receive("ok", (r) => resolve({ status: "ok", response: r }))
      .receive("error", (r) => resolve({ status: "error", response: r }))
      .receive("timeout", () => resolve({ status: "timeout" }));
  });
}

/// The next `event` on `channel` whose payload `pred` accepts.
export function next(channel, event, pred = () => true) {
  return new Promise((resolve) => {
    const ref = channel.on(event, (payload) => {
      if (pred(payload)) {
        channel.off(event, ref);
        resolve(payload);
      }
    });
  });
}

/// Runs `check` until it stops throwing, for up to `ms`.
export async function eventually(check, what, ms = 5000) {
  const until = Date.now() + ms;
  for (;;) {
    try {
      return await check();
    } catch (e) {
      if (Date.now() > until) throw new Error(`${what}: ${e.message}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}
