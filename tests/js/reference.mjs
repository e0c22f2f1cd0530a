// The provider page's JavaScript example (the page restored in shared/reference/README.md), unchanged
// but for where BASE, API_KEY and `stream` come from: the environment, set by tests/test_server.py.
import OpenAI from "openai";

const BASE = process.env.BASE;
const API_KEY = process.env.API_KEY;

const openai = new OpenAI({ baseURL: BASE, apiKey: API_KEY });
const stream = process.env.STREAM === "true"; // or false

async function run() {
  const completion = await openai.chat.completions.create({
    messages: [
      { role: "system", content: "Act like you are a helpful assistant." },
      { role: "user", content: "Hi there!" },
    ],
    model: "mistralai/mistral-7b-instruct",
    stream,
  });

  if (stream) {
    for await (const chunk of completion) {
      if (chunk.choices[0].finish_reason) {
        console.log(chunk.choices[0].finish_reason);
      } else {
        console.log(chunk.choices[0].delta.content);
      }
    }
  } else {
    console.log(JSON.stringify(completion));
  }
}

run();
