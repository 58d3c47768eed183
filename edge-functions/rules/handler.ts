// `rules`: create (POST) and update (PATCH) a decision rule after checking it the way the Pi
// will: the body against the committed JSON Schema (schemas/rule_json.schema.json, generated
// from the agent's Rust types), the database's own rule checks (public.rule_json_problems) for
// what a schema cannot say, and the device's known slaves and their relay counts. Every
// problem comes back at once, each with its path (422). The row is written through PostgREST
// with the caller's JWT, so row-level security decides as for a direct write.

import { invalid, json, type Problem, readObject, refuse, serveJson } from "../_shared/http.ts";
import { backendRefusal, type Caller, callerOf, describeSlaves, knownSlaves, visibleDevice } from "../_shared/rest.ts";
import { compile, problemsOf, RULE_JSON_REF, sortByPath } from "../_shared/validate.ts";

// decision_rules' own column constraints (supabase/migrations/20261122000100_core_schema.sql).
const RULE_FIELDS = {
  rule_name: { type: "string", minLength: 1, maxLength: 200 },
  rule_description: { type: ["string", "null"], maxLength: 4000 },
  rule_json: { $ref: RULE_JSON_REF },
  enabled: { type: "boolean" },
  priority: { type: "integer", minimum: 0, maximum: 100 },
  cooldown_seconds: { type: "integer", minimum: 0, maximum: 86400 },
  max_executions_per_hour: { type: "integer", minimum: 1, maximum: 3600 },
};

const validateCreate = compile({
  type: "object",
  properties: {
    device_id: { type: "string", pattern: "^[A-Za-z0-9_.:-]{1,64}$" },
    rule_id: { type: "string", pattern: "^[A-Za-z0-9_.:-]{1,64}$" },
    ...RULE_FIELDS,
    // Check only: an editor validating as the user types. Answers 200 with the problems.
    dry_run: { type: "boolean" },
  },
  required: ["device_id", "rule_id", "rule_name", "rule_json"],
  additionalProperties: false,
});

// A rule keeps its device and rule_id; anything else may change.
const validateUpdate = compile({
  type: "object",
  properties: {
    id: { type: "string", pattern: "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$" },
    ...RULE_FIELDS,
  },
  required: ["id"],
  minProperties: 2,
  additionalProperties: false,
});

// What public.rule_json_problems checks and a JSON Schema cannot: blank names, an empty day
// list, nesting depth, MQTT wildcards. Its other findings repeat the schema's in other words.
const DATABASE_ONLY = /^(empty (sensor|other_sensor|macro_id|days) |nesting deeper than |topic ")/;

/** The database's findings the schema did not already make, as problems with paths. */
async function databaseProblems(caller: Caller, ruleJson: unknown, schemaProblems: Problem[]): Promise<Problem[]> {
  const found = await caller.rest.ok("POST", "/rpc/rule_json_problems", { body: { rule: ruleJson } }) as string[];
  const problems: Problem[] = [];
  for (const text of found ?? []) {
    // Each ends in " at <path>", the path the agent uses (`actions[0]`, `conditions.conditions[1]`).
    const at = text.lastIndexOf(" at ");
    const node = at >= 0 ? text.slice(at + 4) : "rule_json";
    const path = node === "rule_json" ? "rule_json" : `rule_json.${node}`;
    const message = at >= 0 ? text.slice(0, at) : text;
    const covered = schemaProblems.some((p) =>
      p.path === path || p.path.startsWith(`${path}.`) || p.path.startsWith(`${path}[`)
    );
    if (DATABASE_ONLY.test(message) || !covered) problems.push({ path, message });
  }
  return problems;
}

/** Relay actions naming a slave the device does not have, or a relay that slave lacks. */
async function deviceProblems(caller: Caller, deviceId: string, ruleJson: unknown): Promise<Problem[]> {
  const actions = (ruleJson as { actions?: unknown })?.actions;
  if (!Array.isArray(actions)) return [];
  const slaves = await knownSlaves(caller, deviceId);
  const problems: Problem[] = [];
  actions.forEach((action, i) => {
    if (action === null || typeof action !== "object") return;
    const { type, slave_mac_address: mac, relay_number: relay } = action as Record<string, unknown>;
    if (type !== "relay_on" && type !== "relay_off") return;
    // A malformed MAC or relay number is the schema's problem, already reported.
    if (typeof mac !== "string" || !/^[0-9A-F]{2}(:[0-9A-F]{2}){5}$/.test(mac)) return;
    const slave = slaves.find((s) => s.slave_mac_address === mac);
    if (!slave) {
      problems.push({
        path: `rule_json.actions[${i}].slave_mac_address`,
        message: `slave ${mac} is not a known slave of device ${deviceId} (${describeSlaves(slaves)})`,
      });
    } else if (typeof relay === "number" && Number.isInteger(relay) && relay >= slave.relay_count && relay <= 15) {
      problems.push({
        path: `rule_json.actions[${i}].relay_number`,
        message: `relay ${relay} does not exist on slave ${mac}, which has ${slave.relay_count} relays (0..${
          slave.relay_count - 1
        })`,
      });
    }
  });
  return problems;
}

async function ruleProblems(
  caller: Caller,
  deviceId: string,
  body: Record<string, unknown>,
  schemaProblems: Problem[],
) {
  const ruleJson = body.rule_json;
  if (ruleJson === null || typeof ruleJson !== "object" || Array.isArray(ruleJson)) return schemaProblems;
  return sortByPath([
    ...schemaProblems,
    ...await databaseProblems(caller, ruleJson, schemaProblems),
    ...await deviceProblems(caller, deviceId, ruleJson),
  ]);
}

function duplicateOr(answer: { status: number; body: unknown }, deviceId: string, ruleId: unknown): Response {
  const code = (answer.body as { code?: string } | null)?.code;
  if (answer.status === 409 && code === "23505") {
    return refuse(409, "rule_exists", `device ${deviceId} already has a rule ${ruleId}; update it (PATCH with its id)`);
  }
  return backendRefusal(answer);
}

async function create(req: Request): Promise<Response> {
  const caller = await callerOf(req);
  const body = await readObject(req);
  const schemaProblems = problemsOf(validateCreate, body);
  if (typeof body.device_id !== "string" || schemaProblems.some((p) => p.path === "device_id")) {
    return invalid("the rule was not saved", schemaProblems);
  }
  const device = await visibleDevice(caller, body.device_id);
  const problems = await ruleProblems(caller, device.device_id, body, schemaProblems);
  const { dry_run: dryRun, ...row } = body;
  if (dryRun === true) return json(200, { valid: problems.length === 0, problems });
  if (problems.length > 0) return invalid("the rule was not saved", problems);
  const answer = await caller.rest.request("POST", "/decision_rules", {
    body: row,
    prefer: "return=representation",
  });
  if (answer.status !== 201) return duplicateOr(answer, device.device_id, body.rule_id);
  return json(201, { rule: (answer.body as unknown[])[0] });
}

async function update(req: Request): Promise<Response> {
  const caller = await callerOf(req);
  const body = await readObject(req);
  const schemaProblems = problemsOf(validateUpdate, body);
  if (typeof body.id !== "string" || schemaProblems.some((p) => p.path === "id")) {
    return invalid("the rule was not saved", schemaProblems);
  }
  const id = body.id;
  const rows = await caller.rest.ok("GET", `/decision_rules?select=id,device_id&id=eq.${encodeURIComponent(id)}`) as {
    device_id: string;
  }[];
  if (rows.length === 0) return refuse(404, "unknown_rule", `unknown rule ${id}`);
  const problems = await ruleProblems(caller, rows[0].device_id, body, schemaProblems);
  if (problems.length > 0) return invalid("the rule was not saved", problems);
  const { id: _, ...changes } = body;
  const changed = await caller.rest.ok("PATCH", `/decision_rules?id=eq.${encodeURIComponent(id)}`, {
    body: changes,
    prefer: "return=representation",
  }) as unknown[];
  // Seen but not changed: row-level security let the caller read the rule, not write it.
  if (changed.length === 0) return refuse(403, "forbidden", `this token may not change rule ${id}`);
  return json(200, { rule: changed[0] });
}

export const handler = serveJson(["POST", "PATCH"], (req) => req.method === "PATCH" ? update(req) : create(req));
