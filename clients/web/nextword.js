// nextword's browser client: an ES module, no build step.
//
//   import { NextWordSession, predict } from "/nextword.js";
//   const session = new NextWordSession();            // ws(s)://<this host>/v1/session
//   (learn: true: the session learns its user, the words typed often rising: Strip.learn)
//   (a server that wants a bearer token: new NextWordSession({ token }), predict(text, { token }))
//   (a model repository's model: new NextWordSession({ model: "name" }), predict(text, { model }))
//   const p = await session.send("it is a truth univ"); // {suggestions, completions, partial, ...}
//   await session.send("ersally ");                     // text is appended to what was sent
//   await session.send("It was", { reset: true });      // start over with this text
//
// One WebSocket is one nextword session. The gateway resumes it on the server when the
// server restarts; if the gateway itself goes away, the next send opens a new socket
// naming the session, so the server takes it up where it was.

export async function predict(text, { k = 3, base = "", token = null, model = "" } = {}) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  const reply = await fetch(`${base}/v1/predict`, {
    method: "POST",
    headers,
    body: JSON.stringify(model ? { text, k, model } : { text, k }),
  });
  const body = await reply.json();
  if (body.error) throw new NextWordError(body.error.code, body.error.message);
  return body;
}

export class NextWordError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

export class NextWordSession {
  constructor({ url = defaultUrl(), k = 3, token = null, learn = false, model = "" } = {}) {
    this.url = url;
    this.k = k;
    this.learn = learn;
    this.model = model; // a repository's model by name ("": the server's default)
    this.token = token; // read by the gateway from a socket's first message, never put in the URL
    this.sessionId = null;
    this._socket = null;
    this._waiting = []; // the resolve/reject of each request sent, in order: one reply each
    this._chain = Promise.resolve(); // requests go one at a time
  }

  send(text, { reset = false, k = this.k } = {}) {
    const next = this._chain.then(() => this._roundtrip({ text, k, reset }));
    this._chain = next.catch(() => {});
    return next;
  }

  close() {
    if (this._socket) this._socket.close();
    this._socket = null;
  }

  async _roundtrip(request) {
    const socket = await this._open();
    if (this.sessionId) request.session_id = this.sessionId; // read only by a new socket's first message
    if (this.token) request.token = this.token;
    if (this.learn) request.learn = true; // like session_id, read from a socket's first message
    if (this.model) request.model = this.model; // likewise: a session keeps the model it began on
    const reply = await new Promise((resolve, reject) => {
      this._waiting.push({ resolve, reject });
      socket.send(JSON.stringify(request));
    });
    if (reply.error) throw new NextWordError(reply.error.code, reply.error.message);
    this.sessionId = reply.session_id;
    return reply;
  }

  _open() {
    if (this._socket && this._socket.readyState === WebSocket.OPEN) return Promise.resolve(this._socket);
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(this.url);
      socket.onopen = () => {
        this._socket = socket;
        resolve(socket);
      };
      socket.onmessage = (event) => {
        const waiter = this._waiting.shift();
        if (waiter) waiter.resolve(JSON.parse(event.data));
      };
      socket.onclose = () => {
        if (this._socket === socket) this._socket = null;
        for (const waiter of this._waiting.splice(0)) {
          waiter.reject(new NextWordError("UNAVAILABLE", "the gateway closed the connection"));
        }
        reject(new NextWordError("UNAVAILABLE", `cannot reach ${this.url}`));
      };
    });
  }
}

function defaultUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/session`;
}
