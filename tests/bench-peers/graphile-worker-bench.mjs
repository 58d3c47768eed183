// bench-backend's peer: graphile-worker (npm), batched as its documentation recommends for
// throughput (localQueue, job completions batched with no delay), on the same Postgres.
// Arguments: connection string, jobs to seed, seconds, concurrency, local queue size.
// Prints one JSON line: {"jobs_per_s", "done", "seconds"}.
import { Logger, run, makeWorkerUtils } from "graphile-worker";

const [connectionString, jobsArg, secondsArg, concurrencyArg, queueArg] = process.argv.slice(2);
const jobs = Number(jobsArg);
const seconds = Number(secondsArg);
const concurrency = Number(concurrencyArg);
const queueSize = Number(queueArg);

// Its INFO line per job would cost it more than the job: silent, as our side logs nothing.
const logger = new Logger(() => () => {});
const utils = await makeWorkerUtils({ connectionString, logger });
await utils.migrate();
await utils.withPgClient((client) =>
  client.query("delete from graphile_worker._private_jobs"),
);
// Seeded with graphile_worker.add_jobs, 10,000 per statement, before the clock starts.
for (let at = 0; at < jobs; at += 10000) {
  const n = Math.min(10000, jobs - at);
  await utils.withPgClient((client) =>
    client.query(
      `select count(*) from graphile_worker.add_jobs(
         array(select row('noop', json_build_object('i', g), null, null, null, null, null, null)::graphile_worker.job_spec
                 from generate_series($1::int, $2::int) g))`,
      [at + 1, at + n],
    ),
  );
}
await utils.release();

let done = 0;
const started = performance.now();
const runner = await run({
  connectionString,
  concurrency,
  noHandleSignals: true,
  logger,
  pollInterval: 1000,
  taskList: {
    noop: async () => {
      done += 1;
    },
  },
  preset: {
    worker: {
      localQueue: { size: queueSize },
      completeJobBatchDelay: 0,
      failJobBatchDelay: 0,
    },
  },
});
await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
const elapsed = (performance.now() - started) / 1000;
const counted = done;
await runner.stop();
console.log(JSON.stringify({ jobs_per_s: counted / elapsed, done: counted, seconds: elapsed }));
