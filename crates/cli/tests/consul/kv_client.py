"""Drives two Chorus agents' Consul KV API with a real Consul client library.

Run by crates/cli/tests/consul.rs with either the PyPI package py-consul (in a virtual
environment) or Debian's python3-consul (python-consul 0.7):

    python kv_client.py HOST:PORT_A HOST:PORT_B TOKEN PREFIX

Every check prints one `ok:` line; the first failure raises (exit status 1) with what was
seen. Every wait is bounded.
"""

import json
import sys
import threading
import time

import consul


def client(addr, token):
    host, port = addr.rsplit(":", 1)
    return consul.Consul(host=host, port=int(port), token=token)


def check(what, cond, seen=None):
    if not cond:
        raise AssertionError(f"{what}: saw {seen!r}")
    print(f"ok: {what}", flush=True)


def eventually(what, fn, timeout=15.0):
    """Calls fn until it returns a true value (or the timeout passes); returns that value."""
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            print(f"ok: {what}", flush=True)
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {got!r} after {timeout} s")
        time.sleep(0.05)


def txn(c, payload):
    """PUT /v1/txn through the client's own HTTP layer; returns (status, answer).

    py-consul has `c.txn.put`, but it sends no token (it skips `prepare_headers`), so with a
    token its HTTP layer is called with the client's headers; python-consul 0.7 has no Txn
    at all and sends its token as `?token=`.
    """
    body = json.dumps(payload)
    if hasattr(c, "prepare_headers"):
        from consul.callback import CB

        try:
            return 200, c.http.put(CB.json(), "/v1/txn", data=body, headers=c.prepare_headers())
        except consul.ConsulException as e:
            # py-consul raises for a 409 with the body in the message: "409 {...}".
            code, _, answer = str(e).partition(" ")
            return int(code), json.loads(answer)
    params = {"token": c.token} if c.token else None
    answer = c.http.put(consul.base.CB.json(), "/v1/txn", params=params, data=body)
    return (409 if answer.get("Errors") else 200), answer


def b64(text):
    import base64

    return base64.b64encode(text.encode()).decode()


def main():
    addr_a, addr_b, token, prefix = sys.argv[1:5]
    a, b = client(addr_a, token), client(addr_b, token)
    p = prefix.rstrip("/") + "/"
    print(f"client: {consul.__file__}", flush=True)

    # put / get with flags, read back on the other agent.
    check("put with flags", a.kv.put(p + "db/url", "postgres://db1", flags=42) is True)
    index, entry = a.kv.get(p + "db/url")
    check("get: value", entry["Value"] == b"postgres://db1", entry)
    check("get: flags", entry["Flags"] == 42, entry)
    check("get: index above 0", int(index) > 0, index)
    check("get: LockIndex 0", entry["LockIndex"] == 0, entry)
    eventually(
        "agent B sees agent A's write",
        lambda: (b.kv.get(p + "db/url")[1] or {}).get("Value") == b"postgres://db1",
    )
    check("flags replicated", b.kv.get(p + "db/url")[1]["Flags"] == 42)
    index, missing = a.kv.get(p + "nope")
    check("missing key: None with an index", missing is None and int(index) > 0, index)

    # recurse, keys with a separator.
    for key in ["svc/a", "svc/b/1", "svc/b/2"]:
        a.kv.put(p + key, key)
    _, tree = a.kv.get(p + "svc/", recurse=True)
    keys = [e["Key"] for e in tree]
    check("recurse", keys == [p + "svc/a", p + "svc/b/1", p + "svc/b/2"], keys)
    _, names = a.kv.get(p + "svc/", keys=True, separator="/")
    check("keys with separator", names == [p + "svc/a", p + "svc/b/"], names)
    _, names = a.kv.get(p + "svc/", keys=True)
    check("keys", names == [p + "svc/a", p + "svc/b/1", p + "svc/b/2"], names)

    # cas.
    check("cas=0 creates", a.kv.put(p + "cas", "one", cas=0) is True)
    check("cas=0 does not overwrite", a.kv.put(p + "cas", "two", cas=0) is False)
    _, entry = a.kv.get(p + "cas")
    modify = entry["ModifyIndex"]
    check("cas with a stale index fails", a.kv.put(p + "cas", "x", cas=modify - 1) is False)
    check("cas with the current index applies", a.kv.put(p + "cas", "three", cas=modify) is True)
    check("cas value", a.kv.get(p + "cas")[1]["Value"] == b"three")
    check("delete with a stale cas fails", a.kv.delete(p + "cas", cas=modify) is False)
    modify = a.kv.get(p + "cas")[1]["ModifyIndex"]
    check("delete with the current cas applies", a.kv.delete(p + "cas", cas=modify) is True)
    check("deleted", a.kv.get(p + "cas")[1] is None)

    # delete, delete recurse.
    check("delete", a.kv.delete(p + "db/url") is True)
    check("delete: gone", a.kv.get(p + "db/url")[1] is None)
    eventually("agent B sees the delete", lambda: b.kv.get(p + "db/url")[1] is None)
    check("delete recurse", a.kv.delete(p + "svc/", recurse=True) is True)
    check("delete recurse: gone", a.kv.get(p + "svc/", recurse=True)[1] is None)

    # A blocking get on agent B, woken by a write on agent A.
    a.kv.put(p + "watch", "before")
    eventually(
        "agent B has the key to watch",
        lambda: (b.kv.get(p + "watch")[1] or {}).get("Value") == b"before",
    )
    index_b, _ = b.kv.get(p + "watch")
    woken = {}

    def block():
        started = time.monotonic()
        woken["answer"] = b.kv.get(p + "watch", index=index_b, wait="60s")
        woken["took"] = time.monotonic() - started

    waiter = threading.Thread(target=block, daemon=True)
    waiter.start()
    time.sleep(1.0)
    check("blocking get waits", waiter.is_alive(), woken)
    a.kv.put(p + "watch-other", "x")
    time.sleep(0.5)
    check("blocking get not woken by another key", waiter.is_alive(), woken)
    a.kv.put(p + "watch", "after")
    waiter.join(30)
    check("blocking get woken by a write on agent A", not waiter.is_alive(), woken)
    new_index, entry = woken["answer"]
    check("woken with the new value", entry["Value"] == b"after", entry)
    check("woken with a higher index", int(new_index) > int(index_b), (index_b, new_index))
    check("woken well before the wait ended", woken["took"] < 30, woken["took"])
    # A wait that ends with nothing new returns the same index.
    started = time.monotonic()
    same, _ = b.kv.get(p + "watch", index=new_index, wait="1s")
    took = time.monotonic() - started
    check("wait ends with the same index", int(same) == int(new_index), (same, new_index))
    check("wait lasted about 1 s", 0.9 < took < 10, took)

    # Transactions: all or nothing.
    status, answer = txn(
        a,
        [
            {"KV": {"Verb": "set", "Key": p + "t/a", "Value": b64("1"), "Flags": 7}},
            {"KV": {"Verb": "cas", "Key": p + "t/b", "Value": b64("2"), "Index": 0}},
            {"KV": {"Verb": "check-not-exists", "Key": p + "t/c"}},
            {"KV": {"Verb": "get-tree", "Key": p + "t/"}},
        ],
    )
    check("txn applies", status == 200 and answer["Errors"] is None, (status, answer))
    check("txn results", len(answer["Results"]) == 4, answer)
    _, entry = a.kv.get(p + "t/a")
    check("txn wrote", entry["Value"] == b"1" and entry["Flags"] == 7, entry)
    status, answer = txn(
        a,
        [
            {"KV": {"Verb": "set", "Key": p + "t/c", "Value": b64("3")}},
            {"KV": {"Verb": "check-index", "Key": p + "t/a", "Index": entry["ModifyIndex"] + 1000}},
        ],
    )
    check("txn with a failed check: 409", status == 409, (status, answer))
    check("txn 409 names the operation", answer["Errors"][0]["OpIndex"] == 1, answer)
    check("txn with a failed check wrote nothing", a.kv.get(p + "t/c")[1] is None)
    eventually(
        "agent B sees the transaction",
        lambda: (b.kv.get(p + "t/b")[1] or {}).get("Value") == b"2",
    )

    # The token: a client without it is refused.
    anonymous = client(addr_a, None)
    try:
        anonymous.kv.get(p + "t/a")
        refused = False
    except consul.ACLPermissionDenied:
        refused = True
    check("no token: permission denied", refused)
    wrong = client(addr_a, "not-the-token")
    try:
        wrong.kv.put(p + "t/x", "x")
        refused = False
    except consul.ACLPermissionDenied:
        refused = True
    check("wrong token: permission denied", refused)
    print("all checks passed", flush=True)


if __name__ == "__main__":
    main()
