// Command tracedcall is driven by tests/suite/tracing_otlp.rs to show that the Go client carries
// the caller's trace context: it runs Idempotent once on KEY in namespace "traced", under a
// context whose (remote, sampled) span has the trace id TRACE_ID and the span id PARENT_SPAN_ID,
// and prints "ok". idemd's spans of the Acquire and the Complete must be children of that span.
package main

import (
	"context"
	"fmt"
	"os"

	"go.opentelemetry.io/otel/trace"

	idemd "github.com/idemd/idemd/clients/go"
)

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: tracedcall ADDRESS TRACE_ID PARENT_SPAN_ID KEY")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2], os.Args[3], os.Args[4]); err != nil {
		fmt.Fprintln(os.Stderr, "tracedcall:", err)
		os.Exit(1)
	}
	fmt.Println("ok")
}

func run(address, traceID, spanID, key string) error {
	tid, err := trace.TraceIDFromHex(traceID)
	if err != nil {
		return fmt.Errorf("trace id: %w", err)
	}
	sid, err := trace.SpanIDFromHex(spanID)
	if err != nil {
		return fmt.Errorf("span id: %w", err)
	}
	caller := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID:    tid,
		SpanID:     sid,
		TraceFlags: trace.FlagsSampled,
		Remote:     true,
	})
	ctx := trace.ContextWithRemoteSpanContext(context.Background(), caller)
	client, err := idemd.New(address)
	if err != nil {
		return err
	}
	defer client.Close()
	outcome, err := client.Idempotent(ctx, "traced", key, []byte("go-fingerprint"), func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
		return idemd.Result{Body: []byte("go")}, nil
	})
	if err != nil {
		return err
	}
	if outcome.Replayed {
		return fmt.Errorf("a fresh key replayed")
	}
	return nil
}
