// The official Node `openai` package against `moe-serve serve`: chat (whole and streamed),
// completions, n choices, the Responses API, and the errors agent frameworks meet (tools,
// structured output), each a check that fails the run with a message naming it.
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

const tool = {
  type: "function",
  function: { name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" } } } },
};
await refused("error: tools", 400, "tools", () =>
  client.chat.completions.create({ model, messages, max_tokens: 4, tools: [tool] }));
await refused("error: response_format", 400, "response_format", () =>
  client.chat.completions.create({ model, messages, max_tokens: 4, response_format: { type: "json_object" } }));
await refused("error: runTools", 400, "tools", async () => {
  const runner = client.chat.completions.runTools({
    model, messages, max_tokens: 4,
    tools: [{ type: "function", function: { name: "f", parameters: { type: "object", properties: {} }, function: () => "x" } }],
  });
  await runner.finalContent();
});
await refused("error: unknown model", 404, "nope", () =>
  client.chat.completions.create({ model: "nope", messages, max_tokens: 4 }));
console.log("pass");
