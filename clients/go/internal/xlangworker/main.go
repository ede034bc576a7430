// Command xlangworker is the Go worker of the cross-language test (tests/suite/cross_language.rs):
// `xlangworker ADDRESS` reads commands from stdin, one JSON line each: {"namespace", "repeats",
// "calls": [{"key", "request"}]}; it answers {"ready": true} and starts on the next line ("go"),
// so that every language starts at once. For every call it runs Idempotent `repeats` times, all runs of
// all calls at once (one goroutine each), with the fingerprint this client computes from
// `request`. The work returns "go:KEY:N" (N counts this worker's work runs, so two runs never
// return the same bytes). It prints one JSON line per run: {"key", "work_runs", "error" (a kind of
// clients/BEHAVIOUR.md, or null), "body", "replayed"}, then {"done": number of runs}. It ends when
// stdin closes.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	idemd "github.com/idemd/idemd/clients/go"
	"github.com/idemd/idemd/clients/go/internal/errorkind"
)

const language = "go"

type call struct {
	Key     string          `json:"key"`
	Request json.RawMessage `json:"request"`
}

type command struct {
	Namespace string `json:"namespace"`
	Repeats   int    `json:"repeats"`
	Calls     []call `json:"calls"`
}

type line struct {
	Key      string  `json:"key"`
	WorkRuns int     `json:"work_runs"`
	Error    *string `json:"error"`
	Body     *string `json:"body"`
	Replayed *bool   `json:"replayed"`
	Detail   string  `json:"detail,omitempty"`
}

// workRuns counts this worker's work runs, numbering the bodies.
var workRuns atomic.Int64

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: xlangworker ADDRESS")
		os.Exit(2)
	}
	if err := serve(os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "xlangworker:", err)
		os.Exit(1)
	}
}

func serve(address string) error {
	client, err := idemd.New(address)
	if err != nil {
		return err
	}
	defer client.Close()
	input := bufio.NewScanner(os.Stdin)
	// The fingerprint vectors make long lines.
	input.Buffer(make([]byte, 64*1024), 16*1024*1024)
	output := json.NewEncoder(os.Stdout)
	for input.Scan() {
		if len(input.Bytes()) == 0 {
			continue
		}
		var cmd command
		if err := json.Unmarshal(input.Bytes(), &cmd); err != nil {
			return fmt.Errorf("a command that is not JSON: %w", err)
		}
		if err := output.Encode(map[string]bool{"ready": true}); err != nil {
			return err
		}
		if !input.Scan() {
			break
		}
		lines := run(client, cmd)
		for _, l := range lines {
			if err := output.Encode(l); err != nil {
				return err
			}
		}
		if err := output.Encode(map[string]int{"done": len(lines)}); err != nil {
			return err
		}
	}
	return input.Err()
}

func run(client *idemd.Client, cmd command) []line {
	var jobs []call
	for _, c := range cmd.Calls {
		for i := 0; i < cmd.Repeats; i++ {
			jobs = append(jobs, c)
		}
	}
	lines := make([]line, len(jobs))
	var wg sync.WaitGroup
	for i, job := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lines[i] = runOne(client, cmd.Namespace, job)
		}()
	}
	wg.Wait()
	return lines
}

func runOne(client *idemd.Client, namespace string, c call) line {
	out := line{Key: c.Key}
	fingerprint, err := idemd.Fingerprint(c.Request)
	if err != nil {
		kind := "unmapped: " + err.Error()
		out.Error = &kind
		return out
	}
	var executed atomic.Int64
	outcome, err := client.Idempotent(context.Background(), namespace, c.Key, fingerprint,
		func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
			executed.Add(1)
			n := workRuns.Add(1)
			// The work takes a moment, as real work does, so other callers meet the key held.
			time.Sleep(20 * time.Millisecond)
			return idemd.Result{Body: []byte(fmt.Sprintf("%s:%s:%d", language, c.Key, n))}, nil
		})
	out.WorkRuns = int(executed.Load())
	if err != nil {
		kind := errorkind.Of(err)
		out.Error = &kind
		out.Detail = err.Error()
		return out
	}
	body := string(outcome.Result.Body)
	out.Body = &body
	out.Replayed = &outcome.Replayed
	return out
}
