package httpidem_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	idemd "github.com/idemd/idemd/clients/go"
	"github.com/idemd/idemd/clients/go/httpidem"
	"github.com/idemd/idemd/clients/go/internal/idemdtest"
)

// These tests run the middleware in a real net/http server (httptest) against a real idemd on
// PostgreSQL, over real gRPC and HTTP on 127.0.0.1.

const namespace = "go-httpidem"

func newClient(t *testing.T, addr string) *idemd.Client {
	t.Helper()
	client, err := idemd.New(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func uniqueKey(label string) string {
	suffix := make([]byte, 8)
	_, _ = rand.Read(suffix)
	return label + "-" + hex.EncodeToString(suffix)
}

// serve runs handler behind the middleware with options in an httptest server.
func serve(t *testing.T, client *idemd.Client, options httpidem.Options, handler http.Handler) string {
	t.Helper()
	return serveObserved(t, client, options, handler, nil)
}

// serveObserved is serve that signals served (when not nil) each time the middleware has returned.
func serveObserved(t *testing.T, client *idemd.Client, options httpidem.Options, handler http.Handler, served chan<- struct{}) string {
	t.Helper()
	if options.Namespace == "" {
		options.Namespace = namespace
	}
	options.Logger = slog.New(slog.NewTextHandler(testLog{t}, nil))
	wrap, err := httpidem.New(client, options)
	if err != nil {
		t.Fatal(err)
	}
	protected := wrap(handler)
	server := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		protected.ServeHTTP(w, r)
		if served != nil {
			served <- struct{}{}
		}
	}))
	t.Cleanup(server.Close)
	return server.URL
}

// testLog writes the middleware's log to the test's (shown when it fails, or with -v).
type testLog struct{ t *testing.T }

func (l testLog) Write(line []byte) (int, error) {
	l.t.Log(strings.TrimSuffix(string(line), "\n"))
	return len(line), nil
}

type answer struct {
	status int
	header http.Header
	body   string
}

func post(t *testing.T, url, key, body string, headers ...string) answer {
	t.Helper()
	request, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	request.Header.Set("Content-Type", "application/json")
	if key != "" {
		request.Header.Set("Idempotency-Key", key)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		request.Header.Set(headers[i], headers[i+1])
	}
	response, err := http.DefaultClient.Do(request)
	if err != nil {
		t.Fatal(err)
	}
	defer response.Body.Close()
	data, err := io.ReadAll(response.Body)
	if err != nil {
		t.Fatal(err)
	}
	return answer{response.StatusCode, response.Header, string(data)}
}

// problemType is the type of a problem answer (failing the test if it is not one).
func problemType(t *testing.T, a answer) string {
	t.Helper()
	var document struct {
		Type   string `json:"type"`
		Status int    `json:"status"`
		Detail string `json:"detail"`
	}
	if a.header.Get("Content-Type") != "application/problem+json" || json.Unmarshal([]byte(a.body), &document) != nil || document.Status != a.status {
		t.Fatalf("not a problem document: %d %v %s", a.status, a.header, a.body)
	}
	return strings.TrimPrefix(document.Type, httpidem.ProblemTypeBase+"#")
}

// counting answers 201 with a fresh run number and a cookie, counting its runs.
func counting(runs *atomic.Int32) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		run := runs.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Location", fmt.Sprintf("/orders/%d", run))
		w.Header().Set("Set-Cookie", fmt.Sprintf("run=%d", run))
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"run":%d}`, run)
	})
}

func TestFirstRequestRunsAndDuplicatesReplay(t *testing.T) {
	server := idemdtest.StartPostgres(t)
	var runs atomic.Int32
	url := serve(t, newClient(t, server.Addr), httpidem.Options{KeyRequired: true}, counting(&runs))
	key := uniqueKey("replay")
	first := post(t, url, key, `{"id":1,"amount":2}`)
	if first.status != 201 || first.body != `{"run":1}` || first.header.Get("Idempotent-Replayed") != "" || first.header.Get("Set-Cookie") != "run=1" {
		t.Fatalf("first: %+v", first)
	}
	// Quoted, other whitespace and member order: the same key and request.
	again := post(t, url, `"`+key+`"`, `{ "amount": 2, "id": 1 }`)
	if again.status != 201 || again.body != first.body || again.header.Get("Idempotent-Replayed") != "true" ||
		again.header.Get("Location") != "/orders/1" || again.header.Get("Content-Type") != "application/json" || again.header.Get("Set-Cookie") != "" {
		t.Fatalf("duplicate: %+v", again)
	}
	if got := problemType(t, post(t, url, key, `{"id":1,"amount":3}`)); got != "key-reused" {
		t.Fatalf("changed body: %s", got)
	}
	if got := problemType(t, post(t, url+"?x=1", key, `{"id":1,"amount":2}`)); got != "key-reused" {
		t.Fatalf("changed target: %s", got)
	}
	if got := problemType(t, post(t, url, "", `{}`)); got != "missing-key" {
		t.Fatalf("no key: %s", got)
	}
	if runs.Load() != 1 {
		t.Fatalf("the handler ran %d times, want once", runs.Load())
	}
	// The same key in another scope is another record.
	scoped := serve(t, newClient(t, server.Addr), httpidem.Options{Scope: func(r *http.Request) string { return "tenant-b" }}, counting(&runs))
	if other := post(t, scoped, key, `{"id":1,"amount":2}`); other.status != 201 || other.header.Get("Idempotent-Replayed") != "" || runs.Load() != 2 {
		t.Fatalf("another scope replayed: %+v (runs %d)", other, runs.Load())
	}
}

func TestNotStorableResponsesAndPanicsRelease(t *testing.T) {
	server := idemdtest.StartPostgres(t)
	var runs atomic.Int32
	url := serve(t, newClient(t, server.Addr), httpidem.Options{MaxStoredBody: 64}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		runs.Add(1)
		switch r.Header.Get("X-Do") {
		case "fail":
			http.Error(w, "failed", http.StatusInternalServerError)
		case "limit":
			w.WriteHeader(http.StatusTooManyRequests)
		case "big":
			_, _ = io.WriteString(w, strings.Repeat("b", 65))
		case "panic":
			panic(http.ErrAbortHandler)
		default:
			_, _ = io.WriteString(w, "done")
		}
	}))
	freshConnection := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	for _, do := range []string{"fail", "limit", "big", "panic"} {
		key := uniqueKey(do)
		before := runs.Load()
		request, _ := http.NewRequest(http.MethodPost, url, strings.NewReader("{}"))
		request.Header.Set("Idempotency-Key", key)
		request.Header.Set("Content-Type", "application/json")
		request.Header.Set("X-Do", do)
		// A new connection each time: net/http's Transport resends a request with an
		// Idempotency-Key on its own when a reused connection breaks, as a panic breaks it.
		response, err := freshConnection.Do(request)
		switch {
		case do == "panic":
			if err == nil {
				t.Fatalf("a panicking handler answered %d", response.StatusCode)
			}
		case err != nil:
			t.Fatal(err)
		default:
			body, _ := io.ReadAll(response.Body)
			response.Body.Close()
			if want := map[string]int{"fail": 500, "limit": 429, "big": 200}[do]; response.StatusCode != want || response.Header.Get("Idempotent-Replayed") != "" {
				t.Fatalf("%s: %d %q, want the handler's %d", do, response.StatusCode, body, want)
			}
			if do == "big" && len(body) != 65 {
				t.Fatalf("the unstored response lost its body: %d bytes", len(body))
			}
		}
		// The key was released: the retry runs the handler, and its answer is stored.
		if retry := post(t, url, key, "{}"); retry.status != 200 || retry.body != "done" || runs.Load() != before+2 {
			t.Fatalf("%s: retry %+v, runs %d -> %d", do, retry, before, runs.Load())
		}
		if replay := post(t, url, key, "{}"); replay.header.Get("Idempotent-Replayed") != "true" || runs.Load() != before+2 {
			t.Fatalf("%s: %+v", do, replay)
		}
	}
}

// A duplicate of a running request: 409 with idemd's retry_after in whole seconds, or with Wait,
// the first request's response once it is stored.
func TestDuplicateInProgress(t *testing.T) {
	server := idemdtest.StartPostgres(t)
	client := newClient(t, server.Addr)
	waitStarted := make(chan struct{}, 1)
	waitingClient, err := idemd.New(server.Addr, idemd.WithDialOptions(grpc.WithChainUnaryInterceptor(
		func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			if strings.HasSuffix(method, "/Wait") {
				select {
				case waitStarted <- struct{}{}:
				default:
				}
			}
			return invoker(ctx, method, req, reply, cc, opts...)
		})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = waitingClient.Close() })
	started, finish := make(chan struct{}, 1), make(chan struct{})
	var runs atomic.Int32
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		run := runs.Add(1)
		started <- struct{}{}
		<-finish
		fmt.Fprintf(w, "run %d", run)
	})
	url := serve(t, client, httpidem.Options{LeaseTTL: 20 * time.Second}, handler)
	waiting := serve(t, waitingClient, httpidem.Options{LeaseTTL: 20 * time.Second, Wait: 30 * time.Second}, handler)
	var finished sync.Once
	release := func() { finished.Do(func() { close(finish) }) }
	t.Cleanup(release) // before the servers close, which waits for the handler, if the test fails first

	key := uniqueKey("busy")
	firstDone := make(chan answer, 1)
	go func() { firstDone <- post(t, url, key, "{}") }()
	<-started
	busy := post(t, url, key, "{}")
	// idemd's retry_after is the time left on the 20 s lease, in whole seconds rounded up.
	if retryAfter, err := strconv.Atoi(busy.header.Get("Retry-After")); problemType(t, busy) != "request-in-progress" || err != nil || retryAfter < 10 || retryAfter > 20 {
		t.Fatalf("duplicate: %+v (want Retry-After near 20: the lease's time left)", busy)
	}
	// The waiting route shares the namespace: its duplicate waits for the first and replays it.
	waited := make(chan answer, 1)
	go func() { waited <- post(t, waiting, key, "{}") }()
	select {
	case <-waitStarted:
	case <-time.After(30 * time.Second):
		t.Fatal("the waiting route did not call Wait within 30 s")
	}
	release()
	first := <-firstDone
	second := <-waited
	if first.body != "run 1" || second.body != "run 1" || second.header.Get("Idempotent-Replayed") != "true" || runs.Load() != 1 {
		t.Fatalf("first %+v, waiting duplicate %+v, runs %d", first, second, runs.Load())
	}
}

// The handler runs with the request's context: a caller that goes away cancels it, and the key is
// released, so the caller's retry runs it again.
func TestHandlerSeesCancellation(t *testing.T) {
	server := idemdtest.StartPostgres(t)
	cancelled := make(chan error, 1)
	started := make(chan struct{}, 1)
	var runs atomic.Int32
	served := make(chan struct{}, 2)
	url := serveObserved(t, newClient(t, server.Addr), httpidem.Options{}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if runs.Add(1) > 1 {
			_, _ = io.WriteString(w, "second")
			return
		}
		started <- struct{}{}
		select {
		case <-r.Context().Done():
			cancelled <- r.Context().Err()
		case <-time.After(30 * time.Second):
		}
		http.Error(w, "gone", http.StatusServiceUnavailable)
	}), served)
	key := uniqueKey("gone")
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel) // before the server closes, which waits for the handler, if the test fails first
	request, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader("{}"))
	request.Header.Set("Idempotency-Key", key)
	request.Header.Set("Content-Type", "application/json")
	go func() {
		if response, err := http.DefaultClient.Do(request); err == nil {
			response.Body.Close()
		}
	}()
	<-started
	cancel()
	select {
	case err := <-cancelled:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("the handler's context ended with %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the handler's context was not cancelled within 30 s of the caller leaving")
	}
	<-served // the middleware released the key
	if retry := post(t, url, key, "{}"); retry.body != "second" {
		t.Fatalf("retry: %+v", retry)
	}
}

// An idemd that accepts connections and never answers: IdemdTimeout bounds the wait, then 503
// idemd-unavailable, or with FailOpen the handler runs unprotected.
func TestHungIdemdIsUnavailableWithinIdemdTimeout(t *testing.T) {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = listener.Close() })
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { _ = conn.Close() })
		}
	}()
	client := newClient(t, listener.Addr().String())
	var runs atomic.Int32
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		runs.Add(1)
		if deadline, ok := r.Context().Deadline(); ok {
			t.Errorf("the handler got a deadline (%v): IdemdTimeout must bound only idemd", time.Until(deadline))
		}
		w.WriteHeader(http.StatusCreated)
	})
	closed := serve(t, client, httpidem.Options{IdemdTimeout: 300 * time.Millisecond}, handler)
	started := time.Now()
	down := post(t, closed, uniqueKey("hung"), "{}")
	elapsed := time.Since(started)
	if problemType(t, down) != "idemd-unavailable" || down.header.Get("Retry-After") != "1" || runs.Load() != 0 {
		t.Fatalf("fail closed: %+v, runs %d", down, runs.Load())
	}
	if elapsed > 3*time.Second {
		t.Fatalf("answered after %v: the 300 ms IdemdTimeout did not bound the Acquire (without it, grpc-go gives up connecting after 5 s)", elapsed)
	}
	open := serve(t, client, httpidem.Options{IdemdTimeout: 300 * time.Millisecond, FailOpen: true}, handler)
	if ran := post(t, open, uniqueKey("hung"), "{}"); ran.status != 201 || runs.Load() != 1 {
		t.Fatalf("fail open: %+v, runs %d", ran, runs.Load())
	}
}

// idemd refuses the middleware's configuration: 500 idemd-rejected naming the code and reason.
func TestIdemdRejectionIsNamed(t *testing.T) {
	server := idemdtest.StartPostgres(t)
	var runs atomic.Int32
	url := serve(t, newClient(t, server.Addr), httpidem.Options{Namespace: "not a valid namespace!", FailOpen: true}, counting(&runs))
	rejected := post(t, url, uniqueKey("rejected"), "{}")
	if problemType(t, rejected) != "idemd-rejected" || !strings.Contains(rejected.body, "INVALID_ARGUMENT") || !strings.Contains(rejected.body, "INVALID_REQUEST") || runs.Load() != 0 {
		t.Fatalf("%+v, runs %d", rejected, runs.Load())
	}
}

// A Complete that fails after the handler ran (here every Complete is refused UNAVAILABLE on its
// way out): the caller still gets the handler's response, and the failure is logged as an error.
func TestHandlerResponseIsSentWhenCompleteFails(t *testing.T) {
	server := idemdtest.StartPostgres(t)
	client, err := idemd.New(server.Addr, idemd.WithDialOptions(grpc.WithChainUnaryInterceptor(
		func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			if strings.HasSuffix(method, "/Complete") {
				return status.Error(codes.Unavailable, "injected: Complete does not reach idemd")
			}
			return invoker(ctx, method, req, reply, cc, opts...)
		})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	var log syncLog
	wrap, err := httpidem.New(client, httpidem.Options{Namespace: namespace, Logger: slog.New(slog.NewTextHandler(&log, nil))})
	if err != nil {
		t.Fatal(err)
	}
	var runs atomic.Int32
	httpServer := httptest.NewServer(wrap(counting(&runs)))
	t.Cleanup(httpServer.Close)
	key := uniqueKey("complete-fails")
	first := post(t, httpServer.URL, key, "{}")
	if first.status != 201 || first.body != `{"run":1}` || first.header.Get("Set-Cookie") != "run=1" {
		t.Fatalf("the handler's response was not sent: %+v", first)
	}
	if text := log.String(); !strings.Contains(text, "level=ERROR") || !strings.Contains(text, "not stored") || !strings.Contains(text, key) {
		t.Fatalf("no error logged for the lost Complete:\n%s", text)
	}
	// Nothing was stored and the lease is still held: a retry now is told to come back later.
	if retry := post(t, httpServer.URL, key, "{}"); problemType(t, retry) != "request-in-progress" || runs.Load() != 1 {
		t.Fatalf("retry: %+v, runs %d", retry, runs.Load())
	}
}

// syncLog is a log buffer the middleware may write from the server's goroutines.
type syncLog struct {
	mu   sync.Mutex
	text strings.Builder
}

func (l *syncLog) Write(line []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.text.Write(line)
}

func (l *syncLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.text.String()
}
