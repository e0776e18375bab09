// The agent's HTTP API as the dashboard uses it: JSON reads with the bearer token, and the
// watch stream (server-sent events) read with fetch, because EventSource cannot send an
// Authorization header.

const TOKEN_KEY = 'chorus-http-token';

/** The API answered 401: a token is missing or wrong. */
export class Unauthorized extends Error {}

/** Any other error answer of the API. */
export class ApiError extends Error {
  constructor(status, message) {
    super(`${status}: ${message}`);
    this.status = status;
  }
}

/** The token of this tab, or null. */
export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** Keeps `value` as this tab's token (null or empty forgets it). */
export function setToken(value) {
  if (value) {
    sessionStorage.setItem(TOKEN_KEY, value);
  } else {
    sessionStorage.removeItem(TOKEN_KEY);
  }
}

function headers() {
  const h = {};
  const t = token();
  if (t) {
    h.Authorization = 'Bearer ' + t;
  }
  return h;
}

async function call(path, signal) {
  const r = await fetch(path, {
    headers: headers(),
    cache: 'no-store',
    credentials: 'omit',
    redirect: 'error',
    signal,
  });
  if (r.status === 401) {
    throw new Unauthorized('missing or wrong bearer token');
  }
  return r;
}

/** GET `path` as JSON. Throws Unauthorized on 401 and ApiError on another error status. */
export async function getJson(path, signal) {
  const r = await call(path, signal);
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    throw new ApiError(r.status, (body && body.error) || r.statusText);
  }
  return body;
}

/** Longest line of the event stream kept before the stream is given up (bytes of text). */
const MAX_LINE = 4 * 1024 * 1024;

/**
 * The changes under `prefix` after revision `from` (null: from now), as an async iterator of
 * `{id, event, data}` (data parsed from JSON). Ends when the stream ends; throws on an error
 * answer (ApiError with status 410 when `from` is older than the agent's change log).
 */
export async function* watch(prefix, from, signal) {
  const q = new URLSearchParams({ prefix });
  if (from !== null && from !== undefined) {
    q.set('from', String(from));
  }
  const r = await call('/v1/watch?' + q.toString(), signal);
  if (!r.ok) {
    const body = await r.json().catch(() => null);
    throw new ApiError(r.status, (body && body.error) || r.statusText);
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let event = { id: null, event: 'message', data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) {
      return;
    }
    buffer += value;
    let cut;
    while ((cut = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, cut);
      buffer = buffer.slice(cut + (buffer.startsWith('\r\n', cut) ? 2 : 1));
      if (line === '') {
        if (event.data.length > 0) {
          let data = null;
          try {
            data = JSON.parse(event.data.join('\n'));
          } catch {
            data = null;
          }
          if (data !== null) {
            yield { id: event.id, event: event.event, data };
          }
        }
        event = { id: null, event: 'message', data: [] };
        continue;
      }
      if (line.startsWith(':')) {
        continue; // a comment (the opening line, keep-alives)
      }
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let text = colon < 0 ? '' : line.slice(colon + 1);
      if (text.startsWith(' ')) {
        text = text.slice(1);
      }
      if (field === 'data') {
        event.data.push(text);
      } else if (field === 'event') {
        event.event = text;
      } else if (field === 'id') {
        event.id = text;
      }
    }
    if (buffer.length > MAX_LINE) {
      reader.cancel().catch(() => {});
      throw new Error('watch stream line too long');
    }
  }
}
