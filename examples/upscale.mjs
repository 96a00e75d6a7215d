// Upscale an image with a running `sdx4 serve` from JavaScript (Node 18+
// or a browser: only fetch, FormData and Blob are used).
//
//   node upscale.mjs IN OUT      (SDX4_URL, SDX4_API_KEY and STEPS from the environment)
//
// Runs the upscale as a job, prints its progress from the Server-Sent
// Events stream, then saves the result.
import { readFile, writeFile } from "node:fs/promises";

const [input, output] = process.argv.slice(2);
const url = process.env.SDX4_URL ?? "http://127.0.0.1:8000";
const headers = process.env.SDX4_API_KEY ? { Authorization: `Bearer ${process.env.SDX4_API_KEY}` } : {};

async function check(response, expected) {
  if (response.status === expected) return response;
  const problem = await response.json(); // RFC 9457 application/problem+json
  throw new Error(`${problem.status} ${problem.title}: ${problem.detail} (request ${problem.request_id})`);
}

const form = new FormData();
form.append("image", new Blob([await readFile(input)]), input);
form.append("num_inference_steps", process.env.STEPS ?? "20");
form.append("seed", "42");
form.append("prompt", "a photo");

const job = await (await check(await fetch(`${url}/api/v1/jobs`, { method: "POST", headers, body: form }), 202)).json();

// Server-Sent Events: "event: <status>" and "data: <job document>" lines
const events = await check(await fetch(url + job.links.events, { headers }), 200);
const decoder = new TextDecoder();
let buffered = "";
for await (const chunk of events.body) {
  buffered += decoder.decode(chunk, { stream: true });
  let end;
  while ((end = buffered.indexOf("\n\n")) >= 0) {
    const data = buffered.slice(0, end).split("\n").find((line) => line.startsWith("data: "));
    buffered = buffered.slice(end + 2);
    if (data) {
      const status = JSON.parse(data.slice(6));
      console.error(`${status.status}: step ${status.progress.step} of ${status.progress.total}`);
    }
  }
}

const result = await check(await fetch(url + job.links.result, { headers }), 200);
await writeFile(output, Buffer.from(await result.arrayBuffer()));
console.error(`${output}: ${result.headers.get("x-output-size")}, seed ${result.headers.get("x-seed")}`);
