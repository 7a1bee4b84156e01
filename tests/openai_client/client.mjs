// The official OpenAI Node client against the gateway, unchanged: chat and completions, with
// and without streaming. Usage: node client.mjs http://127.0.0.1:PORT/v1
// Prints one "ok <case>" line per case and exits non-zero on the first failure.
import OpenAI from "openai";

const baseURL = process.argv[2];
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 20000 });

function check(condition, message) {
  if (!condition) {
    console.error("FAILED: " + message);
    process.exit(1);
  }
}

// `client.mjs URL backpressure`: requests the gateway refuses for want of room (429, or 503
// after its queue's time) are retried by the client as it comes (its default retries honour
// Retry-After), so all of them are served in the end.
if (process.argv[3] === "backpressure") {
  const retrying = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 8, timeout: 20000 });
  const answers = await Promise.all(
    [0, 1, 2, 3].map(() =>
      retrying.chat.completions.create({
        model: "mock-model",
        messages: [{ role: "user", content: "hello there" }],
        max_tokens: 3,
      }),
    ),
  );
  check(answers.every((a) => a.choices[0].message.content === "tok0 tok1 tok2 "), "backpressure: every answer");
  console.log("ALL OK");
  process.exit(0);
}

const chat = await client.chat.completions.create({
  model: "mock-model",
  messages: [{ role: "user", content: "hello there" }],
  max_tokens: 4,
  n: 2,
});
check(chat.choices.length === 2, "chat: two choices");
check(chat.choices[0].message.content === "tok0 tok1 tok2 tok3 ", "chat: content " + chat.choices[0].message.content);
check(chat.usage.completion_tokens === 8, "chat: usage");
console.log("ok chat");

const stream = await client.chat.completions.create({
  model: "mock-model",
  messages: [{ role: "user", content: "hello there" }],
  max_tokens: 5,
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let usage = null;
for await (const chunk of stream) {
  if (chunk.choices.length > 0) text += chunk.choices[0].delta.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
check(text === "tok0 tok1 tok2 tok3 tok4 ", "chat stream: text " + text);
check(usage && usage.completion_tokens === 5, "chat stream: usage");
console.log("ok chat-stream");

const completion = await client.completions.create({ model: "mock-model", prompt: "hi", max_tokens: 3 });
check(completion.choices[0].text === "tok0 tok1 tok2 ", "completion: text");
console.log("ok completion");

let streamed = "";
for await (const chunk of await client.completions.create({ model: "mock-model", prompt: "hi", max_tokens: 3, stream: true })) {
  streamed += chunk.choices[0]?.text ?? "";
}
check(streamed === "tok0 tok1 tok2 ", "completion stream: text " + streamed);
console.log("ok completion-stream");

const models = await client.models.list();
check(models.data.some((m) => m.id === "mock-model"), "models: mock-model listed");
console.log("ok models");

// An error the gateway makes itself parses as an OpenAI APIError.
try {
  await client.chat.completions.create({ model: "mock-model", messages: "not-a-list" });
  check(false, "bad request: expected an error");
} catch (e) {
  check(e instanceof OpenAI.APIError && e.status === 400, "bad request: APIError 400, got " + e);
}
console.log("ok errors");
console.log("ALL OK");
