// An unchanged @grpc/grpc-js client built from the spec's proto (../spec/worker.proto).
//
// Usage: node client.js ADDRESS CA CERT KEY < calls.json
// calls.json: [{"method": "GetJob", "request": {"id": "1"}}, ...], run in order.
// Prints one JSON array: per call {"ok": response} or {"code": N, "details": "..."}; for
// GetJobsStream {"payload": base64 of all chunks, "code", "details", "trailers": {...}}.
"use strict";
const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, caPath, certPath, keyPath] = process.argv.slice(2);
const definition = protoLoader.loadSync(path.join(__dirname, "..", "spec", "worker.proto"), {
  keepCase: true,
  longs: String,
  defaults: true,
});
const { JobService } = grpc.loadPackageDefinition(definition).job_worker;
const credentials = grpc.credentials.createSsl(
  fs.readFileSync(caPath),
  fs.readFileSync(keyPath),
  fs.readFileSync(certPath),
);
const client = new JobService(address, credentials);

function metadataObject(metadata) {
  const out = {};
  for (const [name, value] of Object.entries(metadata ? metadata.getMap() : {})) {
    out[name] = Buffer.isBuffer(value) ? value.toString("base64") : value;
  }
  return out;
}

function unary(method, request) {
  return new Promise((resolve) => {
    client[method](request, { deadline: Date.now() + 10000 }, (error, response) => {
      if (error) resolve({ code: error.code, details: error.details });
      else resolve({ ok: response });
    });
  });
}

function stream(request) {
  return new Promise((resolve) => {
    const chunks = [];
    const call = client.GetJobsStream(request, { deadline: Date.now() + 30000 });
    call.on("data", (chunk) => chunks.push(chunk.payload));
    call.on("error", () => {}); // the status event carries the outcome
    call.on("status", (status) => {
      resolve({
        payload: Buffer.concat(chunks).toString("base64"),
        code: status.code,
        details: status.details,
        trailers: metadataObject(status.metadata),
      });
    });
  });
}

async function main() {
  const calls = JSON.parse(fs.readFileSync(0, "utf8"));
  const results = [];
  for (const { method, request } of calls) {
    results.push(method === "GetJobsStream" ? await stream(request) : await unary(method, request));
  }
  process.stdout.write(JSON.stringify(results));
  client.close();
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error) + "\n");
  process.exit(1);
});
