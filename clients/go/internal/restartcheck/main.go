// Command restartcheck is driven by tests/suite/go_client.rs to show that the Go client keeps
// working while idemd and PostgreSQL restart under it. It runs Idempotent on one new key after
// another against ADDRESS, printing "done N" after each and "outage METHOD CODE" whenever an RPC
// finds idemd unreachable, until its standard input closes. Then it calls every key again, which
// must replay the stored result without running the work, and prints
// "summary keys=K runs=R replays=P". Any error ends it with exit status 1: across the restarts
// every call must succeed (the retries absorb the outages).
package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	idemd "github.com/idemd/idemd/clients/go"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: restartcheck ADDRESS KEY_PREFIX")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "restartcheck:", err)
		os.Exit(1)
	}
}

func run(address, prefix string) error {
	var out sync.Mutex
	say := func(format string, args ...any) {
		out.Lock()
		defer out.Unlock()
		fmt.Printf(format+"\n", args...)
	}
	reportOutages := grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		err := invoker(ctx, method, req, reply, cc, opts...)
		if code := status.Code(err); code == codes.Unavailable || code == codes.DeadlineExceeded {
			say("outage %s %s", method, code)
		}
		return err
	})
	client, err := idemd.New(address, idemd.WithDialOptions(reportOutages))
	if err != nil {
		return err
	}
	defer client.Close()

	var stop atomic.Bool
	go func() {
		scanner := bufio.NewScanner(os.Stdin)
		for scanner.Scan() {
		}
		stop.Store(true)
	}()

	// Retry for as long as a restart takes; a short lease lets a lease granted by an Acquire whose
	// answer was lost in the restart expire soon, so the retried call takes the key over.
	options := []idemd.CallOption{
		idemd.WithMaxAttempts(1_000_000),
		idemd.WithBackoff(20*time.Millisecond, 500*time.Millisecond),
		idemd.WithLeaseTTL(2 * time.Second),
		idemd.WithWaitTimeout(2 * time.Second),
		idemd.WithMaxWaits(100),
	}
	runs := map[string]int{}
	var keys []string
	for i := 0; !stop.Load(); i++ {
		key := fmt.Sprintf("%s-%d", prefix, i)
		body := fmt.Sprintf("result %d", i)
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		outcome, err := client.Idempotent(ctx, "go-restart", key, map[string]any{"key": key}, func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
			runs[key]++
			return idemd.Result{Body: []byte(body)}, nil
		}, options...)
		cancel()
		if err != nil {
			return fmt.Errorf("key %s: %w", key, err)
		}
		if string(outcome.Result.Body) != body || !outcome.Protected {
			return fmt.Errorf("key %s: got %+v", key, outcome)
		}
		keys = append(keys, key)
		say("done %d", i)
	}
	replays := 0
	for i, key := range keys {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		outcome, err := client.Idempotent(ctx, "go-restart", key, map[string]any{"key": key}, func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
			runs[key]++
			return idemd.Result{Body: []byte("ran again")}, nil
		}, options...)
		cancel()
		if err != nil {
			return fmt.Errorf("replay of %s: %w", key, err)
		}
		if outcome.Replayed && string(outcome.Result.Body) == fmt.Sprintf("result %d", i) {
			replays++
		}
	}
	total := 0
	for _, n := range runs {
		total += n
	}
	say("summary keys=%d runs=%d replays=%d", len(keys), total, replays)
	return nil
}
