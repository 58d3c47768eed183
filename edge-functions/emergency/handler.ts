// `emergency`: stop (POST {"action": "stop"}) and reset (POST {"action": "reset"}) the owner's
// emergency latch, `system_status` (docs/decisions/0002-emergency-stop-per-owner.md). Every
// agent of the owner reads the latch on each poll and stops every relay of every master.
// Stop: any caller that may write the latch (the owner, or one of the owner's live agents).
// Reset: the owner only, signed in as a person; an agent's or a master's token is refused, and
// another owner's device is unknown. There are no shared accounts or roles in the schema, so
// "the owner" is the one user the device belongs to.

import { invalid, json, readObject, refuse, serveJson } from "../_shared/http.ts";
import { type Caller, callerOf, visibleDevice } from "../_shared/rest.ts";
import { compile, problemsOf } from "../_shared/validate.ts";

const validateRequest = compile({
  type: "object",
  properties: {
    action: { enum: ["stop", "reset"] },
    // Names the plant by one of its devices; without it, the caller's own.
    device_id: { type: "string", pattern: "^[A-Za-z0-9_.:-]{1,64}$" },
    reason: { type: "string", minLength: 1, maxLength: 500 },
  },
  required: ["action"],
  additionalProperties: false,
});

function whoIs(caller: Caller): string {
  switch (caller.kind) {
    case "agent":
      return `agent ${caller.agentId} (cloud)`;
    case "master":
      return `master ${caller.deviceId} (cloud)`;
    default:
      return `user ${caller.sub} (cloud)`;
  }
}

async function latch(req: Request): Promise<Response> {
  const caller = await callerOf(req);
  const body = await readObject(req);
  const problems = problemsOf(validateRequest, body);
  if (problems.length > 0) return invalid("nothing was changed", problems);
  const stop = body.action === "stop";
  // The plant is the owner's; a device names it and must be one the caller may see.
  const owner = typeof body.device_id === "string"
    ? (await visibleDevice(caller, body.device_id)).owner_id
    : caller.sub;
  if (owner !== caller.sub) {
    return refuse(404, "unknown_device", `unknown device ${body.device_id}`);
  }
  if (!stop && caller.kind !== "user") {
    return refuse(
      403,
      "reset_owner_only",
      "only the owner, signed in, resets the emergency stop from the cloud; on the Pi, the operator resets it (POST /emergency/reset with the operator token)",
    );
  }
  if (stop && caller.kind === "master") {
    return refuse(403, "forbidden", "a master's token cannot set the latch; the owner or an edge agent can");
  }
  const row = {
    owner_id: owner,
    emergency_stop: stop,
    emergency_reason: stop ? (typeof body.reason === "string" ? body.reason : "stopped from the dashboard") : null,
    // The agents compare this with their own last change: the newer one wins.
    emergency_changed_at: new Date().toISOString(),
    emergency_changed_by: whoIs(caller),
  };
  const rows = await caller.rest.ok("POST", "/system_status?on_conflict=owner_id", {
    body: row,
    prefer: "return=representation,resolution=merge-duplicates",
  }) as unknown[];
  return json(200, { system_status: rows[0] });
}

export const handler = serveJson(["POST"], latch);
