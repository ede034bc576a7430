package idemd_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	idemd "github.com/idemd/idemd/clients/go"
	pb "github.com/idemd/idemd/clients/go/idempotencyv1"
)

const namespace = "go-client"

type order struct {
	ID     string `json:"id"`
	Amount int    `json:"amount"`
}

// result is a work that counts its runs and returns body.
func countingWork(runs *atomic.Int32, body string) idemd.WorkFunc {
	return func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
		runs.Add(1)
		return idemd.Result{Body: []byte(body), Code: 201, Metadata: map[string]string{"content-type": "text/plain"}}, nil
	}
}

func TestFreshCallRunsWorkAndRetryReplays(t *testing.T) {
	server := startPostgresIdemd(t)
	client := newClient(t, server.addr)
	ctx := testContext(t)
	key := uniqueKey("fresh")
	var runs atomic.Int32
	var fencing uint64
	first, err := client.Idempotent(ctx, namespace, key, order{ID: key, Amount: 1250}, func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
		fencing = lease.FencingToken
		if !lease.Protected || lease.Token == "" {
			t.Errorf("work ran unprotected: %+v", lease)
		}
		return countingWork(&runs, "charged")(ctx, lease)
	})
	if err != nil {
		t.Fatal(err)
	}
	if first.Replayed || !first.Protected || string(first.Result.Body) != "charged" || first.Result.Code != 201 || first.FencingToken == 0 || first.FencingToken != fencing {
		t.Fatalf("first call: %+v (work saw fencing token %d)", first, fencing)
	}
	again, err := client.Idempotent(ctx, namespace, key, order{ID: key, Amount: 1250}, countingWork(&runs, "charged twice"))
	if err != nil {
		t.Fatal(err)
	}
	if !again.Replayed || string(again.Result.Body) != "charged" || again.Result.Code != 201 || again.Result.Metadata["content-type"] != "text/plain" {
		t.Fatalf("retry: %+v", again)
	}
	if runs.Load() != 1 {
		t.Fatalf("work ran %d times, want 1", runs.Load())
	}
}

func TestInProgressWaitsAndReplaysTheFirstResult(t *testing.T) {
	server := startPostgresIdemd(t)
	first := newClient(t, server.addr)
	waits := newRPCLog("Wait")
	second := newClient(t, server.addr, idemd.WithDialOptions(waits.interceptor()))
	ctx := testContext(t)
	key := uniqueKey("in-progress")
	working := make(chan struct{})
	finish := make(chan struct{})
	firstDone := make(chan error, 1)
	go func() {
		_, err := first.Idempotent(ctx, namespace, key, order{ID: key}, func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
			close(working)
			select {
			case <-finish:
			case <-ctx.Done():
				return idemd.Result{}, ctx.Err()
			}
			return idemd.Result{Body: []byte("first")}, nil
		})
		firstDone <- err
	}()
	<-working
	secondDone := make(chan struct {
		outcome idemd.Outcome
		err     error
	}, 1)
	var secondRuns atomic.Int32
	go func() {
		outcome, err := second.Idempotent(ctx, namespace, key, order{ID: key}, countingWork(&secondRuns, "second"))
		secondDone <- struct {
			outcome idemd.Outcome
			err     error
		}{outcome, err}
	}()
	// The second caller found the key in progress and is waiting on it: now let the first finish.
	waits.awaitStarted(t, "Wait")
	close(finish)
	if err := <-firstDone; err != nil {
		t.Fatal(err)
	}
	got := <-secondDone
	if got.err != nil {
		t.Fatal(got.err)
	}
	if !got.outcome.Replayed || string(got.outcome.Result.Body) != "first" || secondRuns.Load() != 0 {
		t.Fatalf("second caller: %+v, its work ran %d times", got.outcome, secondRuns.Load())
	}
}

func TestKeyReusedForAnotherRequestIsFingerprintMismatch(t *testing.T) {
	server := startPostgresIdemd(t)
	client := newClient(t, server.addr)
	ctx := testContext(t)
	key := uniqueKey("mismatch")
	var runs atomic.Int32
	if _, err := client.Idempotent(ctx, namespace, key, order{ID: key, Amount: 1}, countingWork(&runs, "one")); err != nil {
		t.Fatal(err)
	}
	_, err := client.Idempotent(ctx, namespace, key, order{ID: key, Amount: 2}, countingWork(&runs, "two"), idemd.WithFailOpen())
	if !errors.Is(err, idemd.ErrFingerprintMismatch) {
		t.Fatalf("got %v, want ErrFingerprintMismatch", err)
	}
	var idemdErr *idemd.Error
	if !errors.As(err, &idemdErr) || idemdErr.Code != codes.FailedPrecondition || idemdErr.Reason != idemd.ReasonFingerprintMismatch {
		t.Fatalf("error %#v", err)
	}
	if errors.Is(err, idemd.ErrUnavailable) || runs.Load() != 1 {
		t.Fatalf("mismatch %v is unavailable, or work ran %d times", err, runs.Load())
	}
	// A fingerprint of one's own ([]byte) is sent as it is.
	own := sha256.Sum256([]byte("mine"))
	other := sha256.Sum256([]byte("other"))
	key = uniqueKey("own-fingerprint")
	if _, err := client.Idempotent(ctx, namespace, key, own[:], countingWork(&runs, "own")); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Idempotent(ctx, namespace, key, other[:], countingWork(&runs, "other")); !errors.Is(err, idemd.ErrFingerprintMismatch) {
		t.Fatalf("own fingerprints: got %v", err)
	}
	record, err := client.Get(ctx, &pb.GetRequest{Namespace: namespace, Key: key})
	if err != nil {
		t.Fatal(err)
	}
	if hex.EncodeToString(record.GetRecord().GetFingerprint()) != hex.EncodeToString(own[:]) {
		t.Fatalf("stored fingerprint %x, want %x", record.GetRecord().GetFingerprint(), own)
	}
}

// The work's lease is taken over while it runs: the renewal notices and cancels the work's
// context with ErrLeaseLost, and the result is not stored.
func TestLeaseTakenOverCancelsTheWorkAndIsLeaseLost(t *testing.T) {
	server := startPostgresIdemd(t)
	client := newClient(t, server.addr)
	thief := newClient(t, server.addr)
	ctx := testContext(t)
	key := uniqueKey("lease-lost")
	var stolenFencing uint64
	var causeSeen error
	_, err := client.Idempotent(ctx, namespace, key, order{ID: key}, func(workCtx context.Context, lease idemd.Lease) (idemd.Result, error) {
		// Someone else gets the key: the lease is released under the work, and taken.
		if _, err := thief.Release(ctx, &pb.ReleaseRequest{Namespace: namespace, Key: key, LeaseToken: lease.Token}); err != nil {
			return idemd.Result{}, err
		}
		fp, _ := idemd.Fingerprint(order{ID: key})
		taken, err := thief.Acquire(ctx, &pb.AcquireRequest{Namespace: namespace, Key: key, Fingerprint: fp})
		if err != nil || taken.GetOutcome() != pb.Outcome_OUTCOME_ACQUIRED {
			return idemd.Result{}, fmt.Errorf("takeover: %v %v", taken, err)
		}
		stolenFencing = taken.GetLease().GetFencingToken()
		if stolenFencing <= lease.FencingToken {
			t.Errorf("takeover fencing token %d is not above %d", stolenFencing, lease.FencingToken)
		}
		select {
		case <-workCtx.Done():
			causeSeen = context.Cause(workCtx)
		case <-time.After(30 * time.Second):
			t.Error("the work's context was not cancelled within 30 s of the takeover")
		}
		return idemd.Result{Body: []byte("too late")}, nil
	}, idemd.WithLeaseTTL(300*time.Millisecond))
	if !errors.Is(causeSeen, idemd.ErrLeaseLost) {
		t.Fatalf("the work's context ended with %v, want ErrLeaseLost", causeSeen)
	}
	if !errors.Is(err, idemd.ErrLeaseLost) || errors.Is(err, idemd.ErrUnavailable) {
		t.Fatalf("got %v, want ErrLeaseLost", err)
	}
	record, err := client.Get(ctx, &pb.GetRequest{Namespace: namespace, Key: key})
	if err != nil {
		t.Fatal(err)
	}
	if record.GetRecord().GetState() != pb.RecordState_RECORD_STATE_IN_PROGRESS || record.GetRecord().GetFencingToken() != stolenFencing {
		t.Fatalf("the late result was stored: %v", record.GetRecord())
	}
}

func TestRetryableFailureReleasesAndTerminalOneIsReplayed(t *testing.T) {
	server := startPostgresIdemd(t)
	client := newClient(t, server.addr)
	ctx := testContext(t)
	key := uniqueKey("retryable")
	psp := errors.New("PSP unavailable")
	var runs atomic.Int32
	_, err := client.Idempotent(ctx, namespace, key, order{ID: key}, func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
		runs.Add(1)
		return idemd.Result{}, idemd.Retryable(psp)
	})
	var retryable *idemd.RetryableError
	if !errors.Is(err, psp) || !errors.As(err, &retryable) {
		t.Fatalf("got %v, want the work's retryable error", err)
	}
	// Released: the next call runs the work again at once (the lease was 30 s).
	outcome, err := client.Idempotent(ctx, namespace, key, order{ID: key}, countingWork(&runs, "second try"))
	if err != nil || outcome.Replayed || string(outcome.Result.Body) != "second try" || runs.Load() != 2 {
		t.Fatalf("after release: %+v %v, runs %d", outcome, err, runs.Load())
	}

	key = uniqueKey("terminal")
	declined := errors.New("card declined")
	_, err = client.Idempotent(ctx, namespace, key, order{ID: key}, func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
		return idemd.Result{}, declined
	}, idemd.WithCompleteOnError(func(err error) (idemd.Result, bool) {
		return idemd.Result{Body: []byte(err.Error()), Code: 402}, true
	}))
	if !errors.Is(err, declined) {
		t.Fatalf("got %v, want the work's error", err)
	}
	outcome, err = client.Idempotent(ctx, namespace, key, order{ID: key}, countingWork(&runs, "never"))
	if err != nil || !outcome.Replayed || outcome.Result.Code != 402 || string(outcome.Result.Body) != "card declined" {
		t.Fatalf("replay of the stored failure: %+v %v", outcome, err)
	}
}

// idemd unreachable at first (the proxy drops the first connections): Acquire is retried with
// backoff, and the work runs once when idemd answers.
func TestUnreachableIdemdIsRetriedUntilItAnswers(t *testing.T) {
	server := startPostgresIdemd(t)
	proxy := startFlakyProxy(t, server.addr, 2)
	log := newRPCLog()
	client := newClient(t, proxy.addr, idemd.WithDialOptions(log.interceptor()))
	ctx := testContext(t)
	var runs atomic.Int32
	outcome, err := client.Idempotent(ctx, namespace, uniqueKey("retry"), order{ID: "r"}, countingWork(&runs, "served"),
		idemd.WithMaxAttempts(50), idemd.WithBackoff(10*time.Millisecond, 200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if !outcome.Protected || string(outcome.Result.Body) != "served" || runs.Load() != 1 {
		t.Fatalf("%+v, runs %d", outcome, runs.Load())
	}
	if acquires := log.count("Acquire"); acquires < 2 || proxy.connections() < 3 {
		t.Fatalf("%d Acquire calls over %d connections: the outage was not retried", acquires, proxy.connections())
	}
}

func TestUnreachableIdemdFailsClosedOrOpen(t *testing.T) {
	addr := closedAddress(t)
	log := newRPCLog()
	client := newClient(t, addr, idemd.WithDialOptions(log.interceptor()))
	ctx := testContext(t)
	var runs atomic.Int32
	_, err := client.Idempotent(ctx, namespace, uniqueKey("down"), order{ID: "d"}, countingWork(&runs, "x"),
		idemd.WithBackoff(time.Millisecond, 5*time.Millisecond))
	if !errors.Is(err, idemd.ErrUnavailable) || runs.Load() != 0 {
		t.Fatalf("fail closed: got %v, work ran %d times", err, runs.Load())
	}
	if got := log.count("Acquire"); got != idemd.DefaultMaxAttempts {
		t.Fatalf("%d Acquire calls, want %d (the retry budget)", got, idemd.DefaultMaxAttempts)
	}
	outcome, err := client.Idempotent(ctx, namespace, uniqueKey("down"), order{ID: "d"}, func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
		if lease.Protected || lease.FencingToken != 0 {
			t.Errorf("unprotected work got %+v", lease)
		}
		return countingWork(&runs, "unprotected")(ctx, lease)
	}, idemd.WithFailOpen(), idemd.WithMaxAttempts(1))
	if err != nil || outcome.Protected || string(outcome.Result.Body) != "unprotected" || runs.Load() != 1 {
		t.Fatalf("fail open: %+v %v", outcome, err)
	}
	// The caller's deadline bounds the retries, however many attempts are allowed.
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	started := time.Now()
	_, err = client.Idempotent(short, namespace, uniqueKey("down"), order{ID: "d"}, countingWork(&runs, "x"),
		idemd.WithMaxAttempts(1_000_000), idemd.WithBackoff(10*time.Millisecond, 50*time.Millisecond))
	if elapsed := time.Since(started); err == nil || elapsed > 5*time.Second {
		t.Fatalf("with a 300 ms deadline: %v after %v", err, elapsed)
	}
}

// A rate-limited caller is refused by a reachable idemd: fail-open must not run its work.
func TestCallerLimitedNeverFailsOpen(t *testing.T) {
	const token = "go-client-limited-token"
	policy := filepath.Join(t.TempDir(), "auth.toml")
	digest := sha256.Sum256([]byte(token))
	// rate_per_second 0.001: one call's burst, then nothing for 1000 s.
	if err := os.WriteFile(policy, []byte(fmt.Sprintf("[[callers]]\nname = \"go-limited\"\ntoken_sha256 = [\"%x\"]\nrate_per_second = 0.001\n  [[callers.grants]]\n  namespaces = [\"go-*\"]\n  rpcs = [\"*\"]\n", digest)), 0o600); err != nil {
		t.Fatal(err)
	}
	server := startIdemd(t, "--auth-config", policy)
	client := newClient(t, server.addr, idemd.WithToken(token))
	ctx := testContext(t)
	if _, err := client.Get(ctx, &pb.GetRequest{Namespace: namespace, Key: "spend-the-burst"}); !errors.Is(err, idemd.ErrRecordNotFound) {
		t.Fatalf("first call: %v", err)
	}
	var runs atomic.Int32
	_, err := client.Idempotent(ctx, namespace, uniqueKey("limited"), order{ID: "l"}, countingWork(&runs, "x"),
		idemd.WithFailOpen(), idemd.WithBackoff(time.Millisecond, 5*time.Millisecond))
	if !errors.Is(err, idemd.ErrRateLimited) || errors.Is(err, idemd.ErrUnavailable) || errors.Is(err, idemd.ErrOverloaded) || runs.Load() != 0 {
		t.Fatalf("got %v (work ran %d times), want ErrRateLimited without fail-open", err, runs.Load())
	}
}

func TestBearerTokenIsSent(t *testing.T) {
	const token = "go-client-test-token"
	policy := filepath.Join(t.TempDir(), "auth.toml")
	digest := sha256.Sum256([]byte(token))
	if err := os.WriteFile(policy, []byte(fmt.Sprintf("[[callers]]\nname = \"go-test\"\ntoken_sha256 = [\"%x\"]\n  [[callers.grants]]\n  namespaces = [\"go-*\"]\n  rpcs = [\"*\"]\n", digest)), 0o600); err != nil {
		t.Fatal(err)
	}
	server := startIdemd(t, "--auth-config", policy)
	good := newClient(t, server.addr, idemd.WithToken(token))
	anonymous := newClient(t, server.addr)
	ctx := testContext(t)
	var runs atomic.Int32
	outcome, err := good.Idempotent(ctx, namespace, uniqueKey("auth"), order{ID: "a"}, countingWork(&runs, "ok"))
	if err != nil || string(outcome.Result.Body) != "ok" {
		t.Fatalf("with the token: %+v %v", outcome, err)
	}
	_, err = anonymous.Idempotent(ctx, namespace, uniqueKey("auth"), order{ID: "a"}, countingWork(&runs, "never"), idemd.WithFailOpen())
	if !errors.Is(err, idemd.ErrUnauthenticated) {
		t.Fatalf("without a token: %v", err)
	}
	_, err = good.Idempotent(ctx, "other", uniqueKey("auth"), order{ID: "a"}, countingWork(&runs, "never"), idemd.WithFailOpen())
	if !errors.Is(err, idemd.ErrPermissionDenied) {
		t.Fatalf("outside the grants: %v", err)
	}
	if runs.Load() != 1 {
		t.Fatalf("work ran %d times, want 1", runs.Load())
	}
}

// Cancelling the caller's context while it waits on an in-flight duplicate ends the call at once,
// as a cancellation (not as an unreachable idemd).
func TestCancelWhileWaitingEndsTheCall(t *testing.T) {
	server := startPostgresIdemd(t)
	holder := newClient(t, server.addr)
	waits := newRPCLog("Wait")
	waiter := newClient(t, server.addr, idemd.WithDialOptions(waits.interceptor()))
	ctx := testContext(t)
	key := uniqueKey("cancel")
	fp, err := idemd.Fingerprint(order{ID: key})
	if err != nil {
		t.Fatal(err)
	}
	if acquired, err := holder.Acquire(ctx, &pb.AcquireRequest{Namespace: namespace, Key: key, Fingerprint: fp}); err != nil || acquired.GetOutcome() != pb.Outcome_OUTCOME_ACQUIRED {
		t.Fatalf("acquire: %v %v", acquired, err)
	}
	callCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	var runs atomic.Int32
	go func() {
		_, err := waiter.Idempotent(callCtx, namespace, key, order{ID: key}, countingWork(&runs, "never"), idemd.WithFailOpen())
		done <- err
	}()
	waits.awaitStarted(t, "Wait")
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) || errors.Is(err, idemd.ErrUnavailable) || runs.Load() != 0 {
			t.Fatalf("got %v (work ran %d times), want context.Canceled", err, runs.Load())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the cancelled call did not end within 10 s")
	}
}
