// DEV ONLY: serves every function on one port at /functions/v1/NAME, as the Supabase gateway
// does, for the end-to-end tests and local use (tests/src/edge.rs starts it). Never deployed:
// supabase/config.toml deploys each function's own index.ts.
//   PORT (required), and AUTOCORE_REST_URL or SUPABASE_URL for the functions.

import { handler as commands } from "../commands/handler.ts";
import { handler as emergency } from "../emergency/handler.ts";
import { handler as rules } from "../rules/handler.ts";

const functions: Record<string, (req: Request) => Promise<Response>> = { rules, commands, emergency };

const port = Number(Deno.env.get("PORT"));
if (!Number.isInteger(port) || port <= 0) throw new Error("PORT must be a port number");

Deno.serve(
  { hostname: "127.0.0.1", port, onListen: () => console.log(`edge functions on 127.0.0.1:${port}`) },
  (req) => {
    const match = /^\/functions\/v1\/([a-z-]+)\/?$/.exec(new URL(req.url).pathname);
    const fn = match ? functions[match[1]] : undefined;
    if (!fn) {
      return new Response(JSON.stringify({ error: "not_found", message: "no such function" }), {
        status: 404,
        headers: { "Content-Type": "application/json" },
      });
    }
    return fn(req);
  },
);
