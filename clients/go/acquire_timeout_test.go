package idemd_test

import (
	"context"
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	idemd "github.com/idemd/idemd/clients/go"
	pb "github.com/idemd/idemd/clients/go/idempotencyv1"
)

// hungAddress is a 127.0.0.1 address that accepts connections and never answers (not even the
// HTTP/2 handshake): an idemd that hangs.
func hungAddress(t *testing.T) string {
	t.Helper()
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
	return listener.Addr().String()
}

// WithAcquireTimeout ends an Acquire that idemd does not answer as ErrUnavailable (not as the
// caller's deadline), so fail-open applies, and leaves the work's context without its bound.
func TestAcquireTimeoutEndsAHungAcquireAsUnavailable(t *testing.T) {
	client := newClient(t, hungAddress(t))
	ctx := testContext(t)
	var runs atomic.Int32
	started := time.Now()
	_, err := client.Idempotent(ctx, namespace, uniqueKey("hung"), order{ID: "h"}, countingWork(&runs, "x"),
		idemd.WithAcquireTimeout(200*time.Millisecond))
	if elapsed := time.Since(started); elapsed > 3*time.Second {
		t.Fatalf("returned after %v: the 200 ms acquire timeout did not bound it (without it, grpc-go gives up connecting after 5 s)", elapsed)
	}
	if !errors.Is(err, idemd.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) || runs.Load() != 0 {
		t.Fatalf("got %v (work ran %d times), want ErrUnavailable and not the caller's deadline", err, runs.Load())
	}
	callerDeadline, _ := ctx.Deadline()
	outcome, err := client.Idempotent(ctx, namespace, uniqueKey("hung"), order{ID: "h"}, func(workCtx context.Context, lease idemd.Lease) (idemd.Result, error) {
		if deadline, _ := workCtx.Deadline(); !deadline.Equal(callerDeadline) {
			t.Errorf("the work's deadline is %v away, not the caller's: the acquire timeout leaked into it", time.Until(deadline))
		}
		return countingWork(&runs, "unprotected")(workCtx, lease)
	}, idemd.WithAcquireTimeout(200*time.Millisecond), idemd.WithFailOpen())
	if err != nil || outcome.Protected || runs.Load() != 1 {
		t.Fatalf("fail open: %+v %v", outcome, err)
	}
	if _, err := client.Idempotent(ctx, namespace, "k", nil, countingWork(&runs, "x"), idemd.WithAcquireTimeout(-time.Second)); err == nil {
		t.Fatal("a negative acquire timeout was accepted")
	}
}

// ErrInProgress carries idemd's retry_after: the time left on the other caller's lease.
func TestInProgressCarriesRetryAfter(t *testing.T) {
	server := startPostgresIdemd(t)
	holder := newClient(t, server.addr)
	client := newClient(t, server.addr)
	ctx := testContext(t)
	key := uniqueKey("retry-after")
	fp, err := idemd.Fingerprint(order{ID: key})
	if err != nil {
		t.Fatal(err)
	}
	lease := 3 * time.Second
	acquired, err := holder.Acquire(ctx, &pb.AcquireRequest{Namespace: namespace, Key: key, Fingerprint: fp, LeaseTtl: durationpb.New(lease)})
	if err != nil || acquired.GetOutcome() != pb.Outcome_OUTCOME_ACQUIRED {
		t.Fatalf("acquire: %v %v", acquired, err)
	}
	var runs atomic.Int32
	_, err = client.Idempotent(ctx, namespace, key, order{ID: key}, countingWork(&runs, "never"), idemd.WithMaxWaits(0))
	var inProgress *idemd.Error
	if !errors.Is(err, idemd.ErrInProgress) || !errors.As(err, &inProgress) || runs.Load() != 0 {
		t.Fatalf("got %v (work ran %d times), want ErrInProgress", err, runs.Load())
	}
	if inProgress.RetryAfter <= 0 || inProgress.RetryAfter > lease {
		t.Fatalf("RetryAfter %v, want the lease's time left, in (0, %v]", inProgress.RetryAfter, lease)
	}
}
