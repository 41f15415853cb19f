// Preloaded into Portkey's gateway (`node --import THIS build/start-server.js ...`) by
// bench/benchlib/portkey.py: it makes every server that listens on a port without naming
// a host listen on 127.0.0.1 instead of every interface.
//
// Why: Portkey's start-server.js calls @hono/node-server's `serve({fetch, port})` with no
// hostname and has no option for one, so it would listen on all interfaces; the benchmark
// keeps every listener on loopback.

import net from "node:net";

const listen = net.Server.prototype.listen;

net.Server.prototype.listen = function (...args) {
  const [first] = args;
  if (typeof first === "number" || (typeof first === "string" && /^\d+$/.test(first))) {
    if (args.length < 2 || args[1] === undefined || args[1] === null) {
      args[1] = "127.0.0.1";
    } else if (typeof args[1] === "string") {
      args[1] = "127.0.0.1";
    } else {
      args.splice(1, 0, "127.0.0.1"); // (port, backlog or callback) -> (port, host, ...)
    }
  } else if (first && typeof first === "object" && "port" in first && !("path" in first)) {
    args[0] = { ...first, host: "127.0.0.1" };
  }
  return listen.apply(this, args);
};
