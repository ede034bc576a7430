// Package httpidem is net/http middleware that makes handlers idempotent for callers that send an
// Idempotency-Key header (the IETF httpapi draft, Stripe, AEP-155), with idemd as the store. It
// behaves exactly as clients/HTTP-MIDDLEWARE.md says every idemd middleware does, and is a thin
// layer over the idemd Go client: Client.Idempotent acquires the key, renews the lease while the
// handler runs, and stores the handler's response with Complete; Client.Wait waits for an
// in-flight duplicate when Options.Wait asks for it.
//
//	mux.Handle("POST /orders", httpidem.Middleware(client, httpidem.Options{Namespace: "orders-api"})(orders))
//
// The handler's response is buffered until it is stored, then sent; a retry with the same key
// gets the stored status, kept headers and body back, with Idempotent-Replayed: true, and the
// handler does not run again.
package httpidem

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	idemd "github.com/idemd/idemd/clients/go"
	pb "github.com/idemd/idemd/clients/go/idempotencyv1"
)

// Defaults of the Options.
const (
	DefaultIdemdTimeout = 5 * time.Second
	DefaultMaxBody      = 1 << 20
	// DefaultMaxStoredBody is idemd's default largest result body (its --max-result-bytes).
	DefaultMaxStoredBody = 1 << 20
)

// idemd's limits on a stored result's metadata (the kept headers).
const (
	maxMetadataEntries    = 64
	maxMetadataValueBytes = 16 * 1024
)

// DefaultKeepHeaders are the response headers stored and replayed unless Options.KeepHeaders says
// otherwise. set-cookie is never kept unless listed.
func DefaultKeepHeaders() []string {
	return []string{"content-type", "content-language", "content-encoding", "location", "etag",
		"last-modified", "cache-control", "link", "retry-after"}
}

// DefaultStorable is which handler responses are stored: 200–499 except 408, 409, 425 and 429.
// Any other response (5xx, or a status asking the caller to try again) releases the key, so a
// retry runs the handler again.
func DefaultStorable(status int) bool {
	switch status {
	case http.StatusRequestTimeout, http.StatusConflict, http.StatusTooEarly, http.StatusTooManyRequests:
		return false
	}
	return status >= 200 && status <= 499
}

// Options configure the middleware. Only Namespace is required.
type Options struct {
	// Namespace is the idemd namespace of the keys (required).
	Namespace string
	// Methods are the request methods covered (default POST and PATCH); any other passes straight
	// to the handler.
	Methods []string
	// KeyRequired answers a covered request without an Idempotency-Key with 400 missing-key. By
	// default such a request runs unprotected.
	KeyRequired bool
	// Scope is the caller's identity (user, API key, tenant): the same key under two scopes is two
	// records, so one caller's response never replays to another. Default: "" for every request.
	Scope func(*http.Request) string
	// LeaseTTL is the lease asked of idemd, renewed in the background while the handler runs
	// (default: the Go client's, 30 s).
	LeaseTTL time.Duration
	// Wait, when positive, makes a duplicate of a request still running wait for it up to this
	// long (idemd's Wait) and get its response, instead of a 409 request-in-progress at once.
	Wait time.Duration
	// IdemdTimeout bounds the Acquire (with its retries): past it the request gets 503
	// idemd-unavailable, or runs unprotected with FailOpen (default 5 s).
	IdemdTimeout time.Duration
	// FailOpen runs the handler unprotected when idemd cannot be reached, instead of answering
	// 503. Never when idemd answered RESOURCE_EXHAUSTED (rate limited, overloaded, full).
	FailOpen bool
	// MaxBody is the largest request body read to fingerprint a request (default 1 MiB); a larger
	// one gets 413 request-too-large without asking idemd.
	MaxBody int64
	// MaxStoredBody is the largest response body stored (default 1 MiB, idemd's default limit). A
	// larger response is sent but not stored: the key is released and an error logged.
	MaxStoredBody int
	// Storable says which handler responses are stored (default DefaultStorable).
	Storable func(status int) bool
	// KeepHeaders are the response header names stored and replayed (default DefaultKeepHeaders).
	KeepHeaders []string
	// FingerprintInclude leaves only these top-level fields of a JSON body in the fingerprint.
	FingerprintInclude []string
	// FingerprintExclude leaves these top-level fields of a JSON body out of the fingerprint (a
	// client timestamp, say). Not with FingerprintInclude.
	FingerprintExclude []string
	// FingerprintHeaders adds these request headers to the fingerprint.
	FingerprintHeaders []string
	// Logger gets the failures the caller does not see (a Complete that failed after the handler
	// ran, a response too large to store). Default: slog.Default().
	Logger *slog.Logger
}

// middleware is the validated configuration.
type middleware struct {
	client             *idemd.Client
	namespace          string
	methods            map[string]bool
	keyRequired        bool
	scope              func(*http.Request) string
	wait               time.Duration
	callOptions        []idemd.CallOption
	maxBody            int64
	maxStoredBody      int
	storable           func(int) bool
	keepHeaders        []string
	fingerprintInclude map[string]struct{}
	fingerprintExclude map[string]struct{}
	fingerprintHeaders []string
	logger             *slog.Logger
}

// New checks options and returns the middleware, or an error naming the option that is wrong.
func New(client *idemd.Client, options Options) (func(http.Handler) http.Handler, error) {
	m, err := newMiddleware(client, options)
	if err != nil {
		return nil, err
	}
	return m.wrap, nil
}

func newMiddleware(client *idemd.Client, options Options) (*middleware, error) {
	switch {
	case client == nil:
		return nil, errors.New("httpidem: the idemd client is nil")
	case options.Namespace == "":
		return nil, errors.New("httpidem: Options.Namespace is required")
	case options.FingerprintInclude != nil && options.FingerprintExclude != nil:
		return nil, errors.New("httpidem: Options.FingerprintInclude and FingerprintExclude exclude each other")
	case options.LeaseTTL < 0 || options.Wait < 0 || options.IdemdTimeout < 0 || options.MaxBody < 0 || options.MaxStoredBody < 0:
		return nil, errors.New("httpidem: LeaseTTL, Wait, IdemdTimeout, MaxBody and MaxStoredBody must not be negative")
	}
	m := &middleware{
		client:             client,
		namespace:          options.Namespace,
		methods:            map[string]bool{},
		keyRequired:        options.KeyRequired,
		scope:              options.Scope,
		wait:               options.Wait,
		maxBody:            orDefault(options.MaxBody, DefaultMaxBody),
		maxStoredBody:      orDefault(options.MaxStoredBody, DefaultMaxStoredBody),
		storable:           options.Storable,
		keepHeaders:        lowerAll(options.KeepHeaders),
		fingerprintInclude: nameSet(options.FingerprintInclude),
		fingerprintExclude: nameSet(options.FingerprintExclude),
		fingerprintHeaders: lowerAll(options.FingerprintHeaders),
		logger:             options.Logger,
	}
	methods := options.Methods
	if methods == nil {
		methods = []string{http.MethodPost, http.MethodPatch}
	}
	for _, method := range methods {
		m.methods[strings.ToUpper(method)] = true
	}
	if m.storable == nil {
		m.storable = DefaultStorable
	}
	if options.KeepHeaders == nil {
		m.keepHeaders = DefaultKeepHeaders()
	}
	slices.Sort(m.fingerprintHeaders)
	m.fingerprintHeaders = slices.Compact(m.fingerprintHeaders)
	if m.logger == nil {
		m.logger = slog.Default()
	}
	// A duplicate is never waited for inside Idempotent: it is answered 409 at once, or waited for
	// here, up to Options.Wait in all.
	m.callOptions = []idemd.CallOption{idemd.WithMaxWaits(0), idemd.WithAcquireTimeout(orDefault(options.IdemdTimeout, DefaultIdemdTimeout))}
	if options.LeaseTTL > 0 {
		m.callOptions = append(m.callOptions, idemd.WithLeaseTTL(options.LeaseTTL))
	}
	if options.FailOpen {
		m.callOptions = append(m.callOptions, idemd.WithFailOpen())
	}
	return m, nil
}

// Middleware is New for a configuration known to be right: it panics if New would fail, as a
// mistake to find at start-up. Wrap each route's handler with it:
//
//	mux.Handle("POST /orders", httpidem.Middleware(client, httpidem.Options{Namespace: "orders-api", KeyRequired: true})(orders))
func Middleware(client *idemd.Client, options Options) func(http.Handler) http.Handler {
	wrap, err := New(client, options)
	if err != nil {
		panic(err)
	}
	return wrap
}

func (m *middleware) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		m.serve(w, r, next)
	})
}

// serve is one request (clients/HTTP-MIDDLEWARE.md §1–4).
func (m *middleware) serve(w http.ResponseWriter, r *http.Request, next http.Handler) {
	if !m.methods[r.Method] {
		next.ServeHTTP(w, r)
		return
	}
	key, present, invalid := parseKey(r.Header.Values("Idempotency-Key"))
	switch {
	case !present && m.keyRequired:
		writeProblem(w, problemMissingKey, "this route requires an Idempotency-Key header: a new unique value (a UUID) per operation, the same on every retry of it", 0)
		return
	case !present:
		next.ServeHTTP(w, r)
		return
	case invalid != "":
		writeProblem(w, problemInvalidKey, invalid, 0)
		return
	}
	body, tooLarge, err := readBody(r, m.maxBody)
	switch {
	case tooLarge:
		writeProblem(w, problemTooLarge, fmt.Sprintf("the request body is larger than the %d bytes this route reads", m.maxBody), 0)
		return
	case err != nil:
		writeProblem(w, problemUnreadableBody, "the request body could not be read: "+err.Error(), 0)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	fingerprint, err := m.fingerprint(r, body)
	if err != nil {
		writeProblem(w, problemUnreadableBody, "the request cannot be fingerprinted: "+err.Error(), 0)
		return
	}
	scope := ""
	if m.scope != nil {
		scope = m.scope(r)
	}
	m.run(w, r, next, idemdKey(scope, key), fingerprint)
}

// readBody reads at most limit bytes of the body; tooLarge when it is longer.
func readBody(r *http.Request, limit int64) (body []byte, tooLarge bool, err error) {
	if r.ContentLength > limit {
		return nil, true, nil
	}
	body, err = io.ReadAll(io.LimitReader(r.Body, limit+1))
	if maxBytes := new(http.MaxBytesError); errors.As(err, &maxBytes) {
		return nil, true, nil // a limit of the server's own, below ours
	}
	if err != nil {
		return nil, false, err
	}
	return body, int64(len(body)) > limit, nil
}

// errNotStored marks a handler response that was sent but not stored: the key is released, so a
// retry runs the handler again.
var errNotStored = errors.New("httpidem: response not stored")

// run asks idemd about the key, runs the handler under its lease when it is the first, and answers.
func (m *middleware) run(w http.ResponseWriter, r *http.Request, next http.Handler, key string, fingerprint []byte) {
	ctx := r.Context()
	var captured *responseCapture // the handler's response, once it ran
	work := func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
		captured = newCapture(w)
		next.ServeHTTP(captured, r.WithContext(ctx))
		captured.finish()
		if !lease.Protected {
			return idemd.Result{}, nil // fail-open: nothing to store
		}
		if !m.storable(captured.status) {
			return idemd.Result{}, idemd.Retryable(errNotStored)
		}
		result, err := m.result(captured)
		if err != nil {
			m.logger.ErrorContext(ctx, "httpidem: response not stored, key released", "namespace", m.namespace, "key", key, "error", err)
			return idemd.Result{}, idemd.Retryable(fmt.Errorf("%w: %w", errNotStored, err))
		}
		return result, nil
	}
	waitUntil := time.Now().Add(m.wait)
	for {
		outcome, err := m.client.Idempotent(ctx, m.namespace, key, fingerprint, work, m.callOptions...)
		switch {
		case captured != nil:
			// The handler ran: its response goes to the caller whatever became of it in idemd.
			if err != nil && !errors.Is(err, errNotStored) {
				m.logger.ErrorContext(ctx, "httpidem: the handler ran but its response was not stored", "namespace", m.namespace, "key", key, "error", err)
			}
			if err == nil && !outcome.Protected {
				m.logger.WarnContext(ctx, "httpidem: idemd unreachable, the handler ran unprotected (fail-open)", "namespace", m.namespace, "key", key)
			}
			captured.send()
		case err == nil:
			replay(w, outcome.Result)
		case errors.Is(err, idemd.ErrInProgress):
			if m.wait > 0 && m.waitFor(ctx, key, waitUntil) {
				continue // completed or free: Acquire again
			}
			writeProblem(w, problemInProgress, "a request with this Idempotency-Key is still being processed; retry after Retry-After seconds to get its response", retryAfterSeconds(err))
		case errors.Is(err, idemd.ErrFingerprintMismatch):
			writeProblem(w, problemKeyReused, "this Idempotency-Key was already used for a different request (method, target or body); use a new key for a new operation", 0)
		case unavailable(err):
			detail := "idemd could not be reached in time, so the request was not run; retry later"
			if ctx.Err() != nil {
				detail = "the request ended before idemd answered: " + context.Cause(ctx).Error()
			}
			writeProblem(w, problemIdemdUnavailable, detail, 1)
		default:
			m.logger.ErrorContext(ctx, "httpidem: idemd rejected Acquire", "namespace", m.namespace, "key", key, "error", err)
			writeProblem(w, problemIdemdRejected, rejectedDetail(err), 0)
		}
		return
	}
}

// waitFor waits (idemd's Wait) for the duplicate in progress to end, until deadline; true when it
// completed or the key came free, so that Acquire gives its response or the lease.
func (m *middleware) waitFor(ctx context.Context, key string, deadline time.Time) bool {
	remaining := time.Until(deadline)
	if remaining < time.Millisecond {
		return false
	}
	waitCtx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	waited, err := m.client.Wait(waitCtx, &pb.WaitRequest{Namespace: m.namespace, Key: key, Timeout: durationpb.New(remaining)})
	if err != nil {
		if waitCtx.Err() == nil {
			m.logger.WarnContext(ctx, "httpidem: Wait failed; answering request-in-progress", "namespace", m.namespace, "key", key, "error", err)
		}
		return false
	}
	outcome := waited.GetOutcome()
	return outcome == pb.WaitOutcome_WAIT_OUTCOME_COMPLETED || outcome == pb.WaitOutcome_WAIT_OUTCOME_FREE
}

// unavailable: idemd could not be reached or answered RESOURCE_EXHAUSTED (any reason), or the
// request ended first. All are 503: the request was not run, a retry later may be.
func unavailable(err error) bool {
	var idemdErr *idemd.Error
	return errors.Is(err, idemd.ErrUnavailable) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
		(errors.As(err, &idemdErr) && idemdErr.Code == codes.ResourceExhausted)
}

// rejectedDetail names the gRPC code and reason of an idemd error that is the operator's to fix.
func rejectedDetail(err error) string {
	var idemdErr *idemd.Error
	if errors.As(err, &idemdErr) {
		return fmt.Sprintf("idemd answered %s (%s): %s", grpcCodeName(idemdErr.Code), idemdErr.Reason, idemdErr.Message)
	}
	return "the idemd call failed: " + err.Error()
}

// grpcCodeName is a gRPC code as the gRPC spec spells it (INVALID_ARGUMENT); Reason already holds it
// when idemd sent none, so this is for the detail's first part only.
func grpcCodeName(code codes.Code) string {
	var name strings.Builder
	for i, r := range code.String() {
		if i > 0 && r >= 'A' && r <= 'Z' {
			name.WriteByte('_')
		}
		name.WriteRune(r)
	}
	return strings.ToUpper(name.String())
}

// retryAfterSeconds is Retry-After for a 409: idemd's retry_after in whole seconds, at least 1.
func retryAfterSeconds(err error) int {
	var idemdErr *idemd.Error
	if !errors.As(err, &idemdErr) || idemdErr.RetryAfter <= 0 {
		return 1
	}
	return max(1, int(math.Ceil(idemdErr.RetryAfter.Seconds())))
}

// result is what idemd stores for a captured response (clients/HTTP-MIDDLEWARE.md §4): the status,
// the kept headers by lower-case name (repeated fields joined by ", ", set-cookie's by "\n"), and
// the body; an error when idemd would refuse it as too large.
func (m *middleware) result(captured *responseCapture) (idemd.Result, error) {
	body := captured.body.Bytes()
	if len(body) > m.maxStoredBody {
		return idemd.Result{}, fmt.Errorf("the response body is %d bytes, more than the %d stored", len(body), m.maxStoredBody)
	}
	metadata := map[string]string{}
	for _, name := range m.keepHeaders {
		values := captured.header.Values(name)
		if len(values) == 0 {
			continue
		}
		separator := ", "
		if name == "set-cookie" {
			separator = "\n"
		}
		value := strings.Join(values, separator)
		if len(value) > maxMetadataValueBytes || strings.ContainsRune(value, 0) {
			return idemd.Result{}, fmt.Errorf("the %s header (%d bytes) cannot be stored: idemd takes at most %d bytes, without NUL", name, len(value), maxMetadataValueBytes)
		}
		metadata[name] = value
	}
	if len(metadata) > maxMetadataEntries {
		return idemd.Result{}, fmt.Errorf("%d headers to keep; idemd stores at most %d", len(metadata), maxMetadataEntries)
	}
	return idemd.Result{Code: int32(captured.status), Metadata: metadata, Body: body}, nil
}

// replay answers with a stored response: its status, kept headers and body, and
// Idempotent-Replayed: true.
func replay(w http.ResponseWriter, result idemd.Result) {
	status := int(result.Code)
	if status < 200 || status > 999 {
		writeProblem(w, problemUnreplayableState, fmt.Sprintf("the stored result has code %d, which is not an HTTP status (is another program using this namespace?)", status), 0)
		return
	}
	header := w.Header()
	for name, value := range result.Metadata {
		if name == "set-cookie" {
			for _, cookie := range strings.Split(value, "\n") {
				header.Add(name, cookie)
			}
			continue
		}
		header.Set(name, value)
	}
	header.Set("Idempotent-Replayed", "true")
	writeResponse(w, status, result.Body)
}

// orDefault is value, or fallback for an option left at zero.
func orDefault[T int | int64 | time.Duration](value, fallback T) T {
	if value == 0 {
		return fallback
	}
	return value
}

func lowerAll(names []string) []string {
	out := make([]string, 0, len(names))
	for _, name := range names {
		out = append(out, strings.ToLower(name))
	}
	return out
}

// nameSet is nil for nil (the option is not set), else the set of the names.
func nameSet(names []string) map[string]struct{} {
	if names == nil {
		return nil
	}
	set := make(map[string]struct{}, len(names))
	for _, name := range names {
		set[name] = struct{}{}
	}
	return set
}
