#!/usr/bin/env python3
"""The obvious alternative to contacts-etl, for the benchmark to measure side by side.

A lean thread-pool exporter, written the way one would write it in an afternoon:
page through GET /contacts/ (limit=100, meta.startAfter/startAfterId cursor) on the
main thread, fetch each contact's tasks, notes and appointments on a pool of 16
threads with `requests`, keep the rows in memory, and write one Parquet file per
entity with pyarrow at the end.

It does what the Rust exporter's output needs and no more: nested values (lists,
objects) become JSON text, a column whose values pyarrow cannot type as one falls
back to text, 429 and 5xx are retried after a short sleep. It does not pace
itself, checkpoint, or stream.

Usage: baseline.py --base-url URL --location ID --out DIR [--threads 16]

On success it prints one JSON line on stdout: rows per entity, requests, retries,
and its own CPU seconds (user + system, all threads) and peak RSS.
"""

import argparse
import json
import os
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import requests

PAGE_SIZE = 100
API_VERSION = "2021-07-28"
# Child endpoint -> key of the list in its JSON reply.
CHILDREN = {"tasks": "tasks", "notes": "notes", "appointments": "events"}
MAX_ATTEMPTS = 8

_local = threading.local()
_counts_lock = threading.Lock()
counts = {"requests": 0, "retries": 0}


def session(token):
    # One keep-alive session per thread: requests.Session is not thread-safe.
    s = getattr(_local, "session", None)
    if s is None:
        s = requests.Session()
        s.headers.update({"Authorization": f"Bearer {token}", "Version": API_VERSION,
                          "Accept": "application/json"})
        _local.session = s
    return s


def get_json(token, url, params=None):
    for attempt in range(MAX_ATTEMPTS):
        resp = session(token).get(url, params=params, timeout=60)
        with _counts_lock:
            counts["requests"] += 1
            if attempt:
                counts["retries"] += 1
        if resp.status_code == 429 or resp.status_code >= 500:
            wait = float(resp.headers.get("Retry-After") or 0.5 * 2 ** attempt)
            time.sleep(min(wait, 10.0))
            continue
        resp.raise_for_status()
        return resp.json()
    raise RuntimeError(f"GET {url}: gave up after {MAX_ATTEMPTS} attempts")


def fetch_child(token, base, location, entity, contact_id):
    body = get_json(token, f"{base}/contacts/{contact_id}/{entity}")
    rows = body.get(CHILDREN[entity]) or []
    for row in rows:
        row["contactId"] = contact_id
        row.setdefault("locationId", location)
    return entity, rows


def to_table(rows):
    """Column-wise: union of keys, nested values as JSON text, mixed types as text."""
    names = {}
    for row in rows:
        for key in row:
            names.setdefault(key, None)
    columns = {}
    for name in names:
        values = []
        for row in rows:
            v = row.get(name)
            if isinstance(v, (dict, list)):
                v = json.dumps(v, ensure_ascii=False)
            values.append(v)
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            columns[name] = pa.array(
                [v if v is None or isinstance(v, str) else json.dumps(v) for v in values],
                type=pa.string())
    return pa.table(columns)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--location", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=16)
    args = ap.parse_args()
    token = os.environ.get("HL_TOKEN", "x")
    base = args.base_url.rstrip("/")

    tables = {"contacts": [], **{e: [] for e in CHILDREN}}
    pending = []
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        params = {"locationId": args.location, "limit": PAGE_SIZE}
        while True:
            page = get_json(token, f"{base}/contacts/", params)
            contacts = page.get("contacts") or []
            if not contacts:
                break
            tables["contacts"].extend(contacts)
            for c in contacts:
                for entity in CHILDREN:
                    pending.append(pool.submit(fetch_child, token, base, args.location,
                                               entity, c["id"]))
            meta = page.get("meta") or {}
            if not meta.get("nextPageUrl") or meta.get("startAfterId") is None:
                break
            params = {"locationId": args.location, "limit": PAGE_SIZE,
                      "startAfter": meta["startAfter"], "startAfterId": meta["startAfterId"]}
        for fut in pending:
            entity, rows = fut.result()
            tables[entity].extend(rows)

    os.makedirs(args.out, exist_ok=True)
    for entity, rows in tables.items():
        pq.write_table(to_table(rows), os.path.join(args.out, f"{entity}.parquet"),
                       compression="zstd")

    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "rows": {e: len(r) for e, r in tables.items()},
        "requests": counts["requests"],
        "retries": counts["retries"],
        "cpuSeconds": usage.ru_utime + usage.ru_stime,
        "peakRssBytes": usage.ru_maxrss * 1024,  # Linux reports KiB
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
