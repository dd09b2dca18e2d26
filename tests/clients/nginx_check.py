#!/usr/bin/env python3
"""Checks moe-serve behind nginx (configs/nginx/moe-serve.conf) with the official `openai` client.

Usage:
    python tests/clients/nginx_check.py --base-url http://127.0.0.1:NGINX_PORT \
        --replicas http://127.0.0.1:P1,http://127.0.0.1:P2 --model demo [--api-key KEY]

Through nginx: non-streaming and streaming chat requests all succeed; streams arrive in several
chunks and end properly; a long stream arrives incrementally (first chunk well before the last);
and, read from each replica's own /metrics, both replicas served requests. Prints one `ok: ...`
line per passed check; on the first failure prints `FAIL: ...` to stderr and exits 1.
"""

import argparse
import json
import os
import sys
import time
import traceback
import urllib.error
import urllib.request

try:
    import openai
    from openai import OpenAI
except ImportError as e:  # pragma: no cover - environment problem
    print(f"FAIL: setup: the `openai` package is needed ({e})", file=sys.stderr)
    sys.exit(2)

CHAT_200 = 'moe_requests_total{route="/v1/chat/completions",status="200"}'
MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse."}]


class CheckFailed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def passed(name, detail=""):
    print(f"ok: {name}" + (f" ({detail})" if detail else ""), flush=True)


def http_get(url, key=None, timeout=10.0):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def served(replica, key):
    """moe_requests_total for 200 chat completions, read from the replica directly."""
    status, text = http_get(replica.rstrip("/") + "/metrics", key)
    check(status == 200, f"metrics: GET {replica}/metrics HTTP {status}: {text[:200]!r}")
    for line in text.splitlines():
        if line.startswith(CHAT_200 + " "):
            return int(float(line.split()[-1]))
    return 0  # no 200 answered yet: the series does not exist


def wait_ready(url, deadline_s=60.0):
    end, last = time.monotonic() + deadline_s, None
    while time.monotonic() < end:
        try:
            status, _ = http_get(url.rstrip("/") + "/health", timeout=5.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.05)
    raise CheckFailed(f"health: {url} not ready within {deadline_s} s (last: {last})")


def stream_chat(client, model, max_tokens):
    """Streams one greedy chat completion; returns (text, content chunks, finish_reason, usage,
    seconds to the first content chunk, seconds to the end)."""
    t0 = time.monotonic()
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    parts, first, finish, usage = [], None, None, None
    for ch in stream:
        for choice in ch.choices:
            if choice.delta and choice.delta.content:
                if first is None:
                    first = time.monotonic() - t0
                parts.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish = choice.finish_reason
        if ch.usage is not None:
            usage = ch.usage
    total = time.monotonic() - t0
    return "".join(parts), len(parts), finish, usage, first, total


def run(args):
    replicas = [r for r in args.replicas.split(",") if r]
    check(len(replicas) >= 2, f"--replicas: need at least 2 URLs, got {replicas}")
    wait_ready(args.base_url)
    for r in replicas:
        wait_ready(r)
    passed("health", f"nginx and {len(replicas)} replicas ready")

    client = OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key=args.api_key or "no-key",
                    max_retries=0, timeout=120.0)
    model = args.model
    before = [served(r, args.api_key) for r in replicas]

    ids = [m.id for m in client.models.list()]
    check(model in ids, f"models.list through nginx: {model!r} not in {ids}")
    passed("models.list through nginx", f"ids={ids}")

    greedy = None
    for i in range(args.requests):
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True})
        c = r.choices[0]
        check(c.finish_reason == "length" and r.usage.completion_tokens == 8,
              f"request {i}: finish_reason {c.finish_reason!r}, completion_tokens {r.usage.completion_tokens}")
        check(isinstance(c.message.content, str) and c.message.content, f"request {i}: no text")
        # Same weights on both replicas, greedy decoding: every answer is the same.
        if greedy is None:
            greedy = c.message.content
        check(c.message.content == greedy,
              f"request {i}: text {c.message.content!r} differs from {greedy!r}")
    passed("non-streaming through nginx", f"{args.requests} requests, 8 tokens each")

    for i in range(args.streams):
        text, chunks, finish, usage, _, _ = stream_chat(client, model, 8)
        check(chunks >= 2, f"stream {i}: {chunks} content chunks, expected several")
        check(finish == "length", f"stream {i}: finish_reason {finish!r}, expected 'length'")
        check(usage is not None and usage.completion_tokens == 8, f"stream {i}: usage {usage!r}")
        check(text == greedy, f"stream {i}: text {text!r} != non-stream {greedy!r}")
    passed("streaming through nginx", f"{args.streams} streams, several chunks, finish_reason and usage")

    n = args.long_tokens
    text, chunks, finish, usage, first, total = stream_chat(client, model, n)
    check(finish == "length" and usage is not None and usage.completion_tokens == n,
          f"long stream: finish_reason {finish!r}, usage {usage!r}")
    check(chunks >= n // 2, f"long stream: {chunks} content chunks for {n} tokens")
    check(first is not None, "long stream: no content chunk")
    check(first < 0.5 * total,
          f"long stream: first chunk after {first:.3f} s of {total:.3f} s (not < 50%): the "
          f"stream did not arrive incrementally (proxy buffering, or a stalled first write)")
    passed("incremental streaming through nginx",
           f"{n} tokens in {chunks} chunks; first after {first * 1000:.1f} ms of {total * 1000:.1f} ms")

    after = [served(r, args.api_key) for r in replicas]
    counts = [a - b for a, b in zip(after, before)]
    expected = args.requests + args.streams + 1
    check(sum(counts) == expected,
          f"replica metrics: {counts} chat requests served (sum {sum(counts)}), expected {expected}")
    check(all(c >= 2 for c in counts), f"replica metrics: requests not spread: {counts} per replica")
    passed("spread over replicas", f"chat 200s per replica: {counts}")
    return {"per_replica": counts, "first_chunk_s": first, "long_stream_s": total,
            "long_stream_chunks": chunks}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="nginx, e.g. http://127.0.0.1:8080")
    p.add_argument("--replicas", required=True, help="replica URLs, comma-separated (direct)")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default=None)
    p.add_argument("--requests", type=int, default=12, help="non-streaming requests")
    p.add_argument("--streams", type=int, default=4, help="short streaming requests")
    p.add_argument("--long-tokens", type=int, default=200, help="tokens of the incremental-stream check")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    summary, code = {}, 0
    try:
        summary = run(args)
        summary["result"] = "pass"
        print("PASS", flush=True)
    except CheckFailed as e:
        summary = {"result": "fail", "failure": str(e)}
        print(f"FAIL: {e}", file=sys.stderr, flush=True)
        code = 1
    except Exception as e:
        traceback.print_exc()
        summary = {"result": "fail", "failure": f"{type(e).__name__}: {e}"}
        print(f"FAIL: unexpected {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=2)
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
