package httpidem

import (
	"encoding/json"
	"net/http"
	"strconv"
)

// ProblemTypeBase is where the problem types the middleware answers with are documented: each
// type is this page with the problem's anchor, e.g. ProblemTypeBase + "#invalid-key".
const ProblemTypeBase = "https://github.com/idemd/idemd/blob/main/clients/HTTP-MIDDLEWARE.md"

// problemKind is one answer the middleware makes itself (clients/HTTP-MIDDLEWARE.md §5).
type problemKind struct {
	status int
	anchor string // "" for about:blank: a plain HTTP error with no documented type
	title  string
}

var (
	problemMissingKey        = problemKind{http.StatusBadRequest, "missing-key", "Idempotency-Key header required"}
	problemInvalidKey        = problemKind{http.StatusBadRequest, "invalid-key", "Invalid Idempotency-Key header"}
	problemInProgress        = problemKind{http.StatusConflict, "request-in-progress", "A request with this Idempotency-Key is in progress"}
	problemTooLarge          = problemKind{http.StatusRequestEntityTooLarge, "request-too-large", "Request body too large"}
	problemKeyReused         = problemKind{http.StatusUnprocessableEntity, "key-reused", "Idempotency-Key reused for a different request"}
	problemIdemdRejected     = problemKind{http.StatusInternalServerError, "idemd-rejected", "idemd rejected the middleware's call"}
	problemIdemdUnavailable  = problemKind{http.StatusServiceUnavailable, "idemd-unavailable", "idemd unavailable"}
	problemUnreadableBody    = problemKind{http.StatusBadRequest, "", "Bad Request"}
	problemUnreplayableState = problemKind{http.StatusInternalServerError, "", "Internal Server Error"}
)

// problem is an RFC 9457 problem document.
type problem struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail"`
}

// newProblem is the document of kind with this detail.
func newProblem(kind problemKind, detail string) problem {
	typ := "about:blank"
	if kind.anchor != "" {
		typ = ProblemTypeBase + "#" + kind.anchor
	}
	return problem{Type: typ, Title: kind.title, Status: kind.status, Detail: detail}
}

// writeProblem answers with a problem document; retryAfter > 0 adds Retry-After (whole seconds).
func writeProblem(w http.ResponseWriter, kind problemKind, detail string, retryAfter int) {
	body, err := json.Marshal(newProblem(kind, detail))
	if err != nil {
		body = []byte(`{}`) // cannot happen: strings and an int always marshal
	}
	header := w.Header()
	header.Set("Content-Type", "application/problem+json")
	header.Set("Cache-Control", "no-store")
	if retryAfter > 0 {
		header.Set("Retry-After", strconv.Itoa(retryAfter))
	}
	writeResponse(w, kind.status, body)
}
