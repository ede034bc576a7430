package idemd_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// findTool is a tool on PATH, or in the folder `go install` puts binaries in (often not on PATH).
func findTool(t *testing.T, name string) string {
	t.Helper()
	if path, err := exec.LookPath(name); err == nil {
		return path
	}
	goEnv := func(name string) string {
		value, err := exec.Command("go", "env", name).Output()
		if err != nil {
			t.Fatalf("go env %s: %v", name, err)
		}
		return strings.TrimSpace(string(value))
	}
	candidates := []string{}
	if gobin := goEnv("GOBIN"); gobin != "" {
		candidates = append(candidates, filepath.Join(gobin, name))
	}
	for _, gopath := range filepath.SplitList(goEnv("GOPATH")) {
		candidates = append(candidates, filepath.Join(gopath, "bin", name))
	}
	for _, candidate := range candidates {
		if _, err := os.Stat(candidate); err == nil {
			return candidate
		}
	}
	t.Fatalf("%s is not installed (looked on PATH and in %v); .ci/run installs it", name, candidates)
	return ""
}

// The committed stubs are what the pinned generators make of proto/ now: a proto change without
// regenerated stubs (or stubs edited by hand) fails here.
func TestStubsAreUpToDate(t *testing.T) {
	protoc := findTool(t, "protoc")
	genGo := findTool(t, "protoc-gen-go")
	genGoGRPC := findTool(t, "protoc-gen-go-grpc")
	out := t.TempDir()
	const module = "module=github.com/idemd/idemd/clients/go"
	command := exec.Command(protoc,
		"-I", "../../proto",
		"--plugin=protoc-gen-go="+genGo,
		"--plugin=protoc-gen-go-grpc="+genGoGRPC,
		"--go_out="+out, "--go_opt="+module,
		"--go-grpc_out="+out, "--go-grpc_opt="+module,
		"idempotency/v1/idempotency.proto",
	)
	if output, err := command.CombinedOutput(); err != nil {
		t.Fatalf("protoc: %v\n%s", err, output)
	}
	generated, err := filepath.Glob(filepath.Join(out, "idempotencyv1", "*.go"))
	if err != nil || len(generated) != 2 {
		t.Fatalf("protoc made %v (%v), want the two stub files", generated, err)
	}
	committed, err := filepath.Glob(filepath.Join("idempotencyv1", "*.go"))
	if err != nil || len(committed) != len(generated) {
		t.Fatalf("committed stubs %v, generated %v: not the same files", committed, generated)
	}
	for _, path := range generated {
		name := filepath.Base(path)
		fresh, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		old, err := os.ReadFile(filepath.Join("idempotencyv1", name))
		if err != nil {
			t.Fatalf("%s is generated but not committed: %v", name, err)
		}
		if !bytes.Equal(fresh, old) {
			t.Errorf("idempotencyv1/%s differs from what protoc generates now: run `go generate` in clients/go", name)
		}
	}
}
