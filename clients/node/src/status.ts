// Minimal protobuf wire decoding of the `grpc-status-details-bin` trailer (a google.rpc.Status),
// enough to read google.rpc.ErrorInfo and google.rpc.BadRequest without extra dependencies.

export interface ErrorInfo {
  reason: string;
  domain: string;
  metadata: Record<string, string>;
}

export interface FieldViolation {
  field: string;
  description: string;
}

export interface StatusDetails {
  errorInfo?: ErrorInfo;
  fieldViolations: FieldViolation[];
}

const ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo";
const BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest";

type Field = { no: number; wire: number; value: number | Buffer };

function* fields(buf: Buffer): Generator<Field> {
  let pos = 0;
  const varint = (): number => {
    let result = 0;
    let mul = 1;
    for (;;) {
      if (pos >= buf.length) throw new Error("truncated varint");
      const b = buf[pos++]!;
      result += (b & 0x7f) * mul;
      if ((b & 0x80) === 0) return result;
      mul *= 128;
      if (mul > 2 ** 63) throw new Error("varint too long");
    }
  };
  while (pos < buf.length) {
    const tag = varint();
    const no = Math.floor(tag / 8);
    const wire = tag & 7;
    switch (wire) {
      case 0:
        yield { no, wire, value: varint() };
        break;
      case 1:
        pos += 8;
        break;
      case 2: {
        const len = varint();
        if (pos + len > buf.length) throw new Error("truncated field");
        const value = buf.subarray(pos, pos + len);
        pos += len;
        yield { no, wire, value };
        break;
      }
      case 5:
        pos += 4;
        break;
      default:
        throw new Error(`unsupported wire type ${wire}`);
    }
    if (pos > buf.length) throw new Error("truncated message");
  }
}

const str = (v: number | Buffer): string => (Buffer.isBuffer(v) ? v.toString("utf8") : "");

function decodeErrorInfo(buf: Buffer): ErrorInfo {
  const info: ErrorInfo = { reason: "", domain: "", metadata: {} };
  for (const f of fields(buf)) {
    if (f.wire !== 2) continue;
    if (f.no === 1) info.reason = str(f.value);
    else if (f.no === 2) info.domain = str(f.value);
    else if (f.no === 3) {
      let k = "";
      let v = "";
      for (const e of fields(f.value as Buffer)) {
        if (e.no === 1) k = str(e.value);
        else if (e.no === 2) v = str(e.value);
      }
      info.metadata[k] = v;
    }
  }
  return info;
}

function decodeBadRequest(buf: Buffer): FieldViolation[] {
  const out: FieldViolation[] = [];
  for (const f of fields(buf)) {
    if (f.no !== 1 || f.wire !== 2) continue;
    const fv: FieldViolation = { field: "", description: "" };
    for (const e of fields(f.value as Buffer)) {
      if (e.no === 1) fv.field = str(e.value);
      else if (e.no === 2) fv.description = str(e.value);
    }
    out.push(fv);
  }
  return out;
}

/** Decodes a serialized google.rpc.Status. Never throws: malformed input gives empty details. */
export function decodeStatusDetails(buf: Buffer | undefined): StatusDetails {
  const details: StatusDetails = { fieldViolations: [] };
  if (!buf || buf.length === 0) return details;
  try {
    for (const f of fields(buf)) {
      if (f.no !== 3 || f.wire !== 2) continue; // Status.details: repeated google.protobuf.Any
      let typeUrl = "";
      let value: Buffer = Buffer.alloc(0);
      for (const a of fields(f.value as Buffer)) {
        if (a.no === 1) typeUrl = str(a.value);
        else if (a.no === 2 && Buffer.isBuffer(a.value)) value = a.value;
      }
      if (typeUrl === ERROR_INFO && !details.errorInfo) details.errorInfo = decodeErrorInfo(value);
      else if (typeUrl === BAD_REQUEST) details.fieldViolations.push(...decodeBadRequest(value));
    }
  } catch {
    // Malformed details: keep what was decoded.
  }
  return details;
}
