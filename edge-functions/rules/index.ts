// Supabase Edge Function `rules` (entrypoint in supabase/config.toml). See edge-functions/README.md.
import { handler } from "./handler.ts";

Deno.serve(handler);
