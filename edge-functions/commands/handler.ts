// `commands`: send (POST) a manual relay command to one slave of a master, after the checks the
// cloud can make: the slave is known and has those relays, at most 5 relays, each once, an
// expiry in range, and the owner's emergency latch not set. Inserted into relay_commands_slave
// through PostgREST with the caller's JWT. Mutex groups live in the Pi's configuration
// ([safety.mutex_groups]), not in the cloud, so the Pi's arbiter is where they hold; see
// edge-functions/README.md.

import { invalid, json, type Problem, readObject, refuse, serveJson } from "../_shared/http.ts";
import { backendRefusal, callerOf, describeSlaves, knownSlaves, visibleDevice } from "../_shared/rest.ts";
import { compile, problemsOf, sortByPath } from "../_shared/validate.ts";

/** relay_commands_slave_manual_max_5_relays. */
export const MAX_RELAYS = 5;
/** Less than this and the Pi may not get to send it (poll interval plus its send margin). */
export const MIN_EXPIRES_IN_SECONDS = 5;
/** relay_commands_slave_expiry_window: at most 7 days after creation. */
export const MAX_EXPIRES_IN_SECONDS = 7 * 24 * 3600;
/** The table's default expiry. */
export const DEFAULT_EXPIRES_IN_SECONDS = 300;

const MAC = "^[0-9A-F]{2}(:[0-9A-F]{2}){5}$";

const validateSend = compile({
  type: "object",
  properties: {
    master_device_id: { type: "string", pattern: "^[A-Za-z0-9_.:-]{1,64}$" },
    slave_mac_address: { type: "string", pattern: MAC },
    relay_numbers: {
      type: "array",
      minItems: 1,
      maxItems: MAX_RELAYS,
      uniqueItems: true,
      items: { type: "integer", minimum: 0, maximum: 15 },
    },
    actions: { type: "array", minItems: 1, maxItems: MAX_RELAYS, items: { enum: ["on", "off"] } },
    duration_seconds: {
      type: "array",
      minItems: 1,
      maxItems: MAX_RELAYS,
      items: { type: "integer", minimum: 0, maximum: 86400 },
    },
    priority: { type: "integer", minimum: 0, maximum: 100 },
    expires_in_seconds: { type: "integer", minimum: MIN_EXPIRES_IN_SECONDS, maximum: MAX_EXPIRES_IN_SECONDS },
    client_id: {
      type: "string",
      pattern: "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$",
    },
    slave_device_id: { type: ["string", "null"], maxLength: 64 },
    user_email: { type: ["string", "null"], maxLength: 320 },
  },
  required: ["master_device_id", "slave_mac_address", "relay_numbers", "actions", "duration_seconds"],
  additionalProperties: false,
});

function lengthProblems(body: Record<string, unknown>): Problem[] {
  const relays = body.relay_numbers, actions = body.actions, durations = body.duration_seconds;
  if (!Array.isArray(relays) || !Array.isArray(actions) || !Array.isArray(durations)) return [];
  const problems: Problem[] = [];
  if (actions.length !== relays.length) {
    problems.push({ path: "actions", message: `${actions.length} actions for ${relays.length} relays; one each` });
  }
  if (durations.length !== relays.length) {
    problems.push({
      path: "duration_seconds",
      message: `${durations.length} durations for ${relays.length} relays; one each`,
    });
  }
  return problems;
}

interface Latch {
  emergency_stop: boolean;
  emergency_reason: string | null;
  emergency_changed_at: string | null;
  emergency_changed_by: string | null;
}

async function send(req: Request): Promise<Response> {
  const caller = await callerOf(req);
  const body = await readObject(req);
  const problems = [...problemsOf(validateSend, body), ...lengthProblems(body)];
  if (typeof body.master_device_id !== "string" || problems.some((p) => p.path === "master_device_id")) {
    return invalid("the command was not sent", sortByPath(problems));
  }
  const device = await visibleDevice(caller, body.master_device_id);
  const mac = body.slave_mac_address;
  if (typeof mac === "string" && new RegExp(MAC).test(mac)) {
    const slaves = await knownSlaves(caller, device.device_id);
    const slave = slaves.find((s) => s.slave_mac_address === mac);
    if (!slave) {
      problems.push({
        path: "slave_mac_address",
        message: `slave ${mac} is not a known slave of device ${device.device_id} (${describeSlaves(slaves)})`,
      });
    } else if (Array.isArray(body.relay_numbers)) {
      body.relay_numbers.forEach((relay, i) => {
        if (typeof relay === "number" && Number.isInteger(relay) && relay >= slave.relay_count && relay <= 15) {
          problems.push({
            path: `relay_numbers[${i}]`,
            message: `relay ${relay} does not exist on slave ${mac}, which has ${slave.relay_count} relays (0..${
              slave.relay_count - 1
            })`,
          });
        }
      });
    }
  }
  if (problems.length > 0) return invalid("the command was not sent", sortByPath(problems));

  // The latch of the device's owner: nothing is sent while the plant is stopped. Row-level
  // security shows a caller only its own owner's row, the same owner as the device's.
  const latches = await caller.rest.ok(
    "GET",
    `/system_status?select=emergency_stop,emergency_reason,emergency_changed_at,emergency_changed_by&owner_id=eq.${device.owner_id}`,
  ) as Latch[];
  const latch = latches[0];
  if (latch?.emergency_stop) {
    return refuse(
      409,
      "emergency_stop",
      `the emergency stop is set (since ${latch.emergency_changed_at ?? "an unknown time"}, by ${
        latch.emergency_changed_by ?? "someone"
      }: ${latch.emergency_reason ?? "no reason given"}); no command is sent until its owner resets it`,
    );
  }

  const expiresIn = typeof body.expires_in_seconds === "number" ? body.expires_in_seconds : DEFAULT_EXPIRES_IN_SECONDS;
  const { expires_in_seconds: _, ...columns } = body;
  const row = {
    ...columns,
    command_type: "manual",
    triggered_by: "manual",
    status: "pending",
    expires_at: new Date(Date.now() + expiresIn * 1000).toISOString(),
  };
  const answer = await caller.rest.request("POST", "/relay_commands_slave", {
    body: row,
    prefer: "return=representation",
  });
  if (answer.status === 409 && (answer.body as { code?: string } | null)?.code === "23505") {
    // The idempotency key: a retry of a command that was already queued.
    return refuse(409, "duplicate_client_id", `a command with client_id ${body.client_id} was already sent`);
  }
  if (answer.status !== 201) return backendRefusal(answer);
  return json(201, { command: (answer.body as unknown[])[0] });
}

export const handler = serveJson(["POST"], send);
