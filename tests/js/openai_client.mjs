// `victor serve` answered by the official `openai` npm package: non-streaming and streaming
// completions with an image part must equal `victor generate`'s answer; usage and errors must
// come back in the shapes the package expects.
import fs from "node:fs";
import OpenAI from "openai";

const [baseURL, imagePath, expectedPath] = process.argv.slice(2);
const expected = fs.readFileSync(expectedPath, "utf8").replace(/\n$/, "");
let failed = 0;
const check = (ok, what) => {
  console.log(`${ok ? "ok" : "FAIL"}: ${what}`);
  if (!ok) failed = 1;
};

const client = new OpenAI({ baseURL, apiKey: "not-needed", maxRetries: 0 });
const models = await client.models.list();
const model = models.data[0].id;
check(typeof model === "string" && model.length > 0, `models.list names the model (${model})`);

const url = "data:image/png;base64," + fs.readFileSync(imagePath).toString("base64");
const messages = [{
  role: "user",
  content: [{ type: "image_url", image_url: { url } }, { type: "text", text: "How many bags are there?" }],
}];

const r = await client.chat.completions.create({ model, messages, max_completion_tokens: 8, temperature: 0 });
const text = r.choices[0].message.content;
check(text === expected, `non-streaming answer equals victor generate's (${JSON.stringify(text)} vs ${JSON.stringify(expected)})`);
check(r.choices[0].message.role === "assistant", "role is assistant");
check(["stop", "length"].includes(r.choices[0].finish_reason), `finish_reason ${r.choices[0].finish_reason}`);
check(r.usage.completion_tokens > 0 && r.usage.total_tokens === r.usage.prompt_tokens + r.usage.completion_tokens,
      `usage ${JSON.stringify(r.usage)}`);

const stream = await client.chat.completions.create({
  model, messages, max_tokens: 8, temperature: 0, stream: true, stream_options: { include_usage: true },
});
let streamed = "";
let usage = null;
let chunks = 0;
for await (const chunk of stream) {
  chunks += 1;
  if (chunk.usage) usage = chunk.usage;
  const delta = chunk.choices[0]?.delta?.content;
  if (delta) streamed += delta;
}
check(streamed === expected, `streamed answer equals victor generate's (${chunks} chunks)`);
check(usage && usage.completion_tokens === r.usage.completion_tokens && usage.prompt_tokens === r.usage.prompt_tokens,
      "streamed usage equals the non-streaming usage");

try {
  await client.chat.completions.create({ model: "no-such-model", messages, max_tokens: 2 });
  check(false, "an unknown model is refused");
} catch (e) {
  check(e instanceof OpenAI.APIError && e.status === 404 && /no-such-model/.test(e.message),
        `an unknown model is refused with 404 (${e.status}: ${e.message})`);
}
try {
  await client.chat.completions.create({ model, messages, max_tokens: 2, temperature: 7 });
  check(false, "temperature 7 is refused");
} catch (e) {
  check(e instanceof OpenAI.BadRequestError && e.param === "temperature", `temperature 7 is refused with 400 naming the param (${e.message})`);
}
process.exit(failed);
