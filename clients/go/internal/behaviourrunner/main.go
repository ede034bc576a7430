// Command behaviourrunner is the Go client's runner for the behaviour suite (clients/BEHAVIOUR.md,
// "Running the suite"): `behaviourrunner ADDRESS CASES_FILE CASE_NAME` runs Idempotent once
// against the fake idemd at ADDRESS with the case's options and work, and prints one line of JSON:
// {"error": kind or null, "work_runs": n, "body", "replayed", "protected"}. It exits 0 whatever
// the outcome; only a case it cannot run (bad arguments, an unreadable case) exits non-zero.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	idemd "github.com/idemd/idemd/clients/go"
	"github.com/idemd/idemd/clients/go/internal/errorkind"
)

type caseFile struct {
	Defaults    json.RawMessage `json:"defaults"`
	DefaultWork json.RawMessage `json:"default_work"`
	Cases       []struct {
		Name    string          `json:"name"`
		Options json.RawMessage `json:"options"`
		Work    json.RawMessage `json:"work"`
	} `json:"cases"`
}

type caseOptions struct {
	FailOpen         bool  `json:"fail_open"`
	MaxAttempts      int   `json:"max_attempts"`
	BackoffInitialMS int64 `json:"backoff_initial_ms"`
	BackoffMaxMS     int64 `json:"backoff_max_ms"`
	RPCTimeoutMS     int64 `json:"rpc_timeout_ms"`
	MaxWaits         int   `json:"max_waits"`
	WaitTimeoutMS    int64 `json:"wait_timeout_ms"`
	LeaseTTLMS       int64 `json:"lease_ttl_ms"`
}

type caseWork struct {
	Returns *string `json:"returns"`
	Fails   string  `json:"fails"`
	Store   *string `json:"store"`
}

// errWork is the failure of a case's work; the helper must hand it back as it is.
var errWork = errors.New("the case's work failed")

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: behaviourrunner ADDRESS CASES_FILE CASE_NAME")
		os.Exit(2)
	}
	line, err := run(os.Args[1], os.Args[2], os.Args[3])
	if err != nil {
		fmt.Fprintln(os.Stderr, "behaviourrunner:", err)
		os.Exit(1)
	}
	fmt.Println(line)
}

func run(address, casesFile, name string) (string, error) {
	text, err := os.ReadFile(casesFile)
	if err != nil {
		return "", err
	}
	var file caseFile
	if err := json.Unmarshal(text, &file); err != nil {
		return "", fmt.Errorf("%s: %w", casesFile, err)
	}
	var options caseOptions
	var work caseWork
	found := false
	for _, c := range file.Cases {
		if c.Name != name {
			continue
		}
		found = true
		// The case's options over the defaults: decoding both into one struct does the merge.
		if err := json.Unmarshal(file.Defaults, &options); err != nil {
			return "", fmt.Errorf("defaults: %w", err)
		}
		if len(c.Options) > 0 {
			if err := json.Unmarshal(c.Options, &options); err != nil {
				return "", fmt.Errorf("case %s options: %w", name, err)
			}
		}
		workJSON := c.Work
		if len(workJSON) == 0 || string(workJSON) == "null" {
			workJSON = file.DefaultWork
		}
		if err := json.Unmarshal(workJSON, &work); err != nil {
			return "", fmt.Errorf("case %s work: %w", name, err)
		}
	}
	if !found {
		return "", fmt.Errorf("no case %q in %s", name, casesFile)
	}

	ms := func(n int64) time.Duration { return time.Duration(n) * time.Millisecond }
	client, err := idemd.New(address, idemd.WithRPCTimeout(ms(options.RPCTimeoutMS)))
	if err != nil {
		return "", err
	}
	defer client.Close()
	callOptions := []idemd.CallOption{
		idemd.WithMaxAttempts(options.MaxAttempts),
		idemd.WithBackoff(ms(options.BackoffInitialMS), ms(options.BackoffMaxMS)),
		idemd.WithMaxWaits(options.MaxWaits),
		idemd.WithWaitTimeout(ms(options.WaitTimeoutMS)),
		idemd.WithLeaseTTL(ms(options.LeaseTTLMS)),
	}
	if options.FailOpen {
		callOptions = append(callOptions, idemd.WithFailOpen())
	}
	if work.Store != nil {
		stored := *work.Store
		callOptions = append(callOptions, idemd.WithCompleteOnError(func(error) (idemd.Result, bool) {
			return idemd.Result{Body: []byte(stored)}, true
		}))
	}
	runs := 0
	outcome, err := client.Idempotent(context.Background(), "behaviour", name, []byte("behaviour-fingerprint"),
		func(ctx context.Context, lease idemd.Lease) (idemd.Result, error) {
			runs++
			switch {
			case work.Returns != nil:
				return idemd.Result{Body: []byte(*work.Returns)}, nil
			case work.Fails == "retryable":
				return idemd.Result{}, idemd.Retryable(errWork)
			default:
				return idemd.Result{}, errWork
			}
		}, callOptions...)

	printed := map[string]any{"error": nil, "work_runs": runs, "body": nil, "replayed": nil, "protected": nil}
	if err != nil {
		printed["error"] = kind(err)
	} else {
		printed["body"] = string(outcome.Result.Body)
		printed["replayed"] = outcome.Replayed
		printed["protected"] = outcome.Protected
	}
	line, err := json.Marshal(printed)
	return string(line), err
}

// kind is BEHAVIOUR.md's name for an error of Idempotent: the case's work failing, or one of the
// client's own.
func kind(err error) string {
	if errors.Is(err, errWork) {
		return "work_failed"
	}
	return errorkind.Of(err)
}
