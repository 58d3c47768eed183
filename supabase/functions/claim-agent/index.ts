// claim-agent: the claim service of docs/decisions/0016-provisioning-and-claim.md, on hosted
// Supabase. `autocore-agent provision` POSTs {code, agent_id, name, masters} here with the
// project's public key; this function (service role, server side only) creates the agent's own
// Supabase Auth login, exchanges the code with public.claim_agent (one transaction: a refused
// code changes nothing, and the login is deleted again), signs the login in once, and returns
// the session. The login's random password is never stored or returned: from then on the Pi
// holds only its refresh token. The Custom Access Token Hook adds agent_id and owner_id to
// every token the login gets.
//
// Deploy: supabase functions deploy claim-agent --no-verify-jwt
// (the Pi has no user JWT; the code is its credential). The locally tested stand-in doing the
// same is tests/src/auth.rs.
import { createClient } from "npm:@supabase/supabase-js@2";

const SUPABASE_URL = Deno.env.get("SUPABASE_URL") ?? "";
const SERVICE_ROLE_KEY = Deno.env.get("SUPABASE_SERVICE_ROLE_KEY") ?? "";
const ANON_KEY = Deno.env.get("SUPABASE_ANON_KEY") ?? "";
const ID = /^[A-Za-z0-9_.:-]{1,64}$/;

function answer(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json" },
  });
}

// GoTrue's error shape, which the agent reads (msg).
function refuse(status: number, code: string, msg: string): Response {
  return answer(status, { code: status, error_code: code, msg });
}

// claim_agent's SQLSTATEs: a bad code 28000, someone else's master 42501, a taken id 23505.
function statusFor(sqlstate: string | undefined): number {
  switch (sqlstate) {
    case "28000":
    case "42501":
      return 403;
    case "23505":
      return 409;
    default:
      return 400;
  }
}

function randomSecret(bytes: number): string {
  const buf = new Uint8Array(bytes);
  crypto.getRandomValues(buf);
  return Array.from(buf, (b) => b.toString(16).padStart(2, "0")).join("");
}

Deno.serve(async (req: Request) => {
  if (req.method !== "POST") return refuse(405, "method", "POST only");
  let body: Record<string, unknown>;
  try {
    body = await req.json();
  } catch {
    return refuse(400, "bad_json", "the body is not JSON");
  }
  const { code, agent_id, name } = body;
  const masters = body.masters ?? [];
  if (typeof code !== "string" || code.length > 32) {
    return refuse(400, "bad_json", "code is required");
  }
  if (typeof agent_id !== "string" || !ID.test(agent_id)) {
    return refuse(400, "bad_json", "agent_id must be 1-64 characters of A-Z a-z 0-9 _ . : -");
  }
  if (!Array.isArray(masters) || masters.length > 32 ||
      !masters.every((m) => typeof m === "string" && ID.test(m))) {
    return refuse(400, "bad_json", "masters must be at most 32 device ids");
  }
  const admin = createClient(SUPABASE_URL, SERVICE_ROLE_KEY, {
    auth: { persistSession: false, autoRefreshToken: false },
  });
  const email = `${agent_id.toLowerCase().replace(/[^a-z0-9._-]/g, "-")}.${crypto.randomUUID()}@agents.autocore.invalid`;
  const password = randomSecret(32);
  const created = await admin.auth.admin.createUser({
    email,
    password,
    email_confirm: true,
    app_metadata: { autocore_agent: agent_id },
  });
  if (created.error || !created.data.user) {
    return refuse(502, "auth", `cannot create the agent's login: ${created.error?.message}`);
  }
  const userId = created.data.user.id;
  const claimed = await admin.rpc("claim_agent", {
    p_code: code,
    p_agent_id: agent_id,
    p_agent_name: typeof name === "string" ? name : null,
    p_masters: masters,
    p_auth_user_id: userId,
  });
  if (claimed.error) {
    await admin.auth.admin.deleteUser(userId);
    return refuse(statusFor(claimed.error.code), claimed.error.code ?? "claim", claimed.error.message);
  }
  const row = claimed.data[0];
  const anon = createClient(SUPABASE_URL, ANON_KEY, {
    auth: { persistSession: false, autoRefreshToken: false },
  });
  const signedIn = await anon.auth.signInWithPassword({ email, password });
  if (signedIn.error || !signedIn.data.session) {
    return refuse(502, "auth", `the agent is claimed but its login failed: ${signedIn.error?.message}`);
  }
  const session = signedIn.data.session;
  return answer(200, {
    access_token: session.access_token,
    refresh_token: session.refresh_token,
    token_type: "bearer",
    expires_in: session.expires_in,
    expires_at: session.expires_at,
    agent_id: row.agent_id,
    owner_id: row.owner_id,
    masters: row.masters,
    rest_url: `${SUPABASE_URL}/rest/v1`,
    auth_url: `${SUPABASE_URL}/auth/v1`,
  });
});
