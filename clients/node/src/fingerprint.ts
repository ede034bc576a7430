import { createHash } from "node:crypto";
import canonicalize from "canonicalize";

/**
 * The RFC 8785 (JSON Canonicalization Scheme) form of `value`.
 * Throws a TypeError for values JSON cannot represent (undefined, functions, BigInt, NaN, ±Infinity,
 * lone surrogates, cycles). Integers beyond 2^53-1 lose precision before they get here: pass them as strings.
 */
export function canonicalJson(value: unknown): string {
  let out: string | undefined;
  try {
    out = canonicalize(value);
  } catch (err) {
    throw new TypeError(`value cannot be canonicalized (RFC 8785): ${(err as Error).message}`);
  }
  if (out === undefined) {
    throw new TypeError("value cannot be canonicalized (RFC 8785): it has no JSON representation");
  }
  return out;
}

/** The canonical request fingerprint shared by every idemd client: sha256(utf8(RFC 8785 JSON)), 32 bytes. */
export function fingerprint(value: unknown): Buffer {
  return createHash("sha256").update(canonicalJson(value), "utf8").digest();
}
