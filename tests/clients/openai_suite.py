#!/usr/bin/env python3
"""Drives an already-running moe-serve through the official `openai` Python client.

Usage:
    python tests/clients/openai_suite.py --base-url http://127.0.0.1:PORT --model demo \
        [--api-key KEY] [--server-pid PID] [--ram-budget-bytes N] [--json-out FILE]

Prints one `ok: ...` line per passed check; on the first failure prints `FAIL: ...` to stderr and
exits 1. Needs only `openai` (raw HTTP goes through urllib, so any client version works). See tests/clients/README.md.
"""

import argparse
import json
import os
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request

try:
    import openai
    from openai import OpenAI
except ImportError as e:  # pragma: no cover - environment problem, not a server problem
    print(f"FAIL: setup: the `openai` package is needed ({e})", file=sys.stderr)
    sys.exit(2)


class CheckFailed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def passed(name, detail=""):
    print(f"ok: {name}" + (f" ({detail})" if detail else ""), flush=True)


PROMPT = [{"role": "user", "content": "Tell me a story about a small robot."}]


def http(method, url, headers=None, body=None, timeout=30.0):
    """Raw HTTP without the client: returns (status, headers, body text)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def parse_metrics(text):
    """Prometheus text format -> {'name{labels}': value} (labels as written by the server)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            pass
    return out


class Suite:
    def __init__(self, args):
        self.args = args
        self.base = args.base_url.rstrip("/")
        self.model = args.model
        self.key = args.api_key
        self.summary = {"base_url": self.base, "model": self.model, "checks": []}
        self.client = self.make_client()

    def make_client(self, key=None, max_retries=0, timeout=60.0):
        return OpenAI(
            base_url=self.base + "/v1",
            # The client insists on some key; a server without one ignores the header.
            api_key=key if key is not None else (self.key or "no-key"),
            max_retries=max_retries,
            timeout=timeout,
        )

    def headers(self):
        h = {"Content-Type": "application/json"}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        return h

    def metrics(self):
        h = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        status, _, text = http("GET", self.base + "/metrics", headers=h)
        check(status == 200, f"metrics: GET /metrics HTTP {status}: {text[:200]!r}")
        return parse_metrics(text)

    def ok(self, name, detail=""):
        self.summary["checks"].append(name)
        passed(name, detail)

    # ---------------------------------------------------------------- helpers

    def chat(self, client=None, **kw):
        extra = kw.pop("extra_body", {})
        ignore_eos = kw.pop("ignore_eos", True)
        if ignore_eos:
            extra = dict(extra, ignore_eos=True)
        kw.setdefault("messages", PROMPT)
        kw.setdefault("model", self.model)
        return (client or self.client).chat.completions.create(extra_body=extra, **kw)

    def error_body(self, e, status, name):
        check(e.status_code == status, f"{name}: expected HTTP {status}, got {e.status_code}")
        try:
            body = e.response.json()
        except Exception as je:
            raise CheckFailed(f"{name}: error body is not JSON ({je}): {e.response.text!r}")
        err = body.get("error") if isinstance(body, dict) else None
        check(isinstance(err, dict), f"{name}: error body has no `error` object: {body!r}")
        for field in ("message", "type", "code"):
            check(field in err, f"{name}: error.{field} missing: {body!r}")
        check(
            isinstance(err["message"], str) and err["message"],
            f"{name}: error.message empty: {body!r}",
        )
        return err

    # ----------------------------------------------------------------- checks

    def wait_ready(self, deadline_s=60.0):
        end = time.monotonic() + deadline_s
        last = None
        while time.monotonic() < end:
            try:
                status, _, _ = http("GET", self.base + "/health", timeout=5.0)
                if status == 200:
                    self.ok("health", "GET /health 200")
                    return
                last = f"HTTP {status}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.05)
        raise CheckFailed(f"health: server not ready within {deadline_s} s (last: {last})")

    def models(self):
        ids = [m.id for m in self.client.models.list()]
        check(self.model in ids, f"models.list: {self.model!r} not in {ids}")
        self.ok("models.list", f"ids={ids}")

    def chat_basic(self):
        r = self.chat(max_tokens=8, temperature=0)
        c = r.choices[0]
        check(r.object == "chat.completion", f"chat: object {r.object!r}")
        check(len(r.choices) == 1, f"chat: {len(r.choices)} choices, expected 1")
        check(isinstance(c.message.content, str) and c.message.content,
              f"chat: no text: {c.message!r}")
        check(c.message.role == "assistant", f"chat: role {c.message.role!r}")
        check(c.finish_reason == "length", f"chat: finish_reason {c.finish_reason!r}, expected 'length'")
        u = r.usage
        check(u is not None, "chat: no usage")
        check(u.completion_tokens == 8, f"chat: usage.completion_tokens {u.completion_tokens}, expected 8")
        check(u.prompt_tokens > 0, f"chat: usage.prompt_tokens {u.prompt_tokens}")
        check(u.total_tokens == u.prompt_tokens + u.completion_tokens,
              f"chat: usage.total_tokens {u.total_tokens} != {u.prompt_tokens} + {u.completion_tokens}")
        self.greedy8 = c.message.content
        self.ok("chat non-stream", f"{u.prompt_tokens}+{u.completion_tokens} tokens, text={c.message.content!r}")

    def chat_stream(self):
        stream = self.chat(max_tokens=8, temperature=0, stream=True,
                           stream_options={"include_usage": True})
        parts, finish, chunks, last, usage_at = [], None, 0, None, None
        for ch in stream:
            chunks += 1
            last = ch
            check(ch.object == "chat.completion.chunk", f"chat stream: object {ch.object!r}")
            for choice in ch.choices:
                if choice.delta and choice.delta.content:
                    parts.append(choice.delta.content)
                if choice.finish_reason is not None:
                    check(finish is None, "chat stream: finish_reason sent twice")
                    finish = choice.finish_reason
            if ch.usage is not None:
                check(usage_at is None, "chat stream: usage sent twice")
                usage_at = chunks
        text = "".join(parts)
        check(last is not None, "chat stream: no chunks")
        check(finish == "length", f"chat stream: finish_reason {finish!r}, expected 'length'")
        check(last.usage is not None, f"chat stream: last chunk has no usage: {last!r}")
        check(usage_at == chunks, f"chat stream: usage in chunk {usage_at} of {chunks}")
        check(last.usage.completion_tokens == 8,
              f"chat stream: usage.completion_tokens {last.usage.completion_tokens}, expected 8")
        check(last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens,
              f"chat stream: usage total {last.usage!r}")
        check(text == self.greedy8,
              f"chat stream: deltas {text!r} != non-stream text {self.greedy8!r}")
        self.ok("chat stream", f"{chunks} chunks, text matches non-stream, usage in last chunk")

    def completions(self):
        prompts = {"text": "Once upon a time", "token ids": [1, 2, 3, 4, 5, 6, 7, 8]}
        n = 6
        for label, prompt in prompts.items():
            r = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=n,
                                               temperature=0, logprobs=2,
                                               extra_body={"ignore_eos": True})
            check(r.object == "text_completion", f"completions {label}: object {r.object!r}")
            c = r.choices[0]
            check(isinstance(c.text, str) and c.text, f"completions {label}: no text")
            check(c.finish_reason == "length", f"completions {label}: finish_reason {c.finish_reason!r}")
            u = r.usage
            check(u.completion_tokens == n, f"completions {label}: completion_tokens {u.completion_tokens}, expected {n}")
            check(u.total_tokens == u.prompt_tokens + u.completion_tokens,
                  f"completions {label}: usage {u!r}")
            if isinstance(prompt, list):
                check(u.prompt_tokens == len(prompt),
                      f"completions {label}: prompt_tokens {u.prompt_tokens}, expected {len(prompt)}")
            self.logprobs_shape(f"completions {label}", c.logprobs, u.completion_tokens, c.text)
            self.ok(f"completions {label} non-stream", f"text={c.text!r}, logprobs shape ok")

            stream = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=n,
                                                    temperature=0, logprobs=2, stream=True,
                                                    stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True})
            text, finish, usage, chunks = [], None, None, 0
            merged = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
            for ch in stream:
                chunks += 1
                if ch.usage is not None:
                    usage = ch.usage
                for choice in ch.choices:
                    text.append(choice.text or "")
                    if choice.finish_reason is not None:
                        finish = choice.finish_reason
                    lp = choice.logprobs
                    if lp is not None:
                        for k in merged:
                            merged[k].extend(getattr(lp, k) or [])
            text = "".join(text)
            check(finish == "length", f"completions {label} stream: finish_reason {finish!r}")
            check(usage is not None, f"completions {label} stream: no usage chunk")
            check(usage.completion_tokens == n,
                  f"completions {label} stream: completion_tokens {usage.completion_tokens}")
            check(text == c.text, f"completions {label} stream: text {text!r} != non-stream {c.text!r}")
            for k, v in merged.items():
                check(len(v) == n,
                      f"completions {label} stream: logprobs.{k} has {len(v)} entries, expected {n}")
            self.ok(f"completions {label} stream", f"{chunks} chunks, text matches, logprobs shape ok")

    def logprobs_shape(self, name, lp, n, text):
        check(lp is not None, f"{name}: logprobs missing")
        for k in ("tokens", "token_logprobs", "top_logprobs"):
            v = getattr(lp, k, None)
            check(v is not None and len(v) == n,
                  f"{name}: logprobs.{k} has {None if v is None else len(v)} entries, expected {n}")
        check("".join(lp.tokens) == text, f"{name}: logprobs.tokens {lp.tokens!r} do not spell {text!r}")
        for i, (tok, tlp, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
            check(isinstance(tlp, (int, float)) and tlp <= 1e-6,
                  f"{name}: token_logprobs[{i}] = {tlp!r}")
            # Up to 2 alternatives (OpenAI may add the sampled token: 3); distinct tokens that
            # decode to the same text collapse in the map, so at least 1.
            check(isinstance(top, dict) and 1 <= len(top) <= 3,
                  f"{name}: top_logprobs[{i}] = {top!r}")

    def chat_logprobs(self):
        r = self.chat(max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
        c = r.choices[0]
        check(c.logprobs is not None and c.logprobs.content is not None,
              f"chat logprobs: choices[0].logprobs.content missing: {c.logprobs!r}")
        content = c.logprobs.content
        n = r.usage.completion_tokens
        check(len(content) == n, f"chat logprobs: {len(content)} entries, expected {n}")
        check("".join(e.token for e in content) == c.message.content,
              f"chat logprobs: tokens {[e.token for e in content]!r} do not spell {c.message.content!r}")
        for i, e in enumerate(content):
            check(len(e.top_logprobs) == 3,
                  f"chat logprobs: entry {i} has {len(e.top_logprobs)} top_logprobs, expected 3")
            vals = [t.logprob for t in e.top_logprobs]
            check(all(a >= b for a, b in zip(vals, vals[1:])),
                  f"chat logprobs: entry {i} top_logprobs not sorted descending: {vals}")
            check(all(v <= 1e-6 for v in vals), f"chat logprobs: entry {i} positive logprob {vals}")
            # Greedy: the chosen token is (one of) the most likely.
            check(abs(e.logprob - vals[0]) < 1e-4,
                  f"chat logprobs: entry {i}: greedy token logprob {e.logprob} != top {vals[0]}")
        self.ok("chat logprobs", f"{n} entries x 3 top_logprobs, sorted descending")

    def stop_string(self):
        base = self.chat(max_tokens=32, temperature=0).choices[0].message.content
        # A 2-char printable ASCII substring from the middle whose first occurrence is not at 0
        # (so the expected text is not empty).
        mid = len(base) // 2
        order = sorted(range(len(base) - 1), key=lambda i: abs(i - mid))
        stop = None
        for i in order:
            s = base[i:i + 2]
            if all(32 < ord(ch) < 127 for ch in s) and base.find(s) > 0:
                stop = s
                break
        check(stop is not None, f"stop: no usable 2-char substring in {base!r}")
        expected = base[:base.find(stop)]
        r = self.chat(max_tokens=32, temperature=0, stop=[stop])
        c = r.choices[0]
        check(c.message.content == expected,
              f"stop {stop!r}: text {c.message.content!r}, expected {expected!r} (from {base!r})")
        check(c.finish_reason == "stop", f"stop {stop!r}: finish_reason {c.finish_reason!r}, expected 'stop'")
        self.ok("stop string", f"stop={stop!r}, text={expected!r}")

    def seed(self):
        texts = [self.chat(max_tokens=16, temperature=1.0, seed=s).choices[0].message.content
                 for s in (7, 7, 8)]
        check(texts[0] == texts[1], f"seed: two requests with seed 7 differ: {texts[0]!r} vs {texts[1]!r}")
        check(texts[0] != texts[2], f"seed: seeds 7 and 8 gave the same sampled text {texts[0]!r}")
        self.ok("seed reproducibility", f"seed 7 twice equal, seed 8 differs")

    def errors(self):
        try:
            self.chat(model="no-such-model", max_tokens=4)
            raise CheckFailed("unknown model: no error")
        except openai.NotFoundError as e:
            self.error_body(e, 404, "unknown model")
        self.ok("error: unknown model", "NotFoundError 404")

        try:
            self.chat(max_tokens=100000)
            raise CheckFailed("max_tokens 100000: no error")
        except openai.BadRequestError as e:
            err = self.error_body(e, 400, "max_tokens 100000")
            check("100000" in err["message"],
                  f"max_tokens 100000: message does not name 100000: {err['message']!r}")
        self.ok("error: max_tokens over context", "BadRequestError 400, message names 100000")

        r = self.chat(max_tokens=4, n=2, seed=3, temperature=1.0)
        check([c.index for c in r.choices] == [0, 1], f"n=2: choices {r.choices!r}")
        check(r.usage.completion_tokens == 8, f"n=2: usage {r.usage!r}")
        self.ok("n=2", "two choices, indices 0 and 1, completion tokens summed")

        try:
            self.chat(max_tokens=4, n=17)
            raise CheckFailed("n=17: no error")
        except openai.BadRequestError as e:
            self.error_body(e, 400, "n=17")
        self.ok("error: n=17", "BadRequestError 400")

        r = self.client.responses.create(model=self.model, input="Tell me a story", instructions="Be brief",
                                         max_output_tokens=6, temperature=0)
        check(r.output_text != "" and r.usage.output_tokens >= 1, f"responses: {r!r}")
        check(r.status in ("completed", "incomplete"), f"responses: status {r.status!r}")
        events = list(self.client.responses.create(model=self.model, input="Tell me a story", instructions="Be brief",
                                                    max_output_tokens=6, temperature=0, stream=True))
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        final = events[-1]
        check(final.type in ("response.completed", "response.incomplete"), f"responses stream: last {final.type!r}")
        check(deltas == final.response.output_text == r.output_text,
              f"responses stream: {deltas!r} vs {final.response.output_text!r} vs {r.output_text!r}")
        check([e.sequence_number for e in events] == list(range(len(events))), "responses stream: sequence numbers")
        self.ok("responses", f"{len(events)} events, text matches non-stream")

        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
        try:
            self.chat(max_tokens=4, tools=[tool], tool_choice={"type": "function", "function": {"name": "g"}})
            raise CheckFailed("tool_choice naming an unknown tool: no error")
        except openai.BadRequestError as e:
            err = self.error_body(e, 400, "tool_choice")
            check("tool_choice" in err["message"] or err.get("param") == "tool_choice",
                  f"tool_choice: message does not name it: {err['message']!r}")
        self.ok("error: tool_choice naming no tool", "BadRequestError 400 naming tool_choice")

        status, _, text = http("POST", self.base + "/v1/chat/completions", headers=self.headers(),
                               body={"model": self.model, "max_tokens": 4})
        check(status == 400, f"missing messages: HTTP {status}, expected 400: {text!r}")
        try:
            body = json.loads(text)
        except ValueError:
            raise CheckFailed(f"missing messages: error body is not JSON: {text!r}")
        check(all(k in body.get("error", {}) for k in ("message", "type", "code")),
              f"missing messages: error body {body!r}")
        self.ok("error: missing messages", "raw POST 400")

        if self.key:
            bad = self.make_client(key=self.key + "-wrong")
            try:
                self.chat(client=bad, max_tokens=4)
                raise CheckFailed("wrong key: no error")
            except openai.AuthenticationError as e:
                self.error_body(e, 401, "wrong key")
            try:
                bad.models.list()
                raise CheckFailed("wrong key on /v1/models: no error")
            except openai.AuthenticationError as e:
                self.error_body(e, 401, "wrong key /v1/models")
            self.ok("error: wrong api key", "AuthenticationError 401")

    def structured(self):
        """`chat.completions.parse()` with a pydantic model: the demo model has random weights,
        so only the server's grammar can make its reply parse and validate."""
        from typing import Literal

        import pydantic

        class Person(pydantic.BaseModel):
            name: str = pydantic.Field(max_length=8)
            age: int = pydantic.Field(ge=0, le=120)
            color: Literal["red", "green", "blue"]

        for seed in (1, 2, 3):
            r = self.client.chat.completions.parse(
                model=self.model, messages=PROMPT, response_format=Person, max_tokens=120,
                temperature=0.8, seed=seed)
            p = r.choices[0].message.parsed
            check(isinstance(p, Person), f"parse(): parsed {p!r} from {r.choices[0].message.content!r}")
            check(len(p.name) <= 8 and 0 <= p.age <= 120, f"parse(): {p!r}")
            free = self.chat(max_tokens=40, temperature=0.8, seed=seed, ignore_eos=False)
            try:
                json.loads(free.choices[0].message.content)
                raise CheckFailed(f"without response_format the reply parsed as JSON: {free!r}")
            except ValueError:
                pass
        self.ok("structured output", "parse() with a pydantic model, 3 seeds; unconstrained text is not JSON")

        r = self.client.responses.parse(model=self.model, input="Who are you?", text_format=Person,
                                        max_output_tokens=120, temperature=0.8)
        check(isinstance(r.output_parsed, Person), f"responses.parse(): {r.output_text!r}")
        self.ok("structured output (Responses API)", repr(r.output_parsed))

        r = self.chat(max_tokens=200, temperature=0.8, seed=4, ignore_eos=False,
                      response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            check(isinstance(json.loads(r.choices[0].message.content), dict), f"json_object: {r!r}")
        self.ok("json_object", repr(r.choices[0].message.content[:40]))

        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"], "additionalProperties": False}}}]
        kw = dict(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}},
                  parallel_tool_calls=False, max_tokens=160, temperature=0.8, seed=5, ignore_eos=False)
        r = self.chat(**kw)
        c = r.choices[0]
        check(c.finish_reason == "tool_calls", f"tools: finish {c.finish_reason!r}: {r!r}")
        call = c.message.tool_calls[0]
        args = json.loads(call.function.arguments)
        check(call.function.name == "get_weather" and set(args) == {"city", "unit"}
              and args["unit"] in ("c", "f") and len(args["city"]) <= 10, f"tools: {call!r}")
        # Streamed, gathered as agent frameworks gather deltas.
        calls, finish = {}, None
        for chunk in self.chat(stream=True, **kw):
            for ch in chunk.choices:
                finish = ch.finish_reason or finish
                for d in ch.delta.tool_calls or []:
                    slot = calls.setdefault(d.index, {"name": "", "arguments": ""})
                    if d.function and d.function.name:
                        slot["name"] += d.function.name
                    if d.function and d.function.arguments:
                        slot["arguments"] += d.function.arguments
        check(finish == "tool_calls" and calls == {0: {"name": "get_weather", "arguments": call.function.arguments}},
              f"tools stream: {calls!r} {finish!r} vs {call!r}")
        # The result goes back: the history with the call and the tool's answer is accepted and
        # makes a longer prompt.
        follow = kw["messages"] + [c.message.model_dump(exclude_none=True),
                                   {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
        r2 = self.chat(messages=follow, tools=tools, max_tokens=4)
        check(r2.usage.prompt_tokens > r.usage.prompt_tokens, f"tool result: {r2.usage!r} vs {r.usage!r}")
        self.ok("tool calls", f"{call.function.name}({call.function.arguments}), streamed alike, result sent back")

    def fault(self, token):
        try:
            self.client.completions.create(model=self.model, prompt=[1, token, 3], max_tokens=4,
                                           temperature=0)
            raise CheckFailed(f"fault token {token}: no error")
        except openai.InternalServerError as e:
            self.error_body(e, 500, f"fault token {token}")
        r = self.chat(max_tokens=4, temperature=0)
        check(r.usage.completion_tokens == 4, "fault: server unhealthy after the injected panic")
        self.ok("error: injected panic", "InternalServerError 500, server still serves")

    # -------------------------------------------------------------- load test

    def one_request(self, client, results, lock):
        """One load-test request; records ('ok', tokens) or ('429', 0) or ('error', msg)."""
        try:
            r = self.chat(client=client, max_tokens=16, temperature=0)
            n = r.usage.completion_tokens if r.usage else None
            if n != 16 or r.choices[0].finish_reason != "length":
                out = ("error", f"completion_tokens {n}, finish_reason {r.choices[0].finish_reason!r}")
            else:
                out = ("ok", n)
        except openai.RateLimitError as e:
            if e.status_code != 429 or "retry-after" not in e.response.headers:
                out = ("error", f"429 without Retry-After: {e.status_code} {dict(e.response.headers)}")
            else:
                out = ("429", 0)
        except Exception as e:  # anything else fails the load test
            out = ("error", f"{type(e).__name__}: {e}")
        with lock:
            results.append(out)

    def run_load(self, threads, per_thread, timeout_s):
        results, lock = [], threading.Lock()
        # Clients are built before the clock starts; all threads and the timer start together.
        clients = [self.make_client(max_retries=0, timeout=timeout_s) for _ in range(threads)]
        gate = threading.Barrier(threads + 1)

        def worker(client):
            try:
                gate.wait(timeout=30)
            except threading.BrokenBarrierError:
                pass
            for _ in range(per_thread):
                self.one_request(client, results, lock)

        ts = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
        for t in ts:
            t.start()
        gate.wait(timeout=30)
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        for t in ts:
            t.join(max(0.0, deadline - time.monotonic()))
        wall = time.monotonic() - t0
        alive = sum(t.is_alive() for t in ts)
        check(alive == 0,
              f"load: {alive} of {threads} clients still running after {timeout_s} s (hang); "
              f"{len(results)} of {threads * per_thread} requests answered")
        return results, wall

    def load(self):
        a = self.args
        threads, per, timeout_s = a.load_clients, a.load_requests, a.load_timeout
        total = threads * per
        # Warm-up (first-request costs stay out of both measurements).
        self.chat(max_tokens=16, temperature=0)

        client = self.make_client(max_retries=0, timeout=timeout_s)
        seq, lock = [], threading.Lock()
        t0 = time.monotonic()
        for _ in range(total):
            self.one_request(client, seq, lock)
            check(time.monotonic() - t0 < timeout_s, f"load: sequential baseline over {timeout_s} s")
        seq_wall = time.monotonic() - t0
        bad = [r for r in seq if r[0] == "error"]
        check(not bad, f"load: sequential request failed: {bad[0][1] if bad else ''}")
        seq_tokens = sum(r[1] for r in seq if r[0] == "ok")
        seq_tps = seq_tokens / seq_wall
        self.ok("load sequential", f"{total} requests, {seq_tokens} tokens in {seq_wall:.2f} s = {seq_tps:.1f} tok/s")

        before = self.metrics()
        conc, wall = self.run_load(threads, per, timeout_s)
        after = self.metrics()
        check(len(conc) == total, f"load: {len(conc)} results for {total} requests")
        bad = [r for r in conc if r[0] == "error"]
        check(not bad, f"load: {len(bad)} requests failed (not 200 with 16 tokens, not 429); first: {bad[0][1] if bad else ''}")
        n_ok = sum(r[0] == "ok" for r in conc)
        n_429 = sum(r[0] == "429" for r in conc)
        check(n_ok > 0, f"load: every request got 429 ({n_429})")
        tokens = sum(r[1] for r in conc if r[0] == "ok")
        tps = tokens / wall
        d_tokens = after.get("moe_generated_tokens_total", 0) - before.get("moe_generated_tokens_total", 0)
        d_steps = after.get("moe_batch_steps_total", 0) - before.get("moe_batch_steps_total", 0)
        per_step = d_tokens / d_steps if d_steps > 0 else 0.0
        ratio = tps / seq_tps
        self.ok("load concurrent",
                f"{threads} clients x {per}: {n_ok} ok, {n_429} x 429, {tokens} tokens in {wall:.2f} s = {tps:.1f} tok/s")
        self.summary["load"] = {
            "clients": threads, "requests_per_client": per,
            "sequential": {"requests": total, "tokens": seq_tokens, "seconds": seq_wall, "tokens_per_s": seq_tps},
            "concurrent": {"requests": total, "ok": n_ok, "rate_limited_429": n_429, "tokens": tokens,
                           "seconds": wall, "tokens_per_s": tps},
            "ratio": ratio,
            "server_generated_tokens": d_tokens, "server_batch_steps": d_steps,
            "generated_tokens_per_step": per_step,
        }
        check(d_tokens == tokens,
              f"load: /metrics moe_generated_tokens_total grew by {d_tokens}, clients got {tokens}")
        self.ok("load metrics", f"{d_tokens:.0f} tokens in {d_steps:.0f} batched steps = {per_step:.2f} per step")
        if a.expect_batching:
            check(per_step > 1.0,
                  f"load: {per_step:.2f} generated tokens per batched step (not > 1): no batching")
            self.ok("load batching", f"{per_step:.2f} tokens per step > 1")
        check(ratio > a.min_speedup,
              f"load: concurrent/sequential throughput ratio {ratio:.2f} is not > {a.min_speedup} "
              f"({tps:.1f} vs {seq_tps:.1f} tok/s)")
        self.ok("load speedup", f"concurrent/sequential = {ratio:.2f} (> {a.min_speedup})")

    def memory(self):
        pid = self.args.server_pid
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
        except OSError as e:
            raise CheckFailed(f"memory: cannot read /proc/{pid}/status: {e}")
        hwm = None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                parts = line.split()
                check(len(parts) == 3 and parts[2] == "kB", f"memory: odd VmHWM line {line!r}")
                hwm = int(parts[1]) * 1024
        check(hwm is not None, f"memory: no VmHWM in /proc/{pid}/status")
        self.summary["vm_hwm_bytes"] = hwm
        budget = self.args.ram_budget_bytes
        if budget is not None:
            self.summary["ram_budget_bytes"] = budget
            check(hwm <= budget, f"memory: VmHWM {hwm} bytes ({hwm / 2**20:.1f} MiB) > ram budget {budget} bytes ({budget / 2**20:.1f} MiB)")
            self.ok("memory", f"VmHWM {hwm / 2**20:.1f} MiB <= budget {budget / 2**20:.1f} MiB")
        else:
            self.ok("memory", f"VmHWM {hwm / 2**20:.1f} MiB (no budget given)")

    def run(self):
        self.wait_ready()
        self.models()
        self.chat_basic()
        self.chat_stream()
        self.completions()
        self.chat_logprobs()
        self.stop_string()
        self.seed()
        self.errors()
        self.structured()
        if self.args.fault_token is not None:
            self.fault(self.args.fault_token)
        self.load()
        if self.args.server_pid is not None:
            self.memory()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080 (without /v1)")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default=None)
    p.add_argument("--server-pid", type=int, default=None, help="read its VmHWM after the load test")
    p.add_argument("--ram-budget-bytes", type=int, default=None, help="VmHWM must not exceed this")
    p.add_argument("--json-out", default=None, help="write a JSON summary here")
    p.add_argument("--fault-token", type=int, default=None,
                   help="token id that the server was started to panic on "
                        "(MOE_SERVE_FAULT_PANIC_TOKEN); checks the 500 and that it keeps serving")
    p.add_argument("--load-clients", type=int, default=16)
    p.add_argument("--load-requests", type=int, default=4, help="requests per client")
    p.add_argument("--load-timeout", type=float, default=120.0, help="seconds before the load test counts as hung")
    p.add_argument("--min-speedup", type=float, default=1.0,
                   help="concurrent/sequential throughput must exceed this")
    p.add_argument("--expect-batching", action="store_true",
                   help="the server runs with max_batch > 1: assert that the concurrent load "
                        "averaged more than one generated token per batched step (from /metrics)")
    args = p.parse_args()

    suite = Suite(args)
    code = 0
    try:
        suite.run()
        suite.summary["result"] = "pass"
        print(f"PASS: {len(suite.summary['checks'])} checks", flush=True)
    except CheckFailed as e:
        suite.summary["result"] = "fail"
        suite.summary["failure"] = str(e)
        print(f"FAIL: {e}", file=sys.stderr, flush=True)
        code = 1
    except Exception as e:  # an unexpected exception from the client is a failure too
        suite.summary["result"] = "fail"
        suite.summary["failure"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        print(f"FAIL: unexpected {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(suite.summary, f, indent=2)
    sys.stdout.flush()
    # os._exit: a hung load-test thread must not keep the process alive.
    os._exit(code)


if __name__ == "__main__":
    main()
