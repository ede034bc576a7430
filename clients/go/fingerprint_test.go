package idemd_test

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"testing"

	idemd "github.com/idemd/idemd/clients/go"
)

// The vectors every idemd client must reproduce byte for byte.
type fingerprintVectors struct {
	Vectors []struct {
		Input     json.RawMessage `json:"input"`
		Canonical string          `json:"canonical"`
		SHA256    string          `json:"sha256"`
	} `json:"vectors"`
}

func loadVectors(t *testing.T) fingerprintVectors {
	t.Helper()
	raw, err := os.ReadFile("../fingerprint-vectors.json")
	if err != nil {
		t.Fatalf("read the shared vectors: %v", err)
	}
	var vectors fingerprintVectors
	if err := json.Unmarshal(raw, &vectors); err != nil {
		t.Fatalf("parse the shared vectors: %v", err)
	}
	if len(vectors.Vectors) == 0 {
		t.Fatal("the shared vectors file has no vectors")
	}
	return vectors
}

func TestFingerprintVectorsFromRawJSON(t *testing.T) {
	for i, vector := range loadVectors(t).Vectors {
		canonical, err := idemd.CanonicalJSON(vector.Input)
		if err != nil {
			t.Fatalf("vector %d: %v", i, err)
		}
		if string(canonical) != vector.Canonical {
			t.Errorf("vector %d: canonical JSON\n got %s\nwant %s", i, canonical, vector.Canonical)
		}
		sum, err := idemd.Fingerprint(vector.Input)
		if err != nil {
			t.Fatalf("vector %d: %v", i, err)
		}
		if hex.EncodeToString(sum) != vector.SHA256 {
			t.Errorf("vector %d: fingerprint %x, want %s", i, sum, vector.SHA256)
		}
	}
}

// A Go value (maps, slices, float64) fingerprints like its JSON: what an application passes.
func TestFingerprintVectorsFromGoValues(t *testing.T) {
	for i, vector := range loadVectors(t).Vectors {
		var value any
		if err := json.Unmarshal(vector.Input, &value); err != nil {
			t.Fatalf("vector %d: %v", i, err)
		}
		sum, err := idemd.Fingerprint(value)
		if err != nil {
			t.Fatalf("vector %d: %v", i, err)
		}
		if hex.EncodeToString(sum) != vector.SHA256 {
			t.Errorf("vector %d: fingerprint %x, want %s", i, sum, vector.SHA256)
		}
	}
}

func TestFingerprintOfStructUsesJSONTags(t *testing.T) {
	type charge struct {
		Customer string `json:"customer"`
		Currency string `json:"currency"`
		Amount   int    `json:"amount"`
	}
	sum, err := idemd.Fingerprint(charge{Customer: "cus_42", Currency: "EUR", Amount: 1250})
	if err != nil {
		t.Fatal(err)
	}
	// The first shared vector: {"amount":1250,"currency":"EUR","customer":"cus_42"}.
	if got, want := hex.EncodeToString(sum), "427d9ccbed1dcbfc6c3b99e770953c7121f4b1114355e65c204420b2feae2e93"; got != want {
		t.Errorf("fingerprint %s, want %s", got, want)
	}
}

func TestRequestsWithoutCanonicalJSONAreRefused(t *testing.T) {
	for name, request := range map[string]any{
		"integer beyond 2^53-1":  json.RawMessage(`{"n":9007199254740992}`),
		"negative beyond":        json.RawMessage(`[-9007199254740992]`),
		"duplicate key":          json.RawMessage(`{"a":1,"a":2}`),
		"invalid UTF-8":          json.RawMessage("\"\xff\""),
		"trailing data":          json.RawMessage(`{} {}`),
		"not JSON":               json.RawMessage(`{`),
		"a channel":              make(chan int),
		"uint64 beyond 2^53 - 1": uint64(1) << 60,
	} {
		if _, err := idemd.Fingerprint(request); !errors.Is(err, idemd.ErrNotCanonicalizable) {
			t.Errorf("%s: got %v, want ErrNotCanonicalizable", name, err)
		}
	}
	// The largest safe integer is fine.
	if _, err := idemd.Fingerprint(json.RawMessage(`9007199254740991`)); err != nil {
		t.Errorf("2^53-1: %v", err)
	}
}
