// Responses and request parsing shared by the functions: JSON bodies, CORS for browsers calling
// through supabase-js (`functions.invoke`), and one error shape.

/** One thing wrong with a request, at its path in the request body (`rule_json.actions[0]`). */
export interface Problem {
  path: string;
  message: string;
}

// supabase-js sends these headers; a browser asks for them in its preflight.
const CORS_HEADERS: Record<string, string> = {
  "Access-Control-Allow-Origin": "*",
  "Access-Control-Allow-Headers": "authorization, x-client-info, apikey, content-type",
  "Access-Control-Allow-Methods": "POST, PATCH, OPTIONS",
};

export function json(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { ...CORS_HEADERS, "Content-Type": "application/json" },
  });
}

/** A refusal: `error` is a stable code for programs, `message` a sentence for people. */
export function refuse(status: number, error: string, message: string, extra: Record<string, unknown> = {}): Response {
  return json(status, { error, message, ...extra });
}

/** 422 with every problem found, each with its path. */
export function invalid(message: string, problems: Problem[]): Response {
  return refuse(422, "invalid_request", message, { problems });
}

export function preflight(): Response {
  return new Response(null, { status: 204, headers: CORS_HEADERS });
}

/** A typed early exit: handlers throw it and `serveJson` turns it into its response. */
export class Refusal extends Error {
  constructor(readonly response: Response) {
    super("refused");
  }
}

// Bodies are small JSON objects; anything bigger is refused before it is parsed.
export const MAX_BODY_BYTES = 64 * 1024;
// A body over the limit is read on (and thrown away) up to this much, so that the client, still
// sending, gets the 413 instead of a reset connection; past it the connection is dropped.
const DRAIN_BYTES = 1024 * 1024;

/** The body's text; past `MAX_BODY_BYTES` nothing more is kept and the answer is 413. */
async function boundedText(req: Request): Promise<string> {
  const tooLarge = () => new Refusal(refuse(413, "body_too_large", `the body is larger than ${MAX_BODY_BYTES} bytes`));
  if (!req.body) return "";
  const chunks: Uint8Array[] = [];
  let size = 0;
  const reader = req.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    size += value.length;
    if (size > DRAIN_BYTES) {
      await reader.cancel();
      throw tooLarge();
    }
    if (size <= MAX_BODY_BYTES) chunks.push(value);
  }
  if (size > MAX_BODY_BYTES) throw tooLarge();
  const bytes = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.length;
  }
  return new TextDecoder().decode(bytes);
}

/** The request body as a JSON object, or a 400 saying what is wrong with it. */
export async function readObject(req: Request): Promise<Record<string, unknown>> {
  const text = await boundedText(req);
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch (e) {
    throw new Refusal(refuse(400, "malformed_json", `the body is not JSON: ${(e as Error).message}`));
  }
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    throw new Refusal(refuse(400, "malformed_body", "the body must be a JSON object"));
  }
  return body as Record<string, unknown>;
}

/** Wraps a handler: CORS preflight, allowed methods, and `Refusal`s as their responses. */
export function serveJson(
  methods: string[],
  handler: (req: Request) => Promise<Response>,
): (req: Request) => Promise<Response> {
  return async (req: Request) => {
    if (req.method === "OPTIONS") return preflight();
    if (!methods.includes(req.method)) {
      return refuse(405, "method_not_allowed", `use ${methods.join(" or ")}`);
    }
    try {
      return await handler(req);
    } catch (e) {
      if (e instanceof Refusal) return e.response;
      console.error("unexpected error", e);
      return refuse(500, "internal_error", "the function failed; see its logs");
    }
  };
}
