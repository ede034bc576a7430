package httpidem

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
)

// maxKeyBytes is the longest Idempotency-Key accepted, and idemd's own limit on a key: a key of
// the short form "tag:key" fits in it when the header's key is at most 222 bytes.
const maxKeyBytes = 255

// tagHexDigits is how much of SHA-256(scope) prefixes every idemd key: 128 bits, enough that two
// scopes never share a tag, short enough to leave 222 bytes of the caller's key readable.
const tagHexDigits = 32

// parseKey reads the Idempotency-Key field values of a request (clients/HTTP-MIDDLEWARE.md §2). It
// returns the key, whether the header was sent at all, and, for a key that is not usable, why not
// (the detail of the invalid-key problem).
func parseKey(values []string) (key string, present bool, invalid string) {
	switch len(values) {
	case 0:
		return "", false, ""
	case 1:
	default:
		return "", true, fmt.Sprintf("the Idempotency-Key field appears %d times; send it once", len(values))
	}
	value := strings.Trim(values[0], " \t")
	if strings.HasPrefix(value, `"`) {
		key, invalid = parseQuoted(value)
	} else {
		key, invalid = value, checkKeyBytes(value)
		if invalid == "" && strings.Contains(value, ",") {
			// Servers and proxies join repeated fields with ", ": a bare key with a comma cannot
			// be told apart from two keys. A quoted one can.
			invalid = "a bare key must not contain ',' (it reads as two fields joined); quote it"
		}
	}
	switch {
	case invalid != "":
		return "", true, invalid
	case key == "":
		return "", true, "the key is empty"
	case len(key) > maxKeyBytes:
		return "", true, fmt.Sprintf("the key is %d bytes long; at most %d are allowed", len(key), maxKeyBytes)
	}
	return key, true, ""
}

// parseQuoted reads an RFC 8941 sf-string: a quoted string of printable ASCII where only `\"` and
// `\\` are escapes, with nothing after the closing quote.
func parseQuoted(value string) (string, string) {
	var key strings.Builder
	for i := 1; i < len(value); i++ {
		c := value[i]
		switch {
		case c == '\\':
			i++
			if i == len(value) {
				return "", "the quoted key ends inside an escape"
			}
			if value[i] != '"' && value[i] != '\\' {
				return "", fmt.Sprintf(`the quoted key has the escape \%s; only \" and \\ are allowed`, printable(value[i]))
			}
			key.WriteByte(value[i])
		case c == '"':
			if i != len(value)-1 {
				return "", "the quoted key has text after its closing quote"
			}
			return key.String(), ""
		case !isKeyByte(c):
			return "", badByte(c, i)
		default:
			key.WriteByte(c)
		}
	}
	return "", "the quoted key has no closing quote"
}

// checkKeyBytes is why a bare key is not usable ("" when it is).
func checkKeyBytes(key string) string {
	for i := 0; i < len(key); i++ {
		if !isKeyByte(key[i]) {
			return badByte(key[i], i)
		}
	}
	return ""
}

// isKeyByte: printable ASCII, 0x20–0x7E.
func isKeyByte(c byte) bool {
	return c >= 0x20 && c <= 0x7e
}

func badByte(c byte, at int) string {
	if c > 0x7e && c != 0x7f {
		return fmt.Sprintf("the key has the byte 0x%02X at offset %d; only printable ASCII (0x20-0x7E) is allowed", c, at)
	}
	return fmt.Sprintf("the key has the control character 0x%02X at offset %d; only printable ASCII (0x20-0x7E) is allowed", c, at)
}

// printable shows a byte in a message without writing a control character into it.
func printable(c byte) string {
	if isKeyByte(c) {
		return string(c)
	}
	return fmt.Sprintf("<0x%02X>", c)
}

// idemdKey is the key the middleware asks idemd about (clients/HTTP-MIDDLEWARE.md §3): the first 32
// hex digits of SHA-256(scope), then ":" and the caller's key; or, when that would pass idemd's 255
// bytes, "#" and the hex SHA-256 of the key. Only the scope is hashed in the short form, so keys
// stay readable in idemd's console; the two separators keep the forms apart.
func idemdKey(scope, key string) string {
	scopeSum := sha256.Sum256([]byte(scope))
	tag := hex.EncodeToString(scopeSum[:])[:tagHexDigits]
	if len(tag)+1+len(key) <= maxKeyBytes {
		return tag + ":" + key
	}
	keySum := sha256.Sum256([]byte(key))
	return tag + "#" + hex.EncodeToString(keySum[:])
}
