// The kind (clients/BEHAVIOUR.md, "The errors by language") of an error the Node client raised,
// shared by the behaviour runner and the cross-language worker.
import * as idemd from "../src/index.js";

// Most specific first: a subclass must be matched before its base. Looked up by name, so a runner
// reports what an older client raises instead of failing to load.
const KINDS: [string, string][] = [
  ["FingerprintMismatchError", "fingerprint_mismatch"],
  ["RateLimitedError", "rate_limited"],
  ["OverloadedError", "overloaded"],
  ["StoreFullError", "store_full"],
  ["UnauthenticatedError", "unauthenticated"],
  ["PermissionDeniedError", "permission_denied"],
  ["InvalidRequestError", "invalid_request"],
  ["LeaseLostError", "lease_lost"],
  ["InProgressError", "in_progress"],
  ["IdemdInternalError", "internal"],
  ["IdemdUnavailableError", "unavailable"],
  ["IdemdError", "rpc_error"],
];

export function idemdKindOf(err: unknown): string {
  const exported = idemd as unknown as Record<string, unknown>;
  for (const [name, kind] of KINDS) {
    const cls = exported[name];
    if (typeof cls === "function" && err instanceof (cls as new (...args: never[]) => unknown)) return kind;
  }
  const e = err as Error;
  return `unmapped: ${e?.constructor?.name}: ${e?.message}`;
}
