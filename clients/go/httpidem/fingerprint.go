package httpidem

import (
	"encoding/base64"
	"encoding/json"
	"mime"
	"net/http"
	"strings"

	idemd "github.com/idemd/idemd/clients/go"
)

// fingerprintForm is the object whose fingerprint stands for a request (clients/HTTP-MIDDLEWARE.md
// §3): {"method", "target", "json" | "bytes", "headers"?}. It is the same in every language, so a
// request first served by one framework's middleware replays from another's.
func (m *middleware) fingerprintForm(r *http.Request, body []byte) map[string]any {
	form := map[string]any{
		"method": strings.ToUpper(r.Method),
		"target": requestTarget(r),
	}
	if document, ok := m.jsonBody(r, body); ok {
		form["json"] = document
	} else {
		form["bytes"] = base64.StdEncoding.EncodeToString(body)
	}
	if len(m.fingerprintHeaders) > 0 {
		headers := map[string]string{}
		for _, name := range m.fingerprintHeaders {
			if values := r.Header.Values(name); len(values) > 0 {
				headers[name] = strings.Join(values, ", ")
			}
		}
		form["headers"] = headers
	}
	return form
}

// fingerprint is idemd's fingerprint (the client's RFC 8785 one) of the request's form.
func (m *middleware) fingerprint(r *http.Request, body []byte) ([]byte, error) {
	return idemd.Fingerprint(m.fingerprintForm(r, body))
}

// requestTarget is the request target as received: raw path and query, not decoded. A request in
// absolute form (to a proxy) gives its path and query only.
func requestTarget(r *http.Request) string {
	if strings.HasPrefix(r.RequestURI, "/") {
		return r.RequestURI
	}
	return r.URL.RequestURI()
}

// isJSONMediaType: application/json, or any type/subtype+json (application/merge-patch+json, …).
func isJSONMediaType(contentType string) bool {
	mediaType, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return false
	}
	_, subtype, _ := strings.Cut(mediaType, "/")
	return mediaType == "application/json" || (strings.HasSuffix(subtype, "+json") && len(subtype) > len("+json"))
}

// jsonBody is the body as JSON, when its content type is application/json or */*+json and it has
// a canonical form (it parses, with no duplicate member and no integer beyond ±(2^53-1)), with
// FingerprintInclude or FingerprintExclude applied to a top-level object.
func (m *middleware) jsonBody(r *http.Request, body []byte) (json.RawMessage, bool) {
	if !isJSONMediaType(r.Header.Get("Content-Type")) {
		return nil, false
	}
	canonical, err := idemd.CanonicalJSON(json.RawMessage(body))
	if err != nil {
		return nil, false
	}
	if m.fingerprintInclude == nil && m.fingerprintExclude == nil {
		return canonical, true
	}
	var members map[string]json.RawMessage
	if !strings.HasPrefix(string(canonical), "{") || json.Unmarshal(canonical, &members) != nil {
		return canonical, true // not an object: nothing to choose from
	}
	for name := range members {
		_, included := m.fingerprintInclude[name]
		_, excluded := m.fingerprintExclude[name]
		if (m.fingerprintInclude != nil && !included) || excluded {
			delete(members, name)
		}
	}
	chosen, err := json.Marshal(members)
	if err != nil {
		return canonical, true // cannot happen: the members came from valid JSON
	}
	return chosen, true
}
