package httpidem

import (
	"bytes"
	"encoding/json"
	"errors"
	"maps"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	idemd "github.com/idemd/idemd/clients/go"
)

func TestParseKey(t *testing.T) {
	valid := []struct {
		field []string
		key   string
	}{
		{[]string{"abc"}, "abc"},
		{[]string{`"abc"`}, "abc"},
		{[]string{" \tabc\t "}, "abc"},
		{[]string{` "abc" `}, "abc"},
		{[]string{`"a\"b\\c"`}, `a"b\c`},
		{[]string{`"a,b"`}, "a,b"},
		{[]string{"a b"}, "a b"},
		{[]string{strings.Repeat("k", 255)}, strings.Repeat("k", 255)},
		{[]string{`"` + strings.Repeat("k", 255) + `"`}, strings.Repeat("k", 255)},
	}
	for _, c := range valid {
		key, present, invalid := parseKey(c.field)
		if key != c.key || !present || invalid != "" {
			t.Errorf("parseKey(%q) = %q, %v, %q; want %q", c.field, key, present, invalid, c.key)
		}
	}
	if _, present, invalid := parseKey(nil); present || invalid != "" {
		t.Errorf("no field: present %v, invalid %q", present, invalid)
	}
	invalid := map[string][]string{
		"empty":                {""},
		"only spaces":          {"  "},
		"empty quoted":         {`""`},
		"256 bytes":            {strings.Repeat("k", 256)},
		"256 bytes quoted":     {`"` + strings.Repeat("k", 256) + `"`},
		"tab inside":           {"ab\tcd"},
		"tab inside quoted":    {"\"ab\tcd\""},
		"NUL":                  {"ab\x00cd"},
		"DEL":                  {"ab\x7fcd"},
		"non-ASCII":            {"caf\xc3\xa9"},
		"non-ASCII quoted":     {"\"caf\xc3\xa9\""},
		"unclosed quote":       {`"abc`},
		"text after the quote": {`"abc"def`},
		"bad escape":           {`"ab\ncd"`},
		"escape at the end":    {`"abc\`},
		"two fields":           {"k1", "k2"},
		"two quoted fields":    {`"k1"`, `"k2"`},
		"bare with a comma":    {"k1, k2"},
	}
	for name, field := range invalid {
		key, present, why := parseKey(field)
		if !present || why == "" || key != "" {
			t.Errorf("%s: parseKey(%q) = %q, %v, %q; want invalid", name, field, key, present, why)
		}
	}
}

func TestIdemdKeyVectors(t *testing.T) {
	// The spec's vector, the same in every language.
	if got := idemdKey("", "abc"); got != "e3b0c44298fc1c149afbf4c8996fb924:abc" {
		t.Fatalf("idemdKey(\"\", \"abc\") = %q", got)
	}
	// The tag is the first 32 hex digits of SHA-256("tenant-a") (`printf tenant-a | sha256sum`).
	if got := idemdKey("tenant-a", "abc"); got != "80a707af7dc77ee1228f9127180f3964:abc" {
		t.Fatalf("scoped key %q", got)
	}
	if idemdKey("A", "k") == idemdKey("B", "k") {
		t.Fatal("two scopes share a key")
	}
	// 222 bytes fit beside the tag (32 + 1 + 222 = 255); 223 take the hashed form.
	long222 := strings.Repeat("x", 222)
	if got := idemdKey("", long222); got != "e3b0c44298fc1c149afbf4c8996fb924:"+long222 || len(got) != 255 {
		t.Fatalf("222-byte key: %q", got)
	}
	long223 := strings.Repeat("x", 223)
	hashed := idemdKey("", long223)
	// SHA-256 of "x" × 223, by Python's hashlib.
	if hashed != "e3b0c44298fc1c149afbf4c8996fb924#b392c1c5a636edf049e30f9744264fd644d356fc891c5cc13899b2a92ed5db01" {
		t.Fatalf("223-byte key: %q", hashed)
	}
	if idemdKey("", strings.Repeat("x", 254)+"y") == idemdKey("", strings.Repeat("x", 254)+"z") {
		t.Fatal("two long keys share the hashed form")
	}
}

func TestFingerprintForm(t *testing.T) {
	m := mustMiddleware(t, Options{Namespace: "n"})
	canonical := func(m *middleware, r *http.Request, body string) string {
		t.Helper()
		form, err := idemd.CanonicalJSON(m.fingerprintForm(r, []byte(body)))
		if err != nil {
			t.Fatal(err)
		}
		return string(form)
	}
	request := func(method, target, contentType string) *http.Request {
		r := httptest.NewRequest(method, target, nil)
		if contentType != "" {
			r.Header.Set("Content-Type", contentType)
		}
		return r
	}
	cases := []struct {
		what, method, target, contentType, body, want string
	}{
		{"JSON", "post", "/orders?b=2&a=%2F", "application/json; charset=utf-8", `{ "b": [1, 2.50], "a": "x" }`,
			`{"json":{"a":"x","b":[1,2.5]},"method":"POST","target":"/orders?b=2&a=%2F"}`},
		{"+json", "PATCH", "/o/1", "application/merge-patch+json", `{"a":null}`,
			`{"json":{"a":null},"method":"PATCH","target":"/o/1"}`},
		{"not JSON by type", "POST", "/o", "text/plain", `{"a":1}`,
			`{"bytes":"eyJhIjoxfQ==","method":"POST","target":"/o"}`},
		{"no content type", "POST", "/o", "", `{"a":1}`,
			`{"bytes":"eyJhIjoxfQ==","method":"POST","target":"/o"}`},
		{"JSON that does not parse", "POST", "/o", "application/json", `{"a":`,
			`{"bytes":"eyJhIjo=","method":"POST","target":"/o"}`},
		{"JSON without a canonical form", "POST", "/o", "application/json", `{"a":9007199254740993}`,
			`{"bytes":"eyJhIjo5MDA3MTk5MjU0NzQwOTkzfQ==","method":"POST","target":"/o"}`},
		{"no body", "POST", "/o", "application/json", ``,
			`{"bytes":"","method":"POST","target":"/o"}`},
	}
	for _, c := range cases {
		if got := canonical(m, request(c.method, c.target, c.contentType), c.body); got != c.want {
			t.Errorf("%s: form %s\n want %s", c.what, got, c.want)
		}
	}

	excluding := mustMiddleware(t, Options{Namespace: "n", FingerprintExclude: []string{"sent_at"}})
	r := request("POST", "/o", "application/json")
	if got := canonical(excluding, r, `{"id":1,"sent_at":"now"}`); got != `{"json":{"id":1},"method":"POST","target":"/o"}` {
		t.Errorf("exclude: %s", got)
	}
	including := mustMiddleware(t, Options{Namespace: "n", FingerprintInclude: []string{"id"}})
	if got := canonical(including, r, `{"id":1,"sent_at":"now","x":{}}`); got != `{"json":{"id":1},"method":"POST","target":"/o"}` {
		t.Errorf("include: %s", got)
	}
	if got := canonical(including, r, `[1]`); got != `{"json":[1],"method":"POST","target":"/o"}` {
		t.Errorf("include on an array: %s", got)
	}
	withHeaders := mustMiddleware(t, Options{Namespace: "n", FingerprintHeaders: []string{"X-Account", "x-region"}})
	r = request("POST", "/o", "")
	r.Header.Add("X-Account", "a1")
	r.Header.Add("X-Account", "a2")
	if got := canonical(withHeaders, r, ""); got != `{"bytes":"","headers":{"x-account":"a1, a2"},"method":"POST","target":"/o"}` {
		t.Errorf("headers: %s", got)
	}

	// Key order and whitespace do not change the fingerprint; the body, target or method do.
	first, _ := m.fingerprint(request("POST", "/o", "application/json"), []byte(`{"a":1,"b":2}`))
	same, _ := m.fingerprint(request("POST", "/o", "application/json"), []byte("{ \"b\" : 2,\n\"a\":1 }"))
	other, _ := m.fingerprint(request("POST", "/o?x", "application/json"), []byte(`{"a":1,"b":2}`))
	if !bytes.Equal(first, same) || bytes.Equal(first, other) || len(first) != 32 {
		t.Errorf("fingerprints %x %x %x", first, same, other)
	}
}

func TestDefaultStorable(t *testing.T) {
	for status, want := range map[int]bool{
		199: false, 200: true, 201: true, 204: true, 303: true, 304: true, 400: true, 404: true, 422: true,
		408: false, 409: false, 425: false, 429: false, 499: true, 500: false, 503: false,
	} {
		if got := DefaultStorable(status); got != want {
			t.Errorf("DefaultStorable(%d) = %v, want %v", status, got, want)
		}
	}
}

func TestStoredResult(t *testing.T) {
	m := mustMiddleware(t, Options{Namespace: "n", KeepHeaders: []string{"Content-Type", "Link", "Set-Cookie", "X-Absent"}})
	recorder := httptest.NewRecorder()
	capture := newCapture(recorder)
	capture.Header().Set("Content-Type", "application/json")
	capture.Header().Add("Link", "<a>")
	capture.Header().Add("Link", "<b>")
	capture.Header().Add("Set-Cookie", "a=1")
	capture.Header().Add("Set-Cookie", "b=2")
	capture.Header().Set("X-Run", "r")
	capture.WriteHeader(http.StatusCreated)
	capture.Header().Set("Content-Type", "text/plain") // after WriteHeader: changes nothing
	_, _ = capture.Write([]byte(`{"ok":true}`))
	result, err := m.result(capture)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"content-type": "application/json", "link": "<a>, <b>", "set-cookie": "a=1\nb=2"}
	if result.Code != 201 || string(result.Body) != `{"ok":true}` || !maps.Equal(result.Metadata, want) {
		t.Fatalf("result %d %q %v", result.Code, result.Body, result.Metadata)
	}
	defaults := mustMiddleware(t, Options{Namespace: "n"})
	result, _ = defaults.result(capture)
	if _, ok := result.Metadata["set-cookie"]; ok || result.Metadata["content-type"] != "application/json" {
		t.Fatalf("default kept headers: %v", result.Metadata)
	}

	// The replay: the stored status, headers (set-cookie as fields of its own) and body, marked.
	replayed := httptest.NewRecorder()
	replay(replayed, idemd.Result{Code: 201, Body: []byte("x"), Metadata: map[string]string{"set-cookie": "a=1\nb=2", "link": "<a>, <b>"}})
	if replayed.Code != 201 || replayed.Body.String() != "x" || replayed.Header().Get("Idempotent-Replayed") != "true" ||
		len(replayed.Header().Values("Set-Cookie")) != 2 || replayed.Header().Get("Link") != "<a>, <b>" {
		t.Fatalf("replay %d %q %v", replayed.Code, replayed.Body, replayed.Header())
	}

	// Too large for idemd: an error, so the key is released rather than a Complete refused.
	small := mustMiddleware(t, Options{Namespace: "n", MaxStoredBody: 4})
	if _, err := small.result(capture); err == nil {
		t.Fatal("an 11-byte body was storable with MaxStoredBody 4")
	}
	capture.header.Set("Content-Type", strings.Repeat("x", maxMetadataValueBytes+1))
	if _, err := m.result(capture); err == nil {
		t.Fatal("a header over idemd's 16 KiB was storable")
	}
}

func TestCaptureWriter(t *testing.T) {
	recorder := httptest.NewRecorder()
	capture := newCapture(recorder)
	controller := http.NewResponseController(capture)
	if err := controller.Flush(); err != nil {
		t.Fatalf("flush: %v", err)
	}
	if _, _, err := controller.Hijack(); !errors.Is(err, errHijack) {
		t.Fatalf("hijack: %v", err)
	}
	capture.Header().Set("Link", "</hint>")
	capture.WriteHeader(http.StatusEarlyHints) // informational: goes out at once
	if recorder.Code != http.StatusEarlyHints {
		t.Fatalf("103 not passed on: %d", recorder.Code)
	}
	capture.WriteHeader(http.StatusNoContent)
	capture.WriteHeader(http.StatusOK) // superfluous: ignored
	if _, err := capture.Write([]byte("x")); !errors.Is(err, http.ErrBodyNotAllowed) {
		t.Fatalf("a body on a 204: %v", err)
	}
	if capture.status != http.StatusNoContent || recorder.Body.Len() != 0 {
		t.Fatalf("captured %d, and %d bytes went out before send", capture.status, recorder.Body.Len())
	}
	defer func() {
		if recover() == nil {
			t.Fatal("WriteHeader(42) did not panic, as net/http's does")
		}
	}()
	newCapture(httptest.NewRecorder()).WriteHeader(42)
}

func TestProblemDocument(t *testing.T) {
	recorder := httptest.NewRecorder()
	writeProblem(recorder, problemInProgress, "still running", 3)
	var document map[string]any
	if err := json.Unmarshal(recorder.Body.Bytes(), &document); err != nil {
		t.Fatal(err)
	}
	if recorder.Code != 409 || recorder.Header().Get("Content-Type") != "application/problem+json" || recorder.Header().Get("Retry-After") != "3" ||
		document["type"] != "https://github.com/idemd/idemd/blob/main/clients/HTTP-MIDDLEWARE.md#request-in-progress" ||
		document["status"] != float64(409) || document["title"] == "" || document["detail"] != "still running" {
		t.Fatalf("%d %v %v", recorder.Code, recorder.Header(), document)
	}
	kinds := map[problemKind]int{problemMissingKey: 400, problemInvalidKey: 400, problemInProgress: 409, problemTooLarge: 413,
		problemKeyReused: 422, problemIdemdRejected: 500, problemIdemdUnavailable: 503}
	for kind, status := range kinds {
		if kind.status != status || !strings.Contains(newProblem(kind, "").Type, "HTTP-MIDDLEWARE.md#"+kind.anchor) {
			t.Errorf("%+v", kind)
		}
	}
}

func TestOptionsAreChecked(t *testing.T) {
	client, err := idemd.New("127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	for name, options := range map[string]Options{
		"no namespace":          {},
		"include and exclude":   {Namespace: "n", FingerprintInclude: []string{"a"}, FingerprintExclude: []string{"b"}},
		"negative wait":         {Namespace: "n", Wait: -1},
		"negative max body":     {Namespace: "n", MaxBody: -1},
		"negative idemdTimeout": {Namespace: "n", IdemdTimeout: -1},
	} {
		if _, err := New(client, options); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := New(nil, Options{Namespace: "n"}); err == nil {
		t.Error("a nil client was accepted")
	}
}

// mustMiddleware is the configuration New makes of options (with a client that never connects).
func mustMiddleware(t *testing.T, options Options) *middleware {
	t.Helper()
	client, err := idemd.New("127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	m, err := newMiddleware(client, options)
	if err != nil {
		t.Fatal(err)
	}
	return m
}
