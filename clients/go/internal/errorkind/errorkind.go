// Package errorkind names an error of the Go client by its kind in clients/BEHAVIOUR.md ("The
// errors by language"), for the programs the Rust suite runs: the behaviour runner and the
// cross-language worker.
package errorkind

import (
	"context"
	"errors"

	idemd "github.com/idemd/idemd/clients/go"
)

// Of is BEHAVIOUR.md's name for an error of Idempotent that is not the work's own.
func Of(err error) string {
	kinds := []struct {
		sentinel error
		name     string
	}{
		{idemd.ErrLeaseLost, "lease_lost"},
		{idemd.ErrInProgress, "in_progress"},
		{idemd.ErrFingerprintMismatch, "fingerprint_mismatch"},
		{idemd.ErrUnavailable, "unavailable"},
		{idemd.ErrRateLimited, "rate_limited"},
		{idemd.ErrOverloaded, "overloaded"},
		{idemd.ErrStoreFull, "store_full"},
		{idemd.ErrUnauthenticated, "unauthenticated"},
		{idemd.ErrPermissionDenied, "permission_denied"},
		{idemd.ErrInvalidRequest, "invalid_request"},
		{idemd.ErrInternal, "internal"},
		{context.Canceled, "cancelled"},
	}
	for _, k := range kinds {
		if errors.Is(err, k.sentinel) {
			return k.name
		}
	}
	var idemdErr *idemd.Error
	if errors.As(err, &idemdErr) {
		return "rpc_error"
	}
	return "unmapped: " + err.Error()
}
