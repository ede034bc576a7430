package idemd

import (
	"context"
	"errors"
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func idemdStatus(t *testing.T, code codes.Code, reason string) error {
	t.Helper()
	st, err := status.New(code, "message").WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: "idemd"})
	if err != nil {
		t.Fatal(err)
	}
	return st.Err()
}

// Each answer of clients/BEHAVIOUR.md's error table matches its kind's sentinel and no other, and
// only the retried kinds are retried.
func TestErrorKindsFollowTheBehaviourTable(t *testing.T) {
	sentinels := []error{ErrUnavailable, ErrRateLimited, ErrOverloaded, ErrStoreFull, ErrUnauthenticated,
		ErrPermissionDenied, ErrInvalidRequest, ErrFingerprintMismatch, ErrInternal, ErrLeaseNotHeld,
		ErrRecordNotFound, ErrRecordCompleted}
	cases := []struct {
		code    codes.Code
		reason  string
		want    error
		retried bool
	}{
		{codes.Unavailable, ReasonStoreUnavailable, ErrUnavailable, true},
		{codes.Unavailable, "", ErrUnavailable, true},
		{codes.DeadlineExceeded, ReasonDeadlineExceeded, ErrUnavailable, true},
		{codes.ResourceExhausted, ReasonCallerLimited, ErrRateLimited, true},
		{codes.ResourceExhausted, ReasonOverloaded, ErrOverloaded, true},
		{codes.ResourceExhausted, "", ErrOverloaded, true},
		{codes.ResourceExhausted, ReasonStoreFull, ErrStoreFull, false},
		{codes.Unauthenticated, ReasonUnauthenticated, ErrUnauthenticated, false},
		{codes.PermissionDenied, ReasonPermissionDenied, ErrPermissionDenied, false},
		{codes.InvalidArgument, ReasonInvalidRequest, ErrInvalidRequest, false},
		{codes.FailedPrecondition, ReasonFingerprintMismatch, ErrFingerprintMismatch, false},
		{codes.Internal, ReasonInternal, ErrInternal, false},
		{codes.FailedPrecondition, ReasonLeaseNotHeld, ErrLeaseNotHeld, false},
		{codes.NotFound, ReasonRecordNotFound, ErrRecordNotFound, false},
		{codes.FailedPrecondition, ReasonRecordCompleted, ErrRecordCompleted, false},
		{codes.Unimplemented, "", nil, false},
	}
	for _, c := range cases {
		err := fromRPC(context.Background(), idemdStatus(t, c.code, c.reason))
		for _, sentinel := range sentinels {
			if got := errors.Is(err, sentinel); got != (sentinel == c.want) {
				t.Errorf("%v/%q: errors.Is(%v) = %v", c.code, c.reason, sentinel, got)
			}
		}
		if isRetried(err) != c.retried {
			t.Errorf("%v/%q: retried = %v, want %v", c.code, c.reason, isRetried(err), c.retried)
		}
		var idemdErr *Error
		if !errors.As(err, &idemdErr) || idemdErr.Code != c.code {
			t.Errorf("%v/%q: %#v", c.code, c.reason, err)
		}
	}
}

// A reason from another ErrorInfo domain (a proxy in between) is not idemd's.
func TestReasonsOfOtherDomainsAreIgnored(t *testing.T) {
	st, err := status.New(codes.FailedPrecondition, "m").WithDetails(&errdetails.ErrorInfo{Reason: ReasonFingerprintMismatch, Domain: "proxy"})
	if err != nil {
		t.Fatal(err)
	}
	mapped := fromRPC(context.Background(), st.Err())
	if errors.Is(mapped, ErrFingerprintMismatch) {
		t.Fatal("a foreign reason was taken for idemd's")
	}
	var idemdErr *Error
	if !errors.As(mapped, &idemdErr) || idemdErr.Reason != "FAILED_PRECONDITION" {
		t.Fatalf("%#v", mapped)
	}
}

// When the caller's context ended the call, the error is the caller's, not idemd's unavailability.
func TestCallerCancellationIsNotUnavailability(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := fromRPC(ctx, status.Error(codes.Canceled, "context canceled"))
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrUnavailable) {
		t.Fatalf("%v", err)
	}
	// The same code from a server that gave up, with the caller's context still live: unreachable.
	if err := fromRPC(context.Background(), status.Error(codes.Canceled, "Timeout expired")); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("a CANCELLED the caller did not cause: %v", err)
	}
	if codeName(codes.DeadlineExceeded) != "DEADLINE_EXCEEDED" || codeName(codes.OK) != "OK" {
		t.Fatalf("code names: %s %s", codeName(codes.DeadlineExceeded), codeName(codes.OK))
	}
}
