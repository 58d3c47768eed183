// JSON Schema validation with ajv, and its errors as problems a person can act on: one per
// thing wrong, each at its path in the request body (`rule_json.actions[0].relay_number`).

// Pinned, and locked with its integrity in edge-functions/deno.lock.
import { Ajv2020 } from "npm:ajv@8.17.1/dist/2020.js";
import type { ErrorObject, ValidateFunction } from "npm:ajv@8.17.1/dist/2020.js";
// The committed schema, generated from the agent's Rust rule types (schemas/, kept current by
// the agent's tests): the function and the agent read the same file.
import ruleJsonSchema from "../../schemas/rule_json.schema.json" with { type: "json" };
import type { Problem } from "./http.ts";

// allErrors: every problem in one answer. verbose: a oneOf error carries its branches, which
// `problemsOf` needs to tell the branch the value meant (its "type") from the others.
// validateFormats off: the schema's formats (uint8, uint32, double) are Rust type names; the
// ranges they imply are written as minimum/maximum.
const ajv = new Ajv2020({ allErrors: true, verbose: true, strict: false, validateFormats: false });
ajv.addSchema(ruleJsonSchema);

/** The `$ref` a request schema uses for a rule_json. */
export const RULE_JSON_REF: string = ruleJsonSchema.$id;

export function compile(schema: Record<string, unknown>): ValidateFunction {
  return ajv.compile(schema);
}

/** `/rule_json/actions/0/relay_number` → `rule_json.actions[0].relay_number`. */
export function pointerToPath(pointer: string): string {
  let path = "";
  for (const raw of pointer.split("/").slice(1)) {
    const segment = raw.replace(/~1/g, "/").replace(/~0/g, "~");
    path += /^\d+$/.test(segment) ? `[${segment}]` : `${path ? "." : ""}${segment}`;
  }
  return path;
}

function valueAt(root: unknown, pointer: string): unknown {
  let value = root;
  for (const raw of pointer.split("/").slice(1)) {
    const segment = raw.replace(/~1/g, "/").replace(/~0/g, "~");
    if (value === null || typeof value !== "object") return undefined;
    value = (value as Record<string, unknown>)[segment];
  }
  return value;
}

function child(pointer: string, field: string): string {
  return `${pointer}/${field}`;
}

function found(value: unknown): string {
  return value === undefined ? "nothing" : JSON.stringify(value);
}

interface Union {
  pointer: string;
  /** Where the `oneOf` is in the schema; its branches are `${schemaPath}/N/...`. */
  schemaPath: string;
  /** The branch whose `type` constant the value names; null when it names none. */
  branch: number | null;
  problem?: { pointer: string; message: string };
}

/**
 * A tagged union (`oneOf` of objects told apart by a `type` constant, as schemars writes serde's
 * internally tagged enums) fails in every branch at once; only the branch the value names is
 * worth reporting. A value naming no branch gets one problem listing the types there are.
 */
function unionOf(error: ErrorObject, data: unknown): Union {
  const branches = (error.schema ?? []) as { properties?: { type?: { const?: unknown } } }[];
  const tags = branches.map((b) => b?.properties?.type?.const).filter((t) => typeof t === "string") as string[];
  const node = valueAt(data, error.instancePath);
  const pointer = error.instancePath;
  const schemaPath = error.schemaPath;
  if (node === null || typeof node !== "object" || Array.isArray(node)) {
    return {
      pointer,
      schemaPath,
      branch: null,
      problem: {
        pointer,
        message: `must be an object with a "type" (one of ${tags.join(", ")}), found ${found(node)}`,
      },
    };
  }
  const tag = (node as Record<string, unknown>).type;
  const branch = typeof tag === "string" ? tags.indexOf(tag) : -1;
  if (branch >= 0) return { pointer, schemaPath, branch };
  const message = tag === undefined
    ? `missing field "type" (one of ${tags.join(", ")})`
    : `unknown type ${found(tag)}; one of ${tags.join(", ")}`;
  return { pointer, schemaPath, branch: null, problem: { pointer: child(pointer, "type"), message } };
}

function messageOf(error: ErrorObject, data: unknown): { pointer: string; message: string } {
  const value = valueAt(data, error.instancePath);
  const params = error.params as Record<string, unknown>;
  switch (error.keyword) {
    case "required":
      return { pointer: child(error.instancePath, String(params.missingProperty)), message: "missing field" };
    case "additionalProperties":
      return { pointer: child(error.instancePath, String(params.additionalProperty)), message: "unknown field" };
    case "enum":
      return {
        pointer: error.instancePath,
        message: `must be one of ${
          (params.allowedValues as unknown[]).map((v) => JSON.stringify(v)).join(", ")
        }, found ${found(value)}`,
      };
    case "type":
    case "minimum":
    case "maximum":
    case "exclusiveMinimum":
    case "exclusiveMaximum":
    case "pattern":
    case "const":
    case "minLength":
    case "maxLength":
      return { pointer: error.instancePath, message: `${error.message}, found ${found(value)}` };
    default:
      return { pointer: error.instancePath, message: error.message ?? error.keyword };
  }
}

/** Every problem `validate` found in `data`, once each, ordered by path. */
export function problemsOf(validate: ValidateFunction, data: unknown): Problem[] {
  if (validate(data)) return [];
  const errors = validate.errors ?? [];
  const unions = errors.filter((e) => e.keyword === "oneOf").map((e) => unionOf(e, data));
  const shaped: { pointer: string; message: string }[] = [];
  for (const union of unions) if (union.problem) shaped.push(union.problem);
  for (const error of errors) {
    if (error.keyword === "oneOf") continue;
    // The innermost failing union around this error decides whether its branch counts.
    let owner: Union | undefined;
    for (const union of unions) {
      const inside = error.instancePath === union.pointer || error.instancePath.startsWith(union.pointer + "/");
      if (inside && (!owner || union.pointer.length > owner.pointer.length)) owner = union;
    }
    if (owner) {
      if (owner.branch === null) continue;
      // An error of a schema the branch refers to (`$ref`) has its own schemaPath and belongs
      // to the branch that led there; duplicates from sibling branches are dropped below.
      const prefix = owner.schemaPath + "/";
      if (error.schemaPath.startsWith(prefix)) {
        const branch = Number(error.schemaPath.slice(prefix.length).split("/")[0]);
        if (branch !== owner.branch) continue;
      }
    }
    shaped.push(messageOf(error, data));
  }
  const seen = new Set<string>();
  const problems: Problem[] = [];
  for (const { pointer, message } of shaped) {
    const problem = { path: pointerToPath(pointer), message };
    const key = `${problem.path}\u0000${problem.message}`;
    if (!seen.has(key)) {
      seen.add(key);
      problems.push(problem);
    }
  }
  return sortByPath(problems);
}

/** Problems ordered by path, the order a form shows its fields in; stable for equal paths. */
export function sortByPath(problems: Problem[]): Problem[] {
  return problems
    .map((p, i) => ({ p, i }))
    .sort((a, b) => (a.p.path < b.p.path ? -1 : a.p.path > b.p.path ? 1 : a.i - b.i))
    .map(({ p }) => p);
}
