// The official Node `openai` package against `moe-serve serve`: chat (whole and streamed),
// completions, n choices, the Responses API, structured output (`parse()`), tool calls through
// `runTools()` whole and streamed, and errors, each a check that fails the run with a message
// naming it.
//
// Usage: node openai_suite.mjs BASE_URL MODEL API_KEY
// (the package is found through NODE_PATH, as tests/serve_clients.rs sets it).

import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const OpenAI = require("openai").default ?? require("openai");

const [baseURL, model, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${baseURL}/v1`, apiKey, maxRetries: 0 });
const messages = [{ role: "user", content: "Tell me a story" }];

function check(ok, what) {
  if (!ok) {
    throw new Error(`FAIL: ${what}`);
  }
}

function ok(name, detail) {
  console.log(`ok: ${name} (${detail})`);
}

/// Runs `call`, which must fail with HTTP `status` and a message naming `field`.
async function refused(name, status, field, call) {
  try {
    await call();
  } catch (e) {
    check(e.status === status, `${name}: expected HTTP ${status}, got ${e.status}: ${e.message}`);
    check(String(e.message).includes(field), `${name}: the message does not name ${field}: ${e.message}`);
    ok(name, `${e.constructor.name} ${status} naming ${field}`);
    return;
  }
  throw new Error(`FAIL: ${name}: no error`);
}

const whole = await client.chat.completions.create({ model, messages, max_tokens: 8, temperature: 0 });
const text = whole.choices[0].message.content;
check(typeof text === "string" && text.length > 0, `chat: content ${JSON.stringify(whole)}`);
check(whole.usage.completion_tokens >= 1, `chat: usage ${JSON.stringify(whole.usage)}`);
ok("chat", `${whole.usage.prompt_tokens}+${whole.usage.completion_tokens} tokens`);

const stream = await client.chat.completions.create({
  model, messages, max_tokens: 8, temperature: 0, stream: true, stream_options: { include_usage: true },
});
let streamed = "";
let usage = null;
for await (const chunk of stream) {
  for (const c of chunk.choices) {
    streamed += c.delta?.content ?? "";
  }
  usage = chunk.usage ?? usage;
}
check(streamed === text, `chat stream: ${JSON.stringify(streamed)} vs ${JSON.stringify(text)}`);
check(usage && usage.completion_tokens === whole.usage.completion_tokens, `chat stream: usage ${JSON.stringify(usage)}`);
ok("chat stream", "text and usage match the whole answer");

const comp = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 6, temperature: 0 });
check(comp.choices[0].text.length > 0, `completions: ${JSON.stringify(comp)}`);
ok("completions", JSON.stringify(comp.choices[0].text));

const two = await client.chat.completions.create({ model, messages, max_tokens: 4, n: 2, seed: 3, temperature: 1 });
check(two.choices.map((c) => c.index).join(",") === "0,1", `n=2: ${JSON.stringify(two.choices)}`);
check(two.usage.completion_tokens === 8, `n=2: usage ${JSON.stringify(two.usage)}`);
ok("n=2", "two choices, usage summed");

const resp = await client.responses.create({ model, input: "Tell me a story", max_output_tokens: 6, temperature: 0 });
check(resp.output_text.length > 0, `responses: ${JSON.stringify(resp)}`);
let deltas = "";
let last = null;
for await (const ev of await client.responses.create({
  model, input: "Tell me a story", max_output_tokens: 6, temperature: 0, stream: true,
})) {
  if (ev.type === "response.output_text.delta") deltas += ev.delta;
  last = ev;
}
check(deltas === resp.output_text, `responses stream: ${JSON.stringify(deltas)} vs ${JSON.stringify(resp.output_text)}`);
check(["response.completed", "response.incomplete"].includes(last.type), `responses stream: last ${last.type}`);
ok("responses", "text matches streamed deltas");

// Structured output: only the grammar can make random weights write JSON valid against it.
const person = {
  type: "object",
  properties: {
    name: { type: "string", maxLength: 8 },
    age: { type: "integer", minimum: 0, maximum: 120 },
    color: { enum: ["red", "green", "blue"] },
  },
  required: ["name", "age", "color"],
  additionalProperties: false,
};
const parsed = await client.chat.completions.parse({
  model, messages, max_tokens: 120, temperature: 0.8, seed: 1,
  response_format: { type: "json_schema", json_schema: { name: "person", strict: true, schema: person } },
});
const p = parsed.choices[0].message.parsed;
check(p && typeof p.name === "string" && p.name.length <= 8 && Number.isInteger(p.age) && ["red", "green", "blue"].includes(p.color),
  `parse(): ${JSON.stringify(parsed.choices[0].message)}`);
ok("structured output", JSON.stringify(p));

// Tools: runTools() with a forced function runs it once with arguments that parse and fit the
// schema; streamed, the official delta accumulator rebuilds the call.
const weather = {
  type: "object",
  properties: { city: { type: "string", maxLength: 10 }, unit: { enum: ["c", "f"] } },
  required: ["city", "unit"],
  additionalProperties: false,
};
for (const stream of [false, true]) {
  const seen = [];
  const runner = client.chat.completions.runTools({
    model, messages: [{ role: "user", content: "Weather in Paris?" }], max_tokens: 160, temperature: 0.8, seed: 2,
    stream, parallel_tool_calls: false,
    tool_choice: { type: "function", function: { name: "get_weather" } },
    tools: [{
      type: "function",
      function: {
        name: "get_weather", parameters: weather, parse: JSON.parse,
        function: (args) => { seen.push(args); return JSON.stringify({ temp: 21 }); },
      },
    }],
  });
  await runner.done();
  check(seen.length === 1, `runTools(stream: ${stream}): the function ran ${seen.length} times`);
  const args = seen[0];
  check(Object.keys(args).sort().join(",") === "city,unit" && args.city.length <= 10 && ["c", "f"].includes(args.unit),
    `runTools(stream: ${stream}): arguments ${JSON.stringify(args)}`);
  const msgs = runner.messages;
  check(msgs.some((m) => m.role === "tool"), `runTools(stream: ${stream}): no tool message`);
  ok(`runTools (stream: ${stream})`, `get_weather(${JSON.stringify(args)})`);
}
await refused("error: tool_choice naming no tool", 400, "tool_choice", () =>
  client.chat.completions.create({
    model, messages, max_tokens: 4,
    tools: [{ type: "function", function: { name: "get_weather", parameters: weather } }],
    tool_choice: { type: "function", function: { name: "nope" } },
  }));
await refused("error: unknown model", 404, "nope", () =>
  client.chat.completions.create({ model: "nope", messages, max_tokens: 4 }));
console.log("pass");
