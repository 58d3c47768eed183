// PostgREST as the caller: every read and write carries the caller's own JWT, so row-level
// security decides what the function may see and change. The service-role key is never used.

import { Refusal, refuse } from "./http.ts";

/** Who is calling, from the claims of a token PostgREST has accepted. */
export type CallerKind = "user" | "agent" | "master";

export interface Caller {
  /** The owner's user id (`sub`); an agent's and a master's token carry their owner's. */
  sub: string;
  kind: CallerKind;
  agentId?: string;
  deviceId?: string;
  rest: Rest;
}

export interface RestAnswer {
  status: number;
  body: unknown;
}

// Every call to the backend has a limit; a hung PostgREST must not hold a request forever.
const REST_TIMEOUT_MS = 10_000;

/**
 * PostgREST's base URL. Hosted, SUPABASE_URL is the API gateway and PostgREST is under
 * /rest/v1; AUTOCORE_REST_URL names PostgREST itself (the local stack has no gateway).
 */
export function restBase(): string {
  const direct = Deno.env.get("AUTOCORE_REST_URL");
  if (direct) return direct.replace(/\/+$/, "");
  const supabase = Deno.env.get("SUPABASE_URL");
  if (!supabase) throw new Error("SUPABASE_URL (or AUTOCORE_REST_URL) is not set");
  return `${supabase.replace(/\/+$/, "")}/rest/v1`;
}

export class Rest {
  constructor(
    private readonly base: string,
    private readonly authorization: string,
    private readonly apikey: string | undefined,
  ) {}

  async request(
    method: string,
    path: string,
    options: { body?: unknown; prefer?: string } = {},
  ): Promise<RestAnswer> {
    const headers: Record<string, string> = {
      Authorization: this.authorization,
      Accept: "application/json",
    };
    // The hosted gateway wants the project's anon key beside the user's token.
    if (this.apikey) headers.apikey = this.apikey;
    if (options.prefer) headers.Prefer = options.prefer;
    if (options.body !== undefined) headers["Content-Type"] = "application/json";
    let response: Response;
    try {
      response = await fetch(`${this.base}${path}`, {
        method,
        headers,
        body: options.body === undefined ? undefined : JSON.stringify(options.body),
        signal: AbortSignal.timeout(REST_TIMEOUT_MS),
      });
    } catch (e) {
      throw new Refusal(refuse(502, "backend_unreachable", `the backend did not answer: ${(e as Error).message}`));
    }
    const text = await response.text();
    let body: unknown = text;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      // Not JSON: keep the text for the message.
    }
    return { status: response.status, body };
  }

  /** Like `request`, but any answer outside 2xx becomes the caller's refusal. */
  async ok(method: string, path: string, options: { body?: unknown; prefer?: string } = {}): Promise<unknown> {
    const answer = await this.request(method, path, options);
    if (answer.status >= 200 && answer.status < 300) return answer.body;
    throw new Refusal(backendRefusal(answer));
  }
}

/** What PostgREST's refusal means for the caller, with the database's own words. */
export function backendRefusal(answer: RestAnswer): Response {
  const body = answer.body as { message?: string; code?: string } | null;
  const message = (body && typeof body === "object" && body.message) || String(answer.body);
  const code = body && typeof body === "object" ? body.code : undefined;
  switch (answer.status) {
    case 401:
      return refuse(401, "token_refused", `the backend refused the token: ${message}`);
    case 403:
      return refuse(403, "forbidden", message, { code });
    case 404:
      return refuse(404, "not_found", message, { code });
    case 409:
      return refuse(409, "conflict", message, { code });
    case 400:
      // A constraint or trigger of the database said no: the request, not the backend, is wrong.
      return refuse(422, "refused_by_database", message, { code });
    default:
      return refuse(502, "backend_error", `the backend answered ${answer.status}: ${message}`, { code });
  }
}

function decodeClaims(token: string): Record<string, unknown> | null {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "=".repeat((4 - (b64.length % 4)) % 4);
    const claims = JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(padded), (c) => c.charCodeAt(0))));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/**
 * The caller, after PostgREST has accepted its token: nothing is read from the claims before
 * the backend verified the signature and expiry (and, for an agent, that it is not revoked).
 * No token, the anon key, or a token the backend refuses: 401.
 */
export async function callerOf(req: Request): Promise<Caller> {
  const authorization = req.headers.get("Authorization") ?? "";
  const match = /^Bearer\s+(\S+)$/i.exec(authorization);
  if (!match) {
    throw new Refusal(refuse(401, "no_token", "send the user's JWT as `Authorization: Bearer <token>`"));
  }
  const claims = decodeClaims(match[1]);
  if (!claims || claims.role !== "authenticated" || typeof claims.sub !== "string") {
    throw new Refusal(
      refuse(401, "not_signed_in", "the token is not a signed-in user's (the anon key is not enough)"),
    );
  }
  const rest = new Rest(restBase(), `Bearer ${match[1]}`, Deno.env.get("SUPABASE_ANON_KEY") ?? undefined);
  // One cheap read that any live caller may make: PostgREST checks the signature and expiry,
  // and its pre-request hook refuses a revoked agent's token (403).
  const probe = await rest.request("GET", "/system_status?select=owner_id&limit=1");
  if (probe.status !== 200) throw new Refusal(backendRefusal(probe));
  const agentId = typeof claims.agent_id === "string" ? claims.agent_id : undefined;
  const deviceId = typeof claims.device_id === "string" ? claims.device_id : undefined;
  return {
    sub: claims.sub,
    kind: agentId ? "agent" : deviceId ? "master" : "user",
    agentId,
    deviceId,
    rest,
  };
}

/** A device the caller may see, or 404 (another owner's device looks like one that does not exist). */
export async function visibleDevice(
  caller: Caller,
  deviceId: string,
): Promise<{ device_id: string; owner_id: string }> {
  const rows = await caller.rest.ok(
    "GET",
    `/device_status?select=device_id,owner_id&device_id=eq.${encodeURIComponent(deviceId)}`,
  ) as { device_id: string; owner_id: string }[];
  if (rows.length === 0) {
    throw new Refusal(refuse(404, "unknown_device", `unknown device ${deviceId}`));
  }
  return rows[0];
}

/** A slave the cloud knows on a master (`relay_slaves`), with its relay count. */
export interface KnownSlave {
  slave_mac_address: string;
  relay_count: number;
  slave_name: string | null;
}

export async function knownSlaves(caller: Caller, masterDeviceId: string): Promise<KnownSlave[]> {
  return await caller.rest.ok(
    "GET",
    `/relay_slaves?select=slave_mac_address,relay_count,slave_name&master_device_id=eq.${
      encodeURIComponent(masterDeviceId)
    }&order=slave_mac_address`,
  ) as KnownSlave[];
}

/** How a list of known slaves reads in a message. */
export function describeSlaves(slaves: KnownSlave[]): string {
  if (slaves.length === 0) return "the cloud knows no slave of this device yet";
  return "known: " + slaves.map((s) => `${s.slave_mac_address} (${s.relay_count} relays)`).join(", ");
}
