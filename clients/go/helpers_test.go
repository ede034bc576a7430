package idemd_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	idemd "github.com/idemd/idemd/clients/go"
	"github.com/idemd/idemd/clients/go/internal/idemdtest"
)

// These tests talk to a real idemd over real gRPC, started by internal/idemdtest (which says what
// `cargo test` sets for it).

// idemdProcess is an `idemd serve` started by a test.
type idemdProcess struct {
	addr string
}

// startIdemd starts $IDEMD_BINARY serve on ephemeral ports with args, and stops it when the test
// ends.
func startIdemd(t *testing.T, args ...string) *idemdProcess {
	t.Helper()
	return &idemdProcess{addr: idemdtest.Start(t, args...).Addr}
}

// startPostgresIdemd is an idemd on the run's PostgreSQL database.
func startPostgresIdemd(t *testing.T, args ...string) *idemdProcess {
	t.Helper()
	return &idemdProcess{addr: idemdtest.StartPostgres(t, args...).Addr}
}

// newClient is a client of addr, closed when the test ends.
func newClient(t *testing.T, addr string, options ...idemd.Option) *idemd.Client {
	t.Helper()
	client, err := idemd.New(addr, options...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

// uniqueKey is a key no other test or run uses.
func uniqueKey(label string) string {
	suffix := make([]byte, 8)
	_, _ = rand.Read(suffix)
	return label + "-" + hex.EncodeToString(suffix)
}

// testContext is bounded, so a hang fails the test instead of the run.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// rpcLog records the RPCs a client made (method and error), and signals the first of each method.
type rpcLog struct {
	mu      sync.Mutex
	calls   []string
	errors  []error
	started map[string]chan struct{}
}

func newRPCLog(methods ...string) *rpcLog {
	log := &rpcLog{started: map[string]chan struct{}{}}
	for _, method := range methods {
		log.started[method] = make(chan struct{})
	}
	return log
}

func (l *rpcLog) interceptor() grpc.DialOption {
	return grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		name := method[strings.LastIndex(method, "/")+1:]
		l.mu.Lock()
		if started, ok := l.started[name]; ok {
			close(started)
			delete(l.started, name)
		}
		l.mu.Unlock()
		err := invoker(ctx, method, req, reply, cc, opts...)
		l.mu.Lock()
		l.calls = append(l.calls, name)
		l.errors = append(l.errors, err)
		l.mu.Unlock()
		return err
	})
}

// count is how many calls of method ended.
func (l *rpcLog) count(method string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, call := range l.calls {
		if call == method {
			n++
		}
	}
	return n
}

// failures are the errors of the ended calls of method.
func (l *rpcLog) failures(method string) []error {
	l.mu.Lock()
	defer l.mu.Unlock()
	var failed []error
	for i, call := range l.calls {
		if call == method && l.errors[i] != nil {
			failed = append(failed, l.errors[i])
		}
	}
	return failed
}

// awaitStarted waits until a call of method began (registered with newRPCLog).
func (l *rpcLog) awaitStarted(t *testing.T, method string) {
	t.Helper()
	l.mu.Lock()
	started, ok := l.started[method]
	l.mu.Unlock()
	if !ok {
		return // already started
	}
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		t.Fatalf("no %s call within 30 s", method)
	}
}

// closedAddress is a 127.0.0.1 address nothing listens on (bound, then closed).
func closedAddress(t *testing.T) string {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := listener.Addr().String()
	_ = listener.Close()
	return addr
}

// flakyProxy forwards TCP to target, except that it closes the first `refuse` connections at once
// (the client sees idemd as unreachable). It counts the connections it got.
type flakyProxy struct {
	addr     string
	mu       sync.Mutex
	accepted int
}

func startFlakyProxy(t *testing.T, target string, refuse int) *flakyProxy {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	proxy := &flakyProxy{addr: listener.Addr().String()}
	var conns sync.WaitGroup
	t.Cleanup(func() {
		_ = listener.Close()
		conns.Wait()
	})
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			proxy.mu.Lock()
			proxy.accepted++
			n := proxy.accepted
			proxy.mu.Unlock()
			if n <= refuse {
				_ = conn.Close()
				continue
			}
			conns.Add(1)
			go func() {
				defer conns.Done()
				defer conn.Close()
				upstream, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer upstream.Close()
				done := make(chan struct{}, 2)
				go func() { _, _ = io.Copy(upstream, conn); done <- struct{}{} }()
				go func() { _, _ = io.Copy(conn, upstream); done <- struct{}{} }()
				<-done
			}()
		}
	}()
	return proxy
}

func (p *flakyProxy) connections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepted
}
