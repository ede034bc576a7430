package idemd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strings"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/idemd/idemd/clients/go/idempotencyv1"
)

// Result is what the work produced and idemd stores and replays: a body, a status code of the
// caller's choosing (an HTTP status, say) and string metadata ("content-type", …).
type Result struct {
	Body     []byte
	Code     int32
	Metadata map[string]string
}

// Lease is what the work gets to know about its lease.
type Lease struct {
	Namespace string
	Key       string
	// Token is the secret lease token ("" when the work runs unprotected).
	Token string
	// FencingToken is strictly greater than every fencing token issued before for the key: pass it
	// to downstream systems so they can refuse writes of a caller whose lease was taken over. 0 when
	// the work runs unprotected.
	FencingToken uint64
	// Protected is false only when idemd was unreachable and WithFailOpen ran the work anyway.
	Protected bool
}

// WorkFunc does the work of a key. ctx is cancelled, with context.Cause an error matching
// ErrLeaseLost, if a renewal finds that the lease was taken over; and when the caller's context is.
// Return Retryable(err) for a failure that a retry should run again.
type WorkFunc func(ctx context.Context, lease Lease) (Result, error)

// Outcome is what Idempotent returns on success.
type Outcome struct {
	// Result is the stored result (or, unprotected, the one the work produced).
	Result Result
	// Replayed is true when an earlier call stored the result and the work did not run.
	Replayed bool
	// Protected is false only when WithFailOpen ran the work without idemd.
	Protected bool
	// FencingToken is the fencing token of the lease that stored the result (0 unprotected).
	FencingToken uint64
}

// CallOption configures one Idempotent call.
type CallOption func(*callConfig)

type callConfig struct {
	leaseTTL        time.Duration
	retention       time.Duration
	holder          string
	waitTimeout     time.Duration
	maxWaits        int
	retryable       func(error) bool
	completeOnError func(error) (Result, bool)
	failOpen        bool
	acquireTimeout  time.Duration
	maxAttempts     int
	backoffInitial  time.Duration
	backoffMax      time.Duration
}

// Defaults of the CallOptions.
const (
	DefaultLeaseTTL    = 30 * time.Second
	DefaultWaitTimeout = 30 * time.Second
	DefaultMaxWaits    = 10
	// DefaultMaxAttempts is how many calls of Acquire (or of Complete) one Idempotent makes at
	// most when idemd is unreachable, rate limited or overloaded: the first and three retries.
	DefaultMaxAttempts    = 4
	DefaultBackoffInitial = 100 * time.Millisecond
	DefaultBackoffMax     = 2 * time.Second
)

// WithLeaseTTL sets the lease length asked for at Acquire and at each renewal (default 30 s). The
// lease is renewed every ttl/3 while the work runs.
func WithLeaseTTL(ttl time.Duration) CallOption {
	return func(c *callConfig) { c.leaseTTL = ttl }
}

// WithRetention sets how long idemd keeps the completed record (default: the server's, 24 h
// unless configured).
func WithRetention(retention time.Duration) CallOption {
	return func(c *callConfig) { c.retention = retention }
}

// WithHolder sets the name shown in Record.holder (default "hostname:pid").
func WithHolder(holder string) CallOption {
	return func(c *callConfig) { c.holder = holder }
}

// WithWaitTimeout bounds each Wait on an in-flight duplicate (each lasts min(retry_after, this);
// default 30 s).
func WithWaitTimeout(timeout time.Duration) CallOption {
	return func(c *callConfig) { c.waitTimeout = timeout }
}

// WithMaxWaits sets how many rounds of Wait on an in-flight duplicate Idempotent does before it
// returns ErrInProgress (default 10).
func WithMaxWaits(rounds int) CallOption {
	return func(c *callConfig) { c.maxWaits = rounds }
}

// WithRetryable marks more failures of the work as retryable (the key is released so a retry
// runs the work again); a Retryable(err) always is.
func WithRetryable(retryable func(error) bool) CallOption {
	return func(c *callConfig) { c.retryable = retryable }
}

// WithCompleteOnError stores a result for a non-retryable failure of the work (when it returns
// ok), so that retries replay it instead of running the work again; Idempotent still returns the
// work's error. Without it (or when it returns false) the key is released.
func WithCompleteOnError(result func(error) (Result, bool)) CallOption {
	return func(c *callConfig) { c.completeOnError = result }
}

// WithFailOpen runs the work unprotected (Lease.Protected false) when idemd stays unreachable
// after the retries, instead of failing with ErrUnavailable. It never applies to an answer of a
// reachable idemd (RESOURCE_EXHAUSTED, FAILED_PRECONDITION, …).
func WithFailOpen() CallOption {
	return func(c *callConfig) { c.failOpen = true }
}

// WithAcquireTimeout bounds each Acquire with its retries: when idemd has not answered within
// timeout, Idempotent ends the Acquire with an error matching ErrUnavailable (so WithFailOpen
// applies), while the caller's context is still live. The work and the Complete are not bounded by
// it. Default: no bound but ctx's and the retry budget's. An HTTP middleware uses it to answer
// "unavailable" in time without putting a deadline on its handler.
func WithAcquireTimeout(timeout time.Duration) CallOption {
	return func(c *callConfig) { c.acquireTimeout = timeout }
}

// WithMaxAttempts sets how many calls of Acquire, and of Complete, Idempotent makes at most when
// idemd is unreachable, rate limited or overloaded (default 4: the first and three retries). The
// context's deadline stops the retries sooner: a retry that could not start before it is not made.
func WithMaxAttempts(attempts int) CallOption {
	return func(c *callConfig) { c.maxAttempts = attempts }
}

// WithBackoff sets the pauses between those retries: before retry n a random time in
// [0, min(longest, initial·2^(n-1))] ("full jitter"; default 100 ms and 2 s).
func WithBackoff(initial, longest time.Duration) CallOption {
	return func(c *callConfig) { c.backoffInitial, c.backoffMax = initial, longest }
}

func newCallConfig(options []CallOption) (callConfig, error) {
	config := callConfig{
		leaseTTL:       DefaultLeaseTTL,
		holder:         defaultHolder(),
		waitTimeout:    DefaultWaitTimeout,
		maxWaits:       DefaultMaxWaits,
		maxAttempts:    DefaultMaxAttempts,
		backoffInitial: DefaultBackoffInitial,
		backoffMax:     DefaultBackoffMax,
	}
	for _, option := range options {
		option(&config)
	}
	switch {
	case config.leaseTTL <= 0:
		return config, fmt.Errorf("idemd: lease TTL must be positive, got %v", config.leaseTTL)
	case config.waitTimeout <= 0:
		return config, fmt.Errorf("idemd: wait timeout must be positive, got %v", config.waitTimeout)
	case config.maxWaits < 0:
		return config, fmt.Errorf("idemd: max waits must not be negative, got %d", config.maxWaits)
	case config.acquireTimeout < 0:
		return config, fmt.Errorf("idemd: acquire timeout must not be negative, got %v", config.acquireTimeout)
	case config.maxAttempts < 1:
		return config, fmt.Errorf("idemd: max attempts must be at least 1, got %d", config.maxAttempts)
	case config.backoffInitial <= 0 || config.backoffMax < config.backoffInitial:
		return config, fmt.Errorf("idemd: backoff needs 0 < initial <= longest, got %v and %v", config.backoffInitial, config.backoffMax)
	}
	return config, nil
}

// defaultHolder is "hostname:pid", without control characters and cut to the 128 bytes idemd takes.
func defaultHolder() string {
	host, err := os.Hostname()
	if err != nil {
		host = "unknown"
	}
	holder := strings.Map(func(r rune) rune {
		if r < 0x20 || (r >= 0x7f && r <= 0x9f) {
			return -1
		}
		return r
	}, fmt.Sprintf("%s:%d", host, os.Getpid()))
	for len(holder) > 128 {
		_, size := utf8.DecodeLastRuneInString(holder)
		holder = holder[:len(holder)-size]
	}
	return holder
}

// fingerprintOf: nil sends no fingerprint, a []byte is the fingerprint itself, anything else is
// fingerprinted with Fingerprint.
func fingerprintOf(request any) ([]byte, error) {
	switch value := request.(type) {
	case nil:
		return nil, nil
	case []byte:
		return value, nil
	default:
		return Fingerprint(value)
	}
}

// Idempotent runs work at most once per (namespace, key) and returns its stored result, as
// clients/BEHAVIOUR.md says every idemd client does:
//
//   - Acquire answers ACQUIRED: work runs while the lease is renewed every lease TTL/3 in the
//     background, then its result is Completed. A failure of work releases the key when it is
//     retryable (Retryable, or WithRetryable), else stores WithCompleteOnError's result, or
//     releases; the work's own error is returned either way.
//   - IN_PROGRESS (another caller is at it): Wait, then replay its result, or Acquire again if the
//     key came free; after WithMaxWaits rounds, ErrInProgress.
//   - COMPLETED: the stored result, Replayed, without running work.
//   - idemd unreachable (ErrUnavailable), rate limited (ErrRateLimited) or overloaded
//     (ErrOverloaded): Acquire and Complete are retried with exponential backoff and full jitter,
//     WithMaxAttempts calls at most and never past ctx's deadline. Then the error is returned; only
//     for an unreachable idemd at Acquire does WithFailOpen run the work unprotected instead.
//   - ctx cancelled or past its deadline: no retry, no fail-open; the error matches ctx.Err(), and a
//     held lease is released (or, if the work already produced its result, Completed once).
//
// request is fingerprinted (Fingerprint) so that a key reused for another request fails with
// ErrFingerprintMismatch; a []byte is used as the fingerprint itself, nil sends none.
func (c *Client) Idempotent(ctx context.Context, namespace, key string, request any, work WorkFunc, options ...CallOption) (Outcome, error) {
	config, err := newCallConfig(options)
	if err != nil {
		return Outcome{}, err
	}
	fingerprint, err := fingerprintOf(request)
	if err != nil {
		return Outcome{}, err
	}
	acquire := &pb.AcquireRequest{
		Namespace:   namespace,
		Key:         key,
		Fingerprint: fingerprint,
		LeaseTtl:    durationOrNil(config.leaseTTL),
		Retention:   durationOrNil(config.retention),
		Holder:      config.holder,
	}
	for waits := 0; ; {
		response, err := c.acquireWithRetries(ctx, acquire, config)
		if err != nil {
			if isUnavailable(err) && config.failOpen && ctx.Err() == nil {
				return runUnprotected(ctx, namespace, key, work)
			}
			return Outcome{}, err
		}
		switch response.GetOutcome() {
		case pb.Outcome_OUTCOME_ACQUIRED:
			return c.runLeased(ctx, namespace, key, response.GetLease(), work, config)
		case pb.Outcome_OUTCOME_COMPLETED:
			return replayed(response.GetRecord()), nil
		case pb.Outcome_OUTCOME_IN_PROGRESS:
			if waits >= config.maxWaits {
				return Outcome{}, &Error{
					Code:       codes.Aborted,
					Reason:     "IN_PROGRESS",
					Message:    fmt.Sprintf("%s/%s is still in progress after %d waits", namespace, key, config.maxWaits),
					RetryAfter: response.GetRetryAfter().AsDuration(),
					kind:       ErrInProgress,
				}
			}
			waits++
			timeout := config.waitTimeout
			if after := response.GetRetryAfter(); after != nil {
				timeout = min(timeout, max(after.AsDuration(), time.Millisecond))
			}
			waited, err := c.Wait(ctx, &pb.WaitRequest{Namespace: namespace, Key: key, Timeout: durationpb.New(timeout)})
			switch {
			case err == nil:
				if waited.GetOutcome() == pb.WaitOutcome_WAIT_OUTCOME_COMPLETED {
					record := waited.GetRecord()
					// Acquire would have refused a different request; a Wait does not compare.
					if !bytes.Equal(record.GetFingerprint(), fingerprint) {
						return Outcome{}, &Error{
							Code:    codes.FailedPrecondition,
							Reason:  ReasonFingerprintMismatch,
							Message: fmt.Sprintf("%s/%s was completed for a different request", namespace, key),
							kind:    ErrFingerprintMismatch,
						}
					}
					return replayed(record), nil
				}
				// FREE or TIMED_OUT: Acquire again.
			case ctx.Err() != nil:
				return Outcome{}, err
			case errorCode(err) == codes.DeadlineExceeded:
				// The same as TIMED_OUT, whichever side's deadline it was.
			case isUnavailable(err) || (errorCode(err) == codes.ResourceExhausted && errorReason(err) == ReasonTooManyWaiters):
				// Back off, then Acquire again (it carries the retries).
				if !sleep(ctx, fullJitter(min(config.waitTimeout, time.Second))) {
					return Outcome{}, callerEnded(ctx)
				}
			default:
				return Outcome{}, err
			}
		default:
			return Outcome{}, &Error{Code: codes.Internal, Reason: "UNEXPECTED_OUTCOME", Message: fmt.Sprintf("unexpected Acquire outcome %v", response.GetOutcome())}
		}
	}
}

// acquireWithRetries is Acquire with the retries of withRetries, bounded by WithAcquireTimeout when
// set. An Acquire that the bound ended (not the caller's ctx) is idemd not answering in time: an
// unavailable idemd, for which fail-open is meant.
func (c *Client) acquireWithRetries(ctx context.Context, acquire *pb.AcquireRequest, config callConfig) (*pb.AcquireResponse, error) {
	if config.acquireTimeout <= 0 {
		return withRetries(ctx, config, func() (*pb.AcquireResponse, error) { return c.Acquire(ctx, acquire) })
	}
	bounded, cancel := context.WithTimeout(ctx, config.acquireTimeout)
	defer cancel()
	response, err := withRetries(bounded, config, func() (*pb.AcquireResponse, error) { return c.Acquire(bounded, acquire) })
	if err != nil && ctx.Err() == nil && bounded.Err() != nil {
		return nil, &Error{
			Code:   codes.DeadlineExceeded,
			Reason: codeName(codes.DeadlineExceeded),
			// No cause: the bound is not the caller's context, and errors.Is(err,
			// context.DeadlineExceeded) must keep meaning that the caller's ended.
			Message: fmt.Sprintf("no answer to Acquire within the acquire timeout (%v): %v", config.acquireTimeout, err),
		}
	}
	return response, err
}

// runUnprotected is fail-open: the work runs without idemd, with fencing token 0.
func runUnprotected(ctx context.Context, namespace, key string, work WorkFunc) (Outcome, error) {
	result, err := work(ctx, Lease{Namespace: namespace, Key: key})
	if err != nil {
		return Outcome{}, err
	}
	return Outcome{Result: result, Protected: false}, nil
}

// runLeased runs the work under an acquired lease, renewing it, then stores or releases.
func (c *Client) runLeased(ctx context.Context, namespace, key string, lease *pb.Lease, work WorkFunc, config callConfig) (Outcome, error) {
	token := lease.GetToken()
	workCtx, cancelWork := context.WithCancelCause(ctx)
	defer cancelWork(nil)
	stopRenewing := c.renewInBackground(workCtx, cancelWork, namespace, key, token, config.leaseTTL)

	var result Result
	var workErr error
	func() {
		// A panicking work gives its key back before the panic goes on: a retry may run it again
		// at once instead of after the lease expires.
		defer func() {
			if recovered := recover(); recovered != nil {
				stopRenewing()
				c.releaseDetached(ctx, namespace, key, token)
				panic(recovered)
			}
		}()
		result, workErr = work(workCtx, Lease{Namespace: namespace, Key: key, Token: token, FencingToken: lease.GetFencingToken(), Protected: true})
	}()
	stopRenewing()

	if workErr != nil {
		var retryable *RetryableError
		isRetryable := errors.As(workErr, &retryable) || (config.retryable != nil && config.retryable(workErr))
		if !isRetryable && config.completeOnError != nil {
			if stored, ok := config.completeOnError(workErr); ok {
				if _, err := c.complete(ctx, completeRequest(namespace, key, token, stored), config); err == nil {
					return Outcome{}, workErr
				}
				// Could not store the error's result: release instead, so a retry is not stuck.
			}
		}
		c.releaseDetached(ctx, namespace, key, token)
		// A work that gave up because its lease was lost (its context said so) failed for that
		// reason: the caller must learn it, whatever the work returned.
		if cause := context.Cause(workCtx); errors.Is(cause, ErrLeaseLost) && !errors.Is(workErr, ErrLeaseLost) {
			return Outcome{}, fmt.Errorf("%w: %w", workErr, cause)
		}
		return Outcome{}, workErr
	}

	completed, err := c.complete(ctx, completeRequest(namespace, key, token, result), config)
	if err != nil {
		if errors.Is(err, ErrLeaseNotHeld) || errors.Is(err, ErrRecordNotFound) || errors.Is(err, ErrRecordCompleted) {
			lost := leaseLost(namespace, key, err)
			lost.Message = "the work ran but its result was not stored: " + lost.Message
			return Outcome{}, lost
		}
		return Outcome{}, err
	}
	record := completed.GetRecord()
	return Outcome{Result: resultFromPB(record.GetResult()), Protected: true, FencingToken: record.GetFencingToken()}, nil
}

// renewInBackground renews the lease every ttl/3 until the returned stop function is called. A
// renewal that finds the lease gone cancels the work's context with an ErrLeaseLost cause; any
// other failure (an unreachable or busy idemd) is tried again at the next tick, while the lease
// may still be valid. stop cancels a renewal in flight (a hung idemd must not hold up the
// Complete for a whole RPC timeout) and waits until the goroutine has ended, so none outlives the
// call.
func (c *Client) renewInBackground(workCtx context.Context, cancelWork context.CancelCauseFunc, namespace, key, token string, ttl time.Duration) (stop func()) {
	renewCtx, cancelRenewing := context.WithCancel(workCtx)
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		ticker := time.NewTicker(max(ttl/3, time.Millisecond))
		defer ticker.Stop()
		for {
			select {
			case <-renewCtx.Done():
				return
			case <-ticker.C:
			}
			_, err := c.Renew(renewCtx, &pb.RenewRequest{Namespace: namespace, Key: key, LeaseToken: token, LeaseTtl: durationpb.New(ttl)})
			if errors.Is(err, ErrLeaseNotHeld) || errors.Is(err, ErrRecordNotFound) || errors.Is(err, ErrRecordCompleted) {
				cancelWork(leaseLost(namespace, key, err))
				return
			}
		}
	}()
	return func() {
		cancelRenewing()
		<-stopped
	}
}

// leaseLost is an *Error that matches ErrLeaseLost, with the code and reason idemd gave.
func leaseLost(namespace, key string, err error) *Error {
	lost := &Error{Code: codes.FailedPrecondition, Reason: ReasonLeaseNotHeld, Message: err.Error(), kind: ErrLeaseLost, cause: err}
	if idemdErr, ok := errorsAs[*Error](err); ok {
		lost.Code, lost.Reason, lost.Message = idemdErr.Code, idemdErr.Reason, fmt.Sprintf("lease on %s/%s lost: %s", namespace, key, idemdErr.Message)
	}
	return lost
}

// complete Completes with retries: Complete is safe to repeat with the same lease token (a repeat
// returns the first stored record). When ctx already ended, it makes one attempt of its own and no
// retry: the work is done, and a stored result spares every retry from redoing it.
func (c *Client) complete(ctx context.Context, request *pb.CompleteRequest, config callConfig) (*pb.CompleteResponse, error) {
	if ctx.Err() != nil {
		return c.Complete(context.WithoutCancel(ctx), request)
	}
	return withRetries(ctx, config, func() (*pb.CompleteResponse, error) { return c.Complete(ctx, request) })
}

// releaseDetached gives the key back, once and best effort, even when ctx was cancelled (that is
// often why the work failed): the lease would expire anyway, this only lets a retry in sooner.
func (c *Client) releaseDetached(ctx context.Context, namespace, key, token string) {
	_, _ = c.Release(context.WithoutCancel(ctx), &pb.ReleaseRequest{Namespace: namespace, Key: key, LeaseToken: token})
}

// withRetries makes up to config.maxAttempts calls while they fail with an error worth retrying,
// sleeping a fully jittered exponential backoff before each retry. It stops early when ctx ends,
// or when the next retry could not start before ctx's deadline.
func withRetries[T any](ctx context.Context, config callConfig, rpc func() (T, error)) (T, error) {
	ceiling := config.backoffInitial
	for attempt := 1; ; attempt++ {
		response, err := rpc()
		if err == nil || !isRetried(err) || attempt >= config.maxAttempts || ctx.Err() != nil {
			return response, err
		}
		pause := fullJitter(ceiling)
		ceiling = min(ceiling*2, config.backoffMax)
		if deadline, ok := ctx.Deadline(); ok && time.Now().Add(pause).After(deadline) {
			return response, err
		}
		if !sleep(ctx, pause) {
			var zero T
			return zero, callerEnded(ctx)
		}
	}
}

// fullJitter is a random pause in [0, ceiling]: retries of a fleet of callers spread out, so a
// recovering idemd is not hit by all of them at once.
func fullJitter(ceiling time.Duration) time.Duration {
	return rand.N(ceiling + 1)
}

// callerEnded is the error of a call that ended because ctx did.
func callerEnded(ctx context.Context) error {
	cause := context.Cause(ctx)
	code := status.FromContextError(ctx.Err()).Code()
	return &Error{Code: code, Reason: codeName(code), Message: cause.Error(), cause: cause, callerEnded: true}
}

func completeRequest(namespace, key, token string, result Result) *pb.CompleteRequest {
	return &pb.CompleteRequest{
		Namespace:  namespace,
		Key:        key,
		LeaseToken: token,
		Result:     &pb.Result{Body: result.Body, Code: result.Code, Metadata: result.Metadata},
	}
}

func replayed(record *pb.Record) Outcome {
	return Outcome{Result: resultFromPB(record.GetResult()), Replayed: true, Protected: true, FencingToken: record.GetFencingToken()}
}

func resultFromPB(result *pb.Result) Result {
	metadata := make(map[string]string, len(result.GetMetadata()))
	for name, value := range result.GetMetadata() {
		metadata[name] = value
	}
	return Result{Body: result.GetBody(), Code: result.GetCode(), Metadata: metadata}
}

// errorCode is the gRPC code of an *Error (codes.Unknown for anything else).
func errorCode(err error) codes.Code {
	if idemdErr, ok := errorsAs[*Error](err); ok {
		return idemdErr.Code
	}
	return codes.Unknown
}

// errorReason is the reason of an *Error ("" for anything else).
func errorReason(err error) string {
	if idemdErr, ok := errorsAs[*Error](err); ok {
		return idemdErr.Reason
	}
	return ""
}

// sleep pauses for d or until ctx is done; false when ctx ended it.
func sleep(ctx context.Context, d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-ctx.Done():
		return false
	}
}
