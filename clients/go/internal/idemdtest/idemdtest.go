// Package idemdtest starts real idemd processes for the Go tests of this module (the client's and
// its middleware's). `cargo test` (tests/suite/go_client.rs) sets IDEMD_BINARY (this build's
// idemd) and IDEMD_TEST_DATABASE_URL (a fresh, migrated PostgreSQL database of the run's own);
// without them a test that needs a server fails, it never skips.
package idemdtest

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RequireEnv is an environment variable the server tests cannot run without.
func RequireEnv(t testing.TB, name, what string) string {
	t.Helper()
	value := os.Getenv(name)
	if value == "" {
		t.Fatalf("%s is not set: it must be %s (cargo test sets it)", name, what)
	}
	return value
}

// Process is an `idemd serve` started by a test.
type Process struct {
	// Addr is its gRPC address, host:port.
	Addr string
	log  syncBuffer
}

// Log is what it wrote to stderr so far.
func (p *Process) Log() string { return p.log.String() }

type syncBuffer struct {
	mu   sync.Mutex
	text strings.Builder
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.text.String()
}

func (b *syncBuffer) line(text string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.text.WriteString(text + "\n")
}

var servingGRPC = regexp.MustCompile(`serving gRPC on (\S+?:\d+)`)
var ansi = regexp.MustCompile("\x1b\\[[0-9;]*m")

// Start starts $IDEMD_BINARY serve on ephemeral ports with args, and stops it when the test ends.
// Only args configure it: IDEMD_* variables of the test's environment are not passed on.
func Start(t testing.TB, args ...string) *Process {
	t.Helper()
	binary := RequireEnv(t, "IDEMD_BINARY", "the idemd binary to test, e.g. target/debug/idemd")
	command := exec.Command(binary, append([]string{"serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--min-lease-ttl", "10ms"}, args...)...)
	for _, variable := range os.Environ() {
		if !strings.HasPrefix(variable, "IDEMD_") {
			command.Env = append(command.Env, variable)
		}
	}
	command.Env = append(command.Env, "NO_COLOR=1")
	stderr, err := command.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := command.Start(); err != nil {
		t.Fatalf("start %s: %v", binary, err)
	}
	exited := make(chan struct{})
	t.Cleanup(func() {
		_ = command.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			_ = command.Process.Kill()
			<-exited
		}
	})
	process := &Process{}
	found := make(chan string, 1)
	// Read stderr for the life of the process, so idemd never blocks on a full pipe.
	go func() {
		defer close(exited)
		scanner := bufio.NewScanner(stderr)
		scanner.Buffer(make([]byte, 64*1024), 1024*1024)
		announced := false
		for scanner.Scan() {
			line := ansi.ReplaceAllString(scanner.Text(), "")
			process.log.line(line)
			if match := servingGRPC.FindStringSubmatch(line); match != nil && !announced {
				announced = true
				found <- match[1]
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
		_ = command.Wait()
	}()
	select {
	case process.Addr = <-found:
	case <-exited:
		t.Fatalf("idemd exited before serving:\n%s", process.Log())
	case <-time.After(60 * time.Second):
		t.Fatalf("idemd did not announce its gRPC address within 60 s:\n%s", process.Log())
	}
	return process
}

// StartPostgres is an idemd on the run's PostgreSQL database ($IDEMD_TEST_DATABASE_URL).
func StartPostgres(t testing.TB, args ...string) *Process {
	t.Helper()
	url := RequireEnv(t, "IDEMD_TEST_DATABASE_URL", "the URL of a fresh, migrated PostgreSQL database")
	return Start(t, append([]string{"--database-url", url}, args...)...)
}
