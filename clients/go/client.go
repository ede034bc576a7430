// Package idemd is the Go client of idemd, the idempotency authority
// (idempotency.v1.IdempotencyService, see proto/idempotency/v1/idempotency.proto).
//
// Client.Idempotent runs a piece of work at most once per (namespace, key): it acquires the key,
// runs the work under a lease that is renewed in the background, stores the result, and replays
// the stored result to every later call with the same key. The low-level RPCs are methods of
// Client too, and the generated stubs are in the idempotencyv1 package.
package idemd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"time"

	"go.opentelemetry.io/otel/propagation"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/idemd/idemd/clients/go/idempotencyv1"
)

// DefaultRPCTimeout is the deadline of each Acquire, Complete, Release, Renew and Get (a Wait gets
// its wait timeout on top), unless WithRPCTimeout says otherwise or the context's deadline is sooner.
const DefaultRPCTimeout = 10 * time.Second

// reconnectBackoff paces reconnects to an idemd that went away: grpc-go's defaults, but at most
// 2 s between attempts.
var reconnectBackoff = backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 2 * time.Second}

// Client talks to one idemd target. It is safe for concurrent use; Close it when done.
type Client struct {
	conn       *grpc.ClientConn
	stub       pb.IdempotencyServiceClient
	token      string
	rpcTimeout time.Duration
}

// Option configures a Client.
type Option func(*clientConfig)

type clientConfig struct {
	token       string
	credentials credentials.TransportCredentials
	rpcTimeout  time.Duration
	dialOptions []grpc.DialOption
}

// WithToken sends "authorization: Bearer <token>" on every call.
func WithToken(token string) Option {
	return func(c *clientConfig) { c.token = token }
}

// WithTLS connects over TLS with this configuration (nil: the system roots, the target's host
// name). Without it or WithTransportCredentials the connection is plaintext.
func WithTLS(config *tls.Config) Option {
	return func(c *clientConfig) {
		if config == nil {
			config = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		c.credentials = credentials.NewTLS(config)
	}
}

// WithTransportCredentials uses these gRPC transport credentials (e.g. from
// credentials.NewClientTLSFromFile).
func WithTransportCredentials(creds credentials.TransportCredentials) Option {
	return func(c *clientConfig) { c.credentials = creds }
}

// WithRPCTimeout sets the deadline of each RPC (default DefaultRPCTimeout).
func WithRPCTimeout(timeout time.Duration) Option {
	return func(c *clientConfig) { c.rpcTimeout = timeout }
}

// WithDialOptions adds grpc-go dial options (interceptors, keepalive, a custom dialer…).
func WithDialOptions(options ...grpc.DialOption) Option {
	return func(c *clientConfig) { c.dialOptions = append(c.dialOptions, options...) }
}

// New makes a client of the idemd at target ("host:port", or any grpc-go target such as
// "dns:///idemd:50051"). It does not connect yet: the first call does, and a target that is down
// gives ErrUnavailable then.
func New(target string, options ...Option) (*Client, error) {
	config := clientConfig{rpcTimeout: DefaultRPCTimeout, credentials: insecure.NewCredentials()}
	for _, option := range options {
		option(&config)
	}
	if config.rpcTimeout <= 0 {
		return nil, fmt.Errorf("idemd: RPC timeout must be positive, got %v", config.rpcTimeout)
	}
	dialOptions := append([]grpc.DialOption{
		grpc.WithTransportCredentials(config.credentials),
		// grpc-go waits up to 120 s between reconnects by default: far too long for an authority
		// on the request path, whose restart takes seconds. (WithDialOptions may override it.)
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: reconnectBackoff, MinConnectTimeout: 5 * time.Second}),
	}, config.dialOptions...)
	conn, err := grpc.NewClient(target, dialOptions...)
	if err != nil {
		return nil, fmt.Errorf("idemd: client for %q: %w", target, err)
	}
	return &Client{conn: conn, stub: pb.NewIdempotencyServiceClient(conn), token: config.token, rpcTimeout: config.rpcTimeout}, nil
}

// Close closes the connection. Calls in flight fail with codes.Canceled.
func (c *Client) Close() error {
	return c.conn.Close()
}

// rpcContext bounds ctx by timeout and adds the bearer token and the caller's trace context.
func (c *Client) rpcContext(ctx context.Context, timeout time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	if c.token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.token)
	}
	return withTraceContext(ctx), cancel
}

// traceContext writes W3C traceparent/tracestate. It is used directly rather than
// otel.GetTextMapPropagator(), whose default does nothing: W3C trace context is what idemd reads,
// and a caller's trace should continue into idemd without any setup by the caller.
var traceContext = propagation.TraceContext{}

// withTraceContext adds ctx's OpenTelemetry span context (if it has a valid one) to the call's
// metadata as traceparent/tracestate, so idemd's spans join the caller's trace.
func withTraceContext(ctx context.Context) context.Context {
	carrier := propagation.MapCarrier{}
	traceContext.Inject(ctx, carrier)
	if len(carrier) == 0 {
		return ctx
	}
	pairs := make([]string, 0, 2*len(carrier))
	for name, value := range carrier {
		pairs = append(pairs, name, value)
	}
	return metadata.AppendToOutgoingContext(ctx, pairs...)
}

// call runs one unary RPC with the client's deadline and turns its error into an *Error.
func call[Req, Res any](c *Client, ctx context.Context, timeout time.Duration, rpc func(context.Context, Req, ...grpc.CallOption) (Res, error), request Req) (Res, error) {
	rpcCtx, cancel := c.rpcContext(ctx, timeout)
	defer cancel()
	response, err := rpc(rpcCtx, request)
	if err != nil {
		var zero Res
		return zero, fromRPC(ctx, err)
	}
	return response, nil
}

// Acquire claims a key (see the proto). Errors are *Error.
func (c *Client) Acquire(ctx context.Context, request *pb.AcquireRequest) (*pb.AcquireResponse, error) {
	return call(c, ctx, c.rpcTimeout, c.stub.Acquire, request)
}

// Complete stores the result of the work done under a lease.
func (c *Client) Complete(ctx context.Context, request *pb.CompleteRequest) (*pb.CompleteResponse, error) {
	return call(c, ctx, c.rpcTimeout, c.stub.Complete, request)
}

// Release gives a key back after a retryable failure.
func (c *Client) Release(ctx context.Context, request *pb.ReleaseRequest) (*pb.ReleaseResponse, error) {
	return call(c, ctx, c.rpcTimeout, c.stub.Release, request)
}

// Renew extends a lease.
func (c *Client) Renew(ctx context.Context, request *pb.RenewRequest) (*pb.RenewResponse, error) {
	return call(c, ctx, c.rpcTimeout, c.stub.Renew, request)
}

// Get reads a key's record.
func (c *Client) Get(ctx context.Context, request *pb.GetRequest) (*pb.GetResponse, error) {
	return call(c, ctx, c.rpcTimeout, c.stub.Get, request)
}

// Wait waits for an in-flight duplicate; its deadline is the wait timeout (30 s when unset) plus
// the RPC timeout, so the server's own timeout ends it first.
func (c *Client) Wait(ctx context.Context, request *pb.WaitRequest) (*pb.WaitResponse, error) {
	wait := 30 * time.Second
	if request.GetTimeout() != nil && request.GetTimeout().AsDuration() > 0 {
		wait = request.GetTimeout().AsDuration()
	}
	return call(c, ctx, wait+c.rpcTimeout, c.stub.Wait, request)
}

// durationOrNil is nil for zero (the server's default), else d.
func durationOrNil(d time.Duration) *durationpb.Duration {
	if d <= 0 {
		return nil
	}
	return durationpb.New(d)
}

// errorsAs is errors.As with the target type as a type parameter.
func errorsAs[T error](err error) (T, bool) {
	var target T
	ok := errors.As(err, &target)
	return target, ok
}
