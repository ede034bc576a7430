package idemd

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Reasons idemd puts in the google.rpc.ErrorInfo of its errors (domain "idemd"), as listed in
// proto/idempotency/v1/idempotency.proto. Branch on these (or on the sentinel errors below), never
// on message text.
const (
	ReasonInvalidRequest      = "INVALID_REQUEST"
	ReasonFingerprintMismatch = "FINGERPRINT_MISMATCH"
	ReasonLeaseNotHeld        = "LEASE_NOT_HELD"
	ReasonRecordCompleted     = "RECORD_COMPLETED"
	ReasonRecordNotFound      = "RECORD_NOT_FOUND"
	ReasonStoreUnavailable    = "STORE_UNAVAILABLE"
	ReasonDeadlineExceeded    = "DEADLINE_EXCEEDED"
	ReasonOverloaded          = "OVERLOADED"
	ReasonUnauthenticated     = "UNAUTHENTICATED"
	ReasonPermissionDenied    = "PERMISSION_DENIED"
	ReasonCallerLimited       = "CALLER_LIMITED"
	ReasonTooManyWaiters      = "TOO_MANY_WAITERS"
	ReasonStoreFull           = "STORE_FULL"
	ReasonInternal            = "INTERNAL"
)

// errorDomain is the ErrorInfo domain of every idemd error; a reason from another domain (a proxy
// in between, say) is not idemd's and is not trusted.
const errorDomain = "idemd"

// Sentinel errors, for errors.Is. Every error the client returns for an idemd answer is an *Error;
// errors.Is(err, ErrX) tells which kind (clients/BEHAVIOUR.md) it is. A call that ended because the
// caller's context did matches context.Canceled or context.DeadlineExceeded instead, and none of
// these.
var (
	// ErrUnavailable: idemd could not be reached or did not answer in time (gRPC UNAVAILABLE,
	// including STORE_UNAVAILABLE, a refused or broken connection, DEADLINE_EXCEEDED, or a CANCELLED
	// the caller's context did not cause, as a server or proxy answers when it gives up). Idempotent
	// has already retried with backoff; without WithFailOpen it fails closed with it.
	ErrUnavailable = errors.New("idemd unavailable")
	// ErrRateLimited: RESOURCE_EXHAUSTED / CALLER_LIMITED, this caller is over its own limit
	// (retried, never fail-open).
	ErrRateLimited = errors.New("idemd: caller rate limited")
	// ErrOverloaded: RESOURCE_EXHAUSTED / OVERLOADED (or no reason), idemd asks callers to back off
	// (retried, never fail-open).
	ErrOverloaded = errors.New("idemd: overloaded")
	// ErrStoreFull: RESOURCE_EXHAUSTED / STORE_FULL, new keys are refused until records expire (not
	// retried, never fail-open).
	ErrStoreFull = errors.New("idemd: store full")
	// ErrUnauthenticated: the bearer token is missing or wrong.
	ErrUnauthenticated = errors.New("idemd: unauthenticated")
	// ErrPermissionDenied: the caller's grants do not cover this RPC or namespace.
	ErrPermissionDenied = errors.New("idemd: permission denied")
	// ErrInvalidRequest: a field broke a rule; Error.FieldViolations says which.
	ErrInvalidRequest = errors.New("idemd: invalid request")
	// ErrFingerprintMismatch: the key was used before with a different request.
	ErrFingerprintMismatch = errors.New("idemd: key reused with a different request (fingerprint mismatch)")
	// ErrInternal: INTERNAL, a bug or an unexpected database answer in idemd.
	ErrInternal = errors.New("idemd: internal error")
	// ErrLeaseNotHeld: the lease token is not the key's current lease (taken over or released).
	ErrLeaseNotHeld = errors.New("idemd: lease not held")
	// ErrRecordCompleted: Release or Renew on a record that is already completed.
	ErrRecordCompleted = errors.New("idemd: record completed")
	// ErrRecordNotFound: the key has no live record.
	ErrRecordNotFound = errors.New("idemd: record not found")
	// ErrInProgress: another caller still held the key after WithMaxWaits rounds of Wait.
	ErrInProgress = errors.New("idemd: key still in progress")
	// ErrLeaseLost: the lease was taken over (or the record vanished or was completed) while the
	// work ran: the work did run, its result was not stored, and another caller may run it too. The
	// work's context is cancelled with this cause as soon as a renewal finds out.
	ErrLeaseLost = errors.New("idemd: lease lost")
)

// Error is an error answer of idemd (or of the channel to it).
type Error struct {
	// Code is the gRPC status code.
	Code codes.Code
	// Reason is the ErrorInfo reason when idemd sent one (e.g. ReasonFingerprintMismatch), else the
	// gRPC code's name (e.g. "UNAVAILABLE" for a refused connection).
	Reason string
	// Message is the status message.
	Message string
	// FieldViolations lists the broken rules of an INVALID_REQUEST (field, description).
	FieldViolations []FieldViolation
	// RetryAfter is, for ErrInProgress, idemd's retry_after of the last Acquire: the time left on
	// the other caller's lease (0 when idemd gave none).
	RetryAfter time.Duration
	// kind is the helper-level sentinel (ErrLeaseLost, ErrInProgress, ErrFingerprintMismatch) this
	// error stands for, if any.
	kind error
	// cause is what led to it: the gRPC status error, or the caller's context error.
	cause error
	// callerEnded: the caller's own context ended the call, so it says nothing about idemd.
	callerEnded bool
}

// FieldViolation is one entry of the google.rpc.BadRequest detail of an INVALID_REQUEST.
type FieldViolation struct {
	Field       string
	Description string
}

func (e *Error) Error() string {
	prefix := "idemd"
	if e.kind != nil {
		prefix = e.kind.Error()
	}
	return fmt.Sprintf("%s: %s (%s): %s", prefix, e.Code, e.Reason, e.Message)
}

// Unwrap gives the underlying gRPC status error or context error.
func (e *Error) Unwrap() error { return e.cause }

// Is matches the sentinel errors by code and reason.
func (e *Error) Is(target error) bool {
	if e.kind != nil && target == e.kind {
		return true
	}
	if e.callerEnded {
		return false
	}
	switch target {
	case ErrUnavailable:
		return unavailableCode(e.Code)
	case ErrRateLimited:
		return e.Code == codes.ResourceExhausted && e.Reason == ReasonCallerLimited
	case ErrStoreFull:
		return e.Code == codes.ResourceExhausted && e.Reason == ReasonStoreFull
	case ErrOverloaded:
		return e.Code == codes.ResourceExhausted && e.Reason != ReasonCallerLimited && e.Reason != ReasonStoreFull && e.Reason != ReasonTooManyWaiters
	case ErrUnauthenticated:
		return e.Code == codes.Unauthenticated
	case ErrPermissionDenied:
		return e.Code == codes.PermissionDenied
	case ErrInvalidRequest:
		return e.Code == codes.InvalidArgument
	case ErrInternal:
		return e.Code == codes.Internal
	case ErrFingerprintMismatch:
		return e.Reason == ReasonFingerprintMismatch
	case ErrLeaseNotHeld:
		return e.Reason == ReasonLeaseNotHeld
	case ErrRecordCompleted:
		return e.Reason == ReasonRecordCompleted
	case ErrRecordNotFound:
		return e.Reason == ReasonRecordNotFound
	}
	return false
}

// codeName is the canonical name of a gRPC code, e.g. "DEADLINE_EXCEEDED" (codes.Code's String
// gives "DeadlineExceeded").
func codeName(code codes.Code) string {
	var name strings.Builder
	previous := ' '
	for _, r := range code.String() {
		if unicode.IsUpper(r) && unicode.IsLower(previous) {
			name.WriteByte('_')
		}
		name.WriteRune(unicode.ToUpper(r))
		previous = r
	}
	return name.String()
}

// unavailableCode is whether a code means idemd is unreachable or did not answer in time. A
// CANCELLED counts when the caller's context did not cause it (Is checks callerEnded first): a
// tonic server answers it when the call's grpc-timeout passes on its side first, a proxy when it
// gives up (clients/BEHAVIOUR.md, case acquire_cancelled_by_the_server_fails_open).
func unavailableCode(code codes.Code) bool {
	return code == codes.Unavailable || code == codes.DeadlineExceeded || code == codes.Canceled
}

// fromRPC turns an error of a gRPC call into an *Error. When the caller's own context ended, the
// context's error is kept as the cause, so errors.Is(err, context.Canceled) works.
func fromRPC(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	var already *Error
	if errors.As(err, &already) {
		return err
	}
	st, ok := status.FromError(err)
	if !ok {
		if ctxErr := ctx.Err(); ctxErr != nil {
			code := status.FromContextError(ctxErr).Code()
			return &Error{Code: code, Reason: codeName(code), Message: err.Error(), cause: ctxErr, callerEnded: true}
		}
		return &Error{Code: codes.Unknown, Reason: codeName(codes.Unknown), Message: err.Error(), cause: err}
	}
	out := &Error{Code: st.Code(), Reason: codeName(st.Code()), Message: st.Message(), cause: err}
	if ctxErr := ctx.Err(); ctxErr != nil && (st.Code() == codes.Canceled || st.Code() == codes.DeadlineExceeded) {
		out.cause, out.callerEnded = ctxErr, true
	}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			if d.GetDomain() == errorDomain && d.GetReason() != "" {
				out.Reason = d.GetReason()
			}
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				out.FieldViolations = append(out.FieldViolations, FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
		}
	}
	return out
}

// isUnavailable is whether err means idemd is unreachable (the only case fail-open applies to).
func isUnavailable(err error) bool {
	return errors.Is(err, ErrUnavailable)
}

// isRetried is whether Acquire and Complete try again after err (clients/BEHAVIOUR.md, "Retries").
func isRetried(err error) bool {
	return isUnavailable(err) || errors.Is(err, ErrRateLimited) || errors.Is(err, ErrOverloaded)
}

// RetryableError marks a failure of the work as retryable: Idempotent releases the key (instead of
// storing an error result), so the next call runs the work again. Wrap with Retryable.
type RetryableError struct{ Err error }

func (e *RetryableError) Error() string { return "retryable: " + e.Err.Error() }

// Unwrap gives the wrapped error.
func (e *RetryableError) Unwrap() error { return e.Err }

// Retryable wraps err so that Idempotent releases the key and returns it (a retry runs the work
// again). errors.As(err, new(*RetryableError)) finds it; errors.Is sees through it.
func Retryable(err error) error {
	if err == nil {
		return nil
	}
	return &RetryableError{Err: err}
}
