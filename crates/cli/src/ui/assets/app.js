// The Chorus dashboard: members, counters as charts, a key browser and the live change feed,
// all read from this agent's own API. Every value shown comes from the cluster and is
// untrusted: it is only ever set as text (textContent), never parsed as HTML.

import { ApiError, Unauthorized, getJson, setToken, token, watch } from './api.js';
import { Chart } from './charts.js';

const POLL_MS = 1000;
const FEED_MAX = 200;
const KV_ROWS_MAX = 1000;
const VALUE_SHOWN = 160;

const $ = (id) => document.getElementById(id);

/** An element with text (or children) and attributes. */
function el(tag, text, attrs = {}) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) {
    e.textContent = String(text);
  }
  for (const [name, value] of Object.entries(attrs)) {
    e.setAttribute(name, value);
  }
  return e;
}

/** A value as text for a table cell: UTF-8 as is (shortened), binary as its size. */
function shownValue(entry) {
  if (typeof entry.value === 'string') {
    return entry.value.length > VALUE_SHOWN ? entry.value.slice(0, VALUE_SHOWN) + '…' : entry.value;
  }
  if (typeof entry.value_base64 === 'string') {
    return `(binary, ${Math.floor((entry.value_base64.length * 3) / 4)} bytes)`;
  }
  return '';
}

// ---- connection state and the token ----

let generation = 0; // bumped on every (re)start; loops of an older one stop
let controller = new AbortController();

function setStatus(text, bad = false) {
  const s = $('status');
  s.textContent = text;
  s.classList.toggle('bad', bad);
}

function needToken(message) {
  generation += 1;
  controller.abort();
  $('login').hidden = false;
  $('main').hidden = true;
  $('login-error').textContent = message || '';
  setStatus('token required', true);
  $('token').focus();
}

function failed(e) {
  if (e instanceof Unauthorized) {
    needToken(token() ? 'that token was refused' : '');
    return true;
  }
  if (e && e.name === 'AbortError') {
    return true;
  }
  setStatus(`agent unreachable: ${e && e.message ? e.message : e}`, true);
  return false;
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Runs `step` every `every` ms while `gen` is the current generation. */
async function loop(gen, every, step) {
  while (gen === generation) {
    try {
      await step();
    } catch (e) {
      if (failed(e)) {
        return;
      }
    }
    await sleep(every);
  }
}

// ---- members ----

async function members() {
  const m = await getJson('/v1/members', controller.signal);
  const list = Array.isArray(m.members) ? m.members : [];
  list.sort((a, b) => Number(a.node_id) - Number(b.node_id));
  const named = list.some((x) => typeof x.name === 'string');
  for (const th of document.querySelectorAll('#members .name-col')) {
    th.hidden = !named;
  }
  const rows = list.map((x) => {
    const tr = el('tr', null, { 'data-node-id': String(x.node_id), 'data-state': String(x.state) });
    tr.append(el('td', x.node_id, { class: 'num' }));
    if (named) {
      tr.append(el('td', typeof x.name === 'string' ? x.name : ''));
    }
    tr.append(el('td', x.state, { class: 'state' }));
    tr.append(el('td', x.addr, { class: 'mono' }));
    const offset = x.clock_offset_ms;
    tr.append(
      el('td', offset === null || offset === undefined ? '–' : `${offset} ms`, { class: 'num' }),
    );
    tr.append(el('td', x.incarnation, { class: 'num' }));
    return tr;
  });
  $('members').tBodies[0].replaceChildren(...rows);
}

// ---- counters and charts ----

/** Sum of the counters named `name` or ending in `_name` (they are prefixed by layer). */
function counter(counters, name) {
  let sum = 0;
  for (const [k, v] of Object.entries(counters || {})) {
    if ((k === name || k.endsWith('_' + name)) && typeof v === 'number') {
      sum += v;
    }
  }
  return sum;
}

const SERIES = [
  ['naks', 'naks_sent'],
  ['repairs', 'repairs_sent'],
  ['lost', 'lost_messages'],
  ['delivered', 'messages_delivered'],
];
let charts = null;
let previous = null;

async function stats() {
  const s = await getJson('/v1/stats', controller.signal);
  $('s-node').textContent = s.node_id;
  $('s-revision').textContent = s.revision;
  $('s-keys').textContent = s.keys;
  $('s-members').textContent = s.members;
  $('s-sync').textContent = s.in_sync ? 'in sync' : 'syncing';
  $('s-sync').classList.toggle('bad', !s.in_sync);
  setStatus(`live · updated ${new Date().toLocaleTimeString()}`);
  const now = performance.now();
  const values = Object.fromEntries(SERIES.map(([id, name]) => [id, counter(s.counters, name)]));
  if (previous) {
    const seconds = Math.max(0.001, (now - previous.at) / 1000);
    for (const [id] of SERIES) {
      // A counter that went down belongs to a restarted agent: no rate for that interval.
      const delta = values[id] - previous.values[id];
      charts[id].push(delta >= 0 ? delta / seconds : 0);
    }
  }
  previous = { at: now, values };
}

// ---- key browser ----

async function keys() {
  const prefix = $('kv-prefix').value;
  const list = await getJson('/v1/kv?' + new URLSearchParams({ prefix }), controller.signal);
  const entries = Array.isArray(list.entries) ? list.entries : [];
  const rows = entries.slice(0, KV_ROWS_MAX).map((e) => {
    const tr = el('tr');
    tr.append(el('td', e.key, { class: 'mono' }));
    tr.append(el('td', shownValue(e), { class: 'value' }));
    tr.append(el('td', e.version, { class: 'mono small' }));
    tr.append(el('td', e.revision, { class: 'num' }));
    return tr;
  });
  $('kv').tBodies[0].replaceChildren(...rows);
  const more = entries.length > KV_ROWS_MAX ? `, the first ${KV_ROWS_MAX} shown` : '';
  $('kv-info').textContent =
    `${entries.length} key${entries.length === 1 ? '' : 's'} under ` +
    `${JSON.stringify(prefix)} at revision ${list.revision}${more}`;
}

async function searchKeys(event) {
  event.preventDefault();
  try {
    await keys();
  } catch (e) {
    if (e instanceof ApiError) {
      $('kv-info').textContent = e.message;
    } else {
      failed(e);
    }
  }
}

// ---- live change feed ----

function addChange(change) {
  const d = change.data;
  const li = el('li', null, { class: change.event === 'delete' ? 'delete' : 'put' });
  li.append(el('span', new Date().toLocaleTimeString(), { class: 'muted small' }));
  li.append(el('span', change.event, { class: 'kind' }));
  li.append(el('span', d.key, { class: 'mono' }));
  if (!d.deleted) {
    li.append(el('span', shownValue(d), { class: 'value' }));
  }
  li.append(el('span', `rev ${d.revision}`, { class: 'muted small' }));
  const feed = $('feed');
  feed.prepend(li);
  while (feed.children.length > FEED_MAX) {
    feed.lastElementChild.remove();
  }
}

async function follow(gen) {
  let from = null;
  let wait = 500;
  while (gen === generation) {
    try {
      $('feed-state').textContent = '(following)';
      for await (const change of watch('', from, controller.signal)) {
        if (gen !== generation) {
          return;
        }
        from = change.id;
        wait = 500;
        addChange(change);
      }
      $('feed-state').textContent = '(stream ended; reconnecting)';
    } catch (e) {
      if (e instanceof ApiError && e.status === 410) {
        // Fell behind the agent's change log: go on from now, and say so.
        from = null;
        $('feed-state').textContent = '(missed changes: the change log moved on; following again)';
      } else if (failed(e)) {
        return;
      } else {
        $('feed-state').textContent = '(disconnected; retrying)';
      }
    }
    await sleep(wait);
    wait = Math.min(wait * 2, 10000);
  }
}

// ---- start ----

function start() {
  generation += 1;
  controller.abort();
  controller = new AbortController();
  const gen = generation;
  $('login').hidden = true;
  $('main').hidden = false;
  $('forget-token').hidden = !token();
  previous = null;
  charts = Object.fromEntries(
    SERIES.map(([id]) => [id, new Chart($('chart-' + id), $('c-' + id))]),
  );
  loop(gen, POLL_MS, members);
  loop(gen, POLL_MS, stats);
  keys().catch(failed);
  follow(gen);
}

function init() {
  // `/ui#token=…` hands the page a token without sending it to the server (a fragment is
  // never sent); it moves to sessionStorage and leaves the address bar at once.
  if (location.hash.startsWith('#token=')) {
    setToken(decodeURIComponent(location.hash.slice('#token='.length)));
    history.replaceState(null, '', location.pathname + location.search);
  }
  $('login-form').addEventListener('submit', (event) => {
    event.preventDefault();
    setToken($('token').value);
    $('token').value = '';
    start();
  });
  $('forget-token').addEventListener('click', () => {
    setToken(null);
    needToken('');
  });
  $('kv-form').addEventListener('submit', searchKeys);
  start();
}

init();
