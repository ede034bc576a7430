package idemd

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/big"
	"slices"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"
)

// ErrNotCanonicalizable: the request has no RFC 8785 canonical JSON form (an integer beyond
// ±(2^53-1), invalid UTF-8, a duplicate object key, a value encoding/json cannot marshal, …).
// Idempotent returns it before any RPC.
var ErrNotCanonicalizable = errors.New("idemd: request has no RFC 8785 canonical JSON")

// maxSafeInteger is 2^53-1: JCS works on IEEE-754 doubles, so a larger integer would be rounded
// and two different requests could share a fingerprint.
var maxSafeInteger = big.NewInt(1<<53 - 1)

// Fingerprint is the request fingerprint shared by every idemd client: SHA-256 over the UTF-8
// bytes of the RFC 8785 (JCS) canonical JSON of request (32 bytes). request is marshalled with
// encoding/json first (struct tags apply); a json.RawMessage is canonicalized as it is.
func Fingerprint(request any) ([]byte, error) {
	canonical, err := CanonicalJSON(request)
	if err != nil {
		return nil, err
	}
	sum := sha256.Sum256(canonical)
	return sum[:], nil
}

// CanonicalJSON is the RFC 8785 canonical JSON of request (see Fingerprint).
func CanonicalJSON(request any) ([]byte, error) {
	raw, ok := request.(json.RawMessage)
	if !ok {
		marshalled, err := json.Marshal(request)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrNotCanonicalizable, err)
		}
		raw = marshalled
	}
	// encoding/json would replace invalid UTF-8 in a RawMessage with U+FFFD while decoding, making
	// two different inputs one fingerprint: refuse it instead.
	if !utf8.Valid(raw) {
		return nil, fmt.Errorf("%w: invalid UTF-8", ErrNotCanonicalizable)
	}
	decoder := json.NewDecoder(bytes.NewReader(raw))
	decoder.UseNumber()
	var out bytes.Buffer
	if err := canonicalValue(decoder, &out); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNotCanonicalizable, err)
	}
	if _, err := decoder.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: data after the JSON value", ErrNotCanonicalizable)
	}
	return out.Bytes(), nil
}

// canonicalValue writes the next JSON value of decoder in canonical form.
func canonicalValue(decoder *json.Decoder, out *bytes.Buffer) error {
	token, err := decoder.Token()
	if err != nil {
		return err
	}
	switch value := token.(type) {
	case json.Delim:
		switch value {
		case '[':
			return canonicalArray(decoder, out)
		case '{':
			return canonicalObject(decoder, out)
		}
		return fmt.Errorf("unexpected %q", rune(value))
	case string:
		writeString(out, value)
	case json.Number:
		number, err := canonicalNumber(value)
		if err != nil {
			return err
		}
		out.WriteString(number)
	case bool:
		out.WriteString(strconv.FormatBool(value))
	case nil:
		out.WriteString("null")
	default:
		return fmt.Errorf("unexpected JSON token %v", token)
	}
	return nil
}

func canonicalArray(decoder *json.Decoder, out *bytes.Buffer) error {
	out.WriteByte('[')
	for first := true; decoder.More(); first = false {
		if !first {
			out.WriteByte(',')
		}
		if err := canonicalValue(decoder, out); err != nil {
			return err
		}
	}
	out.WriteByte(']')
	_, err := decoder.Token() // the closing ']'
	return err
}

func canonicalObject(decoder *json.Decoder, out *bytes.Buffer) error {
	type member struct {
		key   string
		units []uint16
		value []byte
	}
	var members []member
	seen := map[string]bool{}
	for decoder.More() {
		token, err := decoder.Token()
		if err != nil {
			return err
		}
		key, ok := token.(string)
		if !ok {
			return fmt.Errorf("object key %v is not a string", token)
		}
		if seen[key] {
			return fmt.Errorf("duplicate object key %q", key)
		}
		seen[key] = true
		var value bytes.Buffer
		if err := canonicalValue(decoder, &value); err != nil {
			return err
		}
		members = append(members, member{key: key, units: utf16.Encode([]rune(key)), value: value.Bytes()})
	}
	if _, err := decoder.Token(); err != nil { // the closing '}'
		return err
	}
	// RFC 8785 §3.2.3: members sorted by the UTF-16 code units of their names.
	slices.SortFunc(members, func(a, b member) int { return slices.Compare(a.units, b.units) })
	out.WriteByte('{')
	for i, m := range members {
		if i > 0 {
			out.WriteByte(',')
		}
		writeString(out, m.key)
		out.WriteByte(':')
		out.Write(m.value)
	}
	out.WriteByte('}')
	return nil
}

// writeString writes s as RFC 8785 serializes strings: only '"', '\\' and control characters are
// escaped, with the short forms where JSON has them and lowercase \u00xx otherwise.
func writeString(out *bytes.Buffer, s string) {
	out.WriteByte('"')
	for _, r := range s {
		switch r {
		case '"':
			out.WriteString(`\"`)
		case '\\':
			out.WriteString(`\\`)
		case '\b':
			out.WriteString(`\b`)
		case '\f':
			out.WriteString(`\f`)
		case '\n':
			out.WriteString(`\n`)
		case '\r':
			out.WriteString(`\r`)
		case '\t':
			out.WriteString(`\t`)
		default:
			if r < 0x20 {
				fmt.Fprintf(out, `\u%04x`, r)
			} else {
				out.WriteRune(r)
			}
		}
	}
	out.WriteByte('"')
}

// canonicalNumber formats a JSON number as ECMAScript's Number.prototype.toString does for the
// IEEE-754 double it denotes (RFC 8785 §3.2.2.3).
func canonicalNumber(number json.Number) (string, error) {
	text := number.String()
	if !strings.ContainsAny(text, ".eE") {
		integer, ok := new(big.Int).SetString(text, 10)
		if !ok {
			return "", fmt.Errorf("bad number %q", text)
		}
		if new(big.Int).Abs(integer).Cmp(maxSafeInteger) > 0 {
			return "", fmt.Errorf("integer %s is beyond ±(2^53-1)", text)
		}
	}
	value, err := strconv.ParseFloat(text, 64)
	if err != nil || math.IsInf(value, 0) || math.IsNaN(value) {
		return "", fmt.Errorf("number %q is not a finite double", text)
	}
	return formatDouble(value), nil
}

// formatDouble is ECMAScript's Number::toString(value) for a finite double.
func formatDouble(value float64) string {
	if value == 0 {
		return "0" // also for -0
	}
	sign := ""
	if value < 0 {
		sign = "-"
		value = -value
	}
	// The shortest digits that round-trip, as "d.ddde±x".
	scientific := strconv.FormatFloat(value, 'e', -1, 64)
	mantissa, exponentText, _ := strings.Cut(scientific, "e")
	digits := strings.Replace(mantissa, ".", "", 1)
	exponent, _ := strconv.Atoi(exponentText) // FormatFloat always writes a valid exponent
	k := len(digits)
	n := exponent + 1 // value = 0.digits × 10^n
	switch {
	case k <= n && n <= 21:
		return sign + digits + strings.Repeat("0", n-k)
	case 0 < n && n <= 21:
		return sign + digits[:n] + "." + digits[n:]
	case -6 < n && n <= 0:
		return sign + "0." + strings.Repeat("0", -n) + digits
	}
	out := sign + digits[:1]
	if k > 1 {
		out += "." + digits[1:]
	}
	if n-1 >= 0 {
		return out + "e+" + strconv.Itoa(n-1)
	}
	return out + "e-" + strconv.Itoa(1-n)
}
